"""Video-LLaVA (`VideoLlavaForConditionalGeneration`): CLIP towers for images and for videos, LLaVA's projector and
Llama decoder, 1-D RoPE.

A video is 8 frames at 224/14, each encoded by the video tower with its CLS kept (257 tokens a frame, 2,056 a
video: the budgets' reference, `ModelInfo.video`); an image goes through the image tower and drops CLS (256
tokens). Encoder cuts run per frame, a video's frames being the crops of one sample, and lay the reduced
frames out in order ([CLS, dominant patches, merged tokens] per frame); decoder-side cuts see all the frames'
tokens of a sample as one visual block (`<video>` placeholders, or `<image>` ones).

transformers' video processor needs torchvision, which the locked stack does not install: `FrameProcessor` runs
the checkpoint's own image processor (`VideoLlavaImageProcessor`, PIL and numpy; the same resize, crop and CLIP
normalisation as `VideoLlavaVideoProcessor`) on every frame, and `load_processor` builds the processor with it.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from transformers import AutoTokenizer, BatchFeature, VideoLlavaConfig, VideoLlavaForConditionalGeneration
from transformers.models.video_llava import VideoLlavaImageProcessor, VideoLlavaProcessor
from transformers.video_processing_utils import VideoProcessorMixin

from ..core import Checkpoint, Dims
from .base import Images, ModelInfo
from .llava import CHAT_TEMPLATE as IMAGE_CHAT_TEMPLATE
from .llava import LLAVA_7B_SHAPE, LLAVA_HF_IDS, PATCH_SIZE, Llava

IMAGE_SIZE = 224  # LanguageBind's CLIP ViT-L/14 towers
FRAMES = 8  # frames per video, sampled uniformly (Video-LLaVA's training and evaluation)
CHAT_TEMPLATE = IMAGE_CHAT_TEMPLATE.replace(
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}",
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}")


class FrameProcessor(VideoProcessorMixin):
    """Videos -> `pixel_values_videos` [B, frames, 3, H, W], each frame through `VideoLlavaImageProcessor`.

    Takes what transformers' video processors take: per video an array [frames, H, W, 3] (uint8) or a list of PIL
    frames. Sampling frames is the caller's (`visiondrop.harness.video.read_frames` samples 8 uniformly).
    """

    model_input_names = ["pixel_values_videos"]

    def __init__(self, **kwargs: Any) -> None:
        self.frame_kwargs = {k: v for k, v in kwargs.items() if k in _FRAME_KEYS}
        super().__init__(**{k: v for k, v in kwargs.items() if k not in _FRAME_KEYS})

    def __call__(self, videos: Any, **kwargs: Any) -> BatchFeature:
        return self.preprocess(videos, **kwargs)

    def preprocess(self, videos: Any, return_tensors: str | None = "pt", **kwargs: Any) -> BatchFeature:
        frames = VideoLlavaImageProcessor(**self.frame_kwargs)
        batch = [videos] if is_one_video(videos) else list(videos)
        pixels = [frames.preprocess(list(video), return_tensors="np", return_legacy_image_output=False)["pixel_values"]
                  for video in batch]
        if len({len(p) for p in pixels}) > 1:
            raise ValueError(f"the videos of one batch must have as many frames each (the model takes one [videos, "
                             f"frames, 3, H, W] tensor), got {[len(p) for p in pixels]}: sample them to one count, "
                             "or process them in separate batches")
        return BatchFeature({"pixel_values_videos": np.stack(pixels)}, tensor_type=return_tensors)

    def to_dict(self) -> dict[str, Any]:
        return {**self.frame_kwargs, "video_processor_type": type(self).__name__}


class TakesFrameProcessor:
    """A processor mixin that accepts a `FrameProcessor` for videos (the processors' own check looks the video
    processor up in a registry that is empty without torchvision)."""

    def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
        if argument_name == "video_processor" and isinstance(argument, FrameProcessor):
            return FrameProcessor
        return super().check_argument_for_proper_class(argument_name, argument)


class FramesVideoLlavaProcessor(TakesFrameProcessor, VideoLlavaProcessor):
    """`VideoLlavaProcessor` with a `FrameProcessor` for videos. Images come as `pixel_values`, not the deprecated
    `pixel_values_images`."""

    images_kwargs = {"return_tensors": "pt", "return_legacy_image_output": False}


def with_video_placeholders(inputs: dict[str, Tensor], config: Any) -> dict[str, Tensor]:
    """An example prompt (`Family.example_inputs`) whose image placeholders become `<video>` ones."""
    ids = inputs["input_ids"]
    inputs["input_ids"] = torch.where(ids == config.image_token_id, config.video_token_id, ids)
    return inputs


_FRAME_KEYS = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
               "do_normalize", "image_mean", "image_std", "do_convert_rgb")


def is_one_video(videos: Any) -> bool:
    if isinstance(videos, np.ndarray) or isinstance(videos, Tensor):
        return videos.ndim == 4
    return isinstance(videos, (list, tuple)) and bool(videos) and isinstance(videos[0], Image.Image)


class VideoLlava(Llava):
    model_class = VideoLlavaForConditionalGeneration
    sample_sizes = ((224, 224), (300, 200))  # images: 256 tokens each (CLS dropped)
    nominal_size = None  # the budgets count against an 8-frame video
    #: budget 257: 12.5% of one 8-frame video's 2,056 tokens
    checkpoints = (Checkpoint("video-llava-7b", "LanguageBind/Video-LLaVA-7B-hf", "video_llava", LLAVA_7B_SHAPE,
                              LLAVA_HF_IDS, 1e-5, budget=257, paper="Video-LLaVA-7B"),)
    config_class = VideoLlavaConfig
    image_aspect_ratio = "none"  # Video-LLaVA's evaluation resizes and centre-crops (no padding to a square)
    conv_template = "vicuna_v1"  # its "USER: ... ASSISTANT:" prompt after the system sentence
    feature_functions = {"image": "get_image_features", "video": "get_video_features"}
    stacked_features = True  # its forward calls `.to()` on the encoded features
    image_feature_args = ("pixel_values_images", "vision_feature_layer", "vision_feature_select_strategy")
    video_feature_args = ("vision_feature_layer",)
    image_size = IMAGE_SIZE
    special_tokens = ("<video>",)
    pixel_keys = ("pixel_values", "pixel_values_images", "pixel_values_videos")

    def vision_tower(self, model: nn.Module, modality: str = "image") -> nn.Module:
        return model.model.video_tower if modality == "video" else model.model.image_tower

    # -- config facts --------------------------------------------------------------------------------------------
    def frames(self, config: Any) -> int:
        return config.video_seq_length // self._frame_tokens(config)

    @staticmethod
    def _frame_tokens(config: Any) -> int:
        vision = config.vision_config
        return (vision.image_size // vision.patch_size) ** 2 + 1  # CLS kept in every frame

    def nominal_crops(self, config: Any) -> int:
        return self.frames(config)

    def model_info(self, config: Any) -> ModelInfo:
        """The budgets' reference is one video: frames x 257 tokens (2,056); an image (256) keeps the same share."""
        layer = config.vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError("models that concatenate several vision_feature_layers are not supported")
        frames = self.frames(config)
        return ModelInfo(n_visual=frames * self._frame_tokens(config), n_layers=config.text_config.num_hidden_layers,
                         vision_layer=layer % (config.vision_config.num_hidden_layers + 1) - 1, cls_kept=True,
                         crops=frames, video=True)

    def flops_dims(self, config: Any) -> Dims:
        return replace(super().flops_dims(config), visual_per_crop=self._frame_tokens(config), crops=self.frames(config))

    # -- visual tokens -------------------------------------------------------------------------------------------
    def video_frames(self, model: nn.Module, input_ids: Tensor | None, kwargs: dict[str, Any]) -> Tensor | None:
        """A sample's `<video>` tokens over a frame's 257 (CLS kept)."""
        tokens = self.token_count(model, input_ids, kwargs, model.config.video_token_id)
        return tokens // self._frame_tokens(model.config)

    # -- encoder cut ---------------------------------------------------------------------------------------------
    def visual_inputs(self, model: nn.Module, modality: str, args: tuple, kwargs: dict[str, Any]) -> Images:
        if modality == "image":
            if not args and kwargs.get("pixel_values") is None:  # the deprecated name
                kwargs = {**kwargs, "pixel_values": kwargs.get("pixel_values_images")}
            return super().visual_inputs(model, modality, args, kwargs)
        kwargs = {**kwargs, **dict(zip(("pixel_values_videos",) + self.video_feature_args, args))}
        pixel_values = kwargs["pixel_values_videos"]
        layer = kwargs.get("vision_feature_layer")
        layer = model.config.vision_feature_layer if layer is None else layer
        videos, frames = pixel_values.shape[:2]
        # the video features keep CLS whatever the select strategy
        return Images(pixel_values.flatten(0, 1), [frames] * videos, layer, "full", modality="video")

    def lay_out(self, model: nn.Module, images: Images, image: int, feats: Tensor, keep: Tensor, n_merged: int,
                tokens: int, native_layout: bool) -> tuple[Tensor, Tensor, int]:
        if images.modality == "image":
            return super().lay_out(model, images, image, feats, keep, n_merged, tokens, native_layout)
        # frames in order, each [kept tokens (CLS first), merged]; origins index the video's frames x 257 tokens
        frame = torch.arange(keep.shape[0], device=keep.device).unsqueeze(1)
        origins = torch.cat([keep + frame * tokens, keep.new_full((keep.shape[0], n_merged), -1)], dim=1)
        return feats.flatten(0, 1), origins.flatten(), keep.shape[0] * tokens

    def example_image(self, config: Any, generator: torch.Generator,
                      size: tuple[int, int] | None = None) -> tuple[int, dict[str, Tensor]]:
        """One random video of `frames` frames (the budgets' reference), at the towers' own size."""
        vision = config.vision_config
        if size is not None and tuple(size) != (vision.image_size,) * 2:
            raise ValueError(f"Video-LLaVA frames are {vision.image_size}x{vision.image_size}, got {size}")
        pixels = torch.randn(1, self.frames(config), 3, vision.image_size, vision.image_size, generator=generator)
        return config.video_seq_length, {"pixel_values_videos": pixels}

    def example_inputs(self, config: Any, text_tokens: int, generator: torch.Generator,
                       image_size: tuple[int, int] | None = None) -> dict[str, Tensor]:
        """The prompt with one random video: its placeholders are `<video>` tokens."""
        return with_video_placeholders(super().example_inputs(config, text_tokens, generator, image_size), config)

    def patch_cells(self, model: nn.Module, image_size: Tensor | None,
                    modality: str = "image") -> Tensor:
        """An image: its 256 patches in raster order (CLS dropped), crop 0. A video: frame after frame, CLS (no
        patch) then the frame's patches in raster order, the frame being the crop, so the maps show where in each
        frame and in which frames the kept tokens lie."""
        if modality == "image":
            return super().patch_cells(model, image_size)
        frames, side = self.patch_grid(model.config)
        patch = torch.arange(side * side)
        frame = torch.stack([torch.zeros_like(patch), patch // side, patch % side], dim=1)
        frame = torch.cat([frame.new_full((1, 3), -1), frame])
        cells = frame.repeat(frames, 1)
        cells[:, 0] = torch.where(cells[:, 0] < 0, -1, torch.arange(frames).repeat_interleave(side * side + 1))
        return cells

    # -- building ------------------------------------------------------------------------------------------------
    def build_config(self, shape, ids, init_std: float = 0.02, norm_eps: float = 1e-6) -> Any:
        """LanguageBind/Video-LLaVA-7B-hf's layout (CLIP towers at 224/14, layer -2, 8 frames) at `shape`;
        `ids.special["<video>"]` is the `<video>` token."""
        if "<video>" not in ids.special:
            raise ValueError("Video-LLaVA needs a <video> token id (TokenIds.special['<video>'])")
        config = super().build_config(shape, ids, init_std, norm_eps)
        config.video_token_id = ids.special["<video>"]
        config.video_seq_length = FRAMES * ((IMAGE_SIZE // PATCH_SIZE) ** 2 + 1)
        return config

    def build_processor(self, tokenizer: Any) -> Any:
        frame_kwargs = dict(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
        return FramesVideoLlavaProcessor(image_processor=VideoLlavaImageProcessor(**frame_kwargs),
                                   video_processor=FrameProcessor(**frame_kwargs), tokenizer=tokenizer,
                                   patch_size=PATCH_SIZE, vision_feature_select_strategy="default",
                                   num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)

    def load_processor(self, path: str | Path, **options: Any) -> Any:
        """The processor of a checkpoint, its video processor replaced by `FrameProcessor` (no torchvision)."""
        if options:
            raise TypeError(f"Video-LLaVA takes no processor options, got {', '.join(options)}")
        images = VideoLlavaImageProcessor.from_pretrained(path)
        frame_kwargs = {key: getattr(images, key) for key in _FRAME_KEYS}
        tokenizer = AutoTokenizer.from_pretrained(path)
        return FramesVideoLlavaProcessor(image_processor=images, video_processor=FrameProcessor(**frame_kwargs),
                                   tokenizer=tokenizer, patch_size=PATCH_SIZE, vision_feature_select_strategy="default",
                                   num_additional_image_tokens=1,
                                   chat_template=getattr(tokenizer, "chat_template", None) or CHAT_TEMPLATE)


VIDEO_LLAVA = VideoLlava()
