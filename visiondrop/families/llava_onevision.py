"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): a SigLIP tower without CLS (26 layers at 384/14, 729
patches a crop, no pooling head), LLaVA's 2-layer GELU projector, a Qwen2 decoder with grouped-query attention and
plain 1-D RoPE.

Videos (the budgets' reference, `ModelInfo.video`): every frame goes through the tower, the projector, and then a
2x2 bilinear pooling (27x27 -> 14x14: 196 tokens a frame, row-major), and one image-newline token closes the whole
video: F x 196 + 1 placeholders, 6,273 at the official 32 frames (`FRAMES`; the lmms-eval setting of the video
papers). The layout is exposed as `frames(config)`, `frame_tokens(config)` and one trailing newline
(`VIDEO_NEWLINES`), as Video-LLaVA's is. Images (`anyres_max_9`): a base 384x384 view (729 tokens, no newline),
then the crops of the best-fitting grid pinpoint packed as one grid, unpadded to the image's aspect, resized
bilinearly to about 9 crops' worth when larger (ratio > 1.1), with a newline token closing every row
(`grid_positions`).

Budgets: `budget=` counts against the frame tokens of the nominal 32-frame video (`ModelInfo.n_visual` = 32 x 196 =
6,272; the newline beside them, as LLaVA-NeXT's row newlines beside its 2,880: the video papers' retention ratios
are shares of the frames' tokens, the newline always appended); `ratio=` keeps that share of each sample's own
visual tokens (any frame count, any image).

Encoder side, without CLS: the CLS substitute is the mean attention each patch receives from all patches of its
crop (or frame), at SigLIP's last layer (the 26th, index 25): the layer whose output the model projects
(`vision_feature_layer=-1`), as CLS attention is read at the projected layer on CLIP towers, and the layer HoliTom's
official code reads (`attentions[-1]` of the 26-layer tower, averaged over heads and queries, then pooled 2x2).
FastVID's official OV code reads instead the attention of SigLIP's pooling-head probe and its pooled output, from a
separately loaded original google/siglip-so400m-patch14-384 head (the OV checkpoints have none: `tower_head` names
that checkpoint, and `tower_output` shows a decoder-side policy the tower's own output at the feature layer, read
from the host's own call, `hidden_states[vision_feature_layer]`, with the bilinear 2x2 pooling of video frames for
its rows). Rows are recomputed from that layer's own q/k, crop by crop (the tower keeps SDPA), or read from an eager
tower (`eager_encoder`).
- Images: encoder cuts run per crop on the 729 patches before the projector, counts scaled to 729 of the nominal 196 a
  frame (`EncoderView.share`). The kept tokens are laid out as on LLaVA-NeXT: by default the compact layout of the
  official VisionZip/VisionDrop code (base view first, then the crops' kept patches in raster order of the whole
  grid, then the merged tokens; no newline tokens), or with a method's `newlines="keep"` the model's own layout
  (patches that unpadding removes dropped, a newline closing every grid row that keeps a patch; patches that the
  anyres_max_9 resize folds together keep the token they are resized into, so such a row may hold one twice; a cut
  that keeps every patch of every crop, merging none, gets exactly the host's packing, resize included).
- Videos: the host pools after its projector, so a frame's tokens exist only in LLM space: the view shows the
  196 pooled, projected tokens of each frame (`EncoderView.projected`), with the importance and the keys pooled
  2x2 the same bilinear way (as HoliTom pools its attention), and so are the rows of further tower layers
  (`importance_at`, `received`: VScan's shallow scan, HiPrune's anchors), one row per pooled token; kept tokens are
  the model's own, bit for bit; merged tokens average in LLM space. Frames in order, each [kept, merged]; the
  trailing newline is dropped by default (as the compact image layout drops newlines) and kept with
  `newlines="keep"` or where a cut keeps every token. The tower's own features are not in this view: a policy that
  reads them (CDPruner's CLIP relevance) is refused on videos.
- The tower does not merge inside (no CLS to protect; merged tower tokens would not give a frame its 196 pooled
  tokens, nor an image's crops the grid the host unpads and resizes): ToMe runs its rounds at the tower's output, as
  on Qwen2.5-VL (no official OneVision code for it); MustDrop skips its spatial merge, as on the Qwen towers, and
  keeps every token for its decoder filters (its key set from the last layer, per crop or frame).
Decoder side: a sample's visual tokens are one set (an image's base view, crops and row newlines; a video's frames
and its newline), and cuts may drop newline tokens as any other, as on LLaVA-NeXT.

Batches: the host takes a batch's videos as one [B, F, 3, H, W] tensor; videos of different frame counts go in it
with the shorter ones' frames padded at the front, their tokens' placeholders in the row's left padding
(`with_padded_frames`, which the processor applies), so each row's real tokens are the video's alone and the
padded frames' tokens are padding (for the stock model and the engine; a video's encoder-side tokens lie frame by
frame in spans of 196 slots, so the padded frames' fill exactly the padding's). The encoder view names those
frames (`Images.padded`, `EncoderView.padded`: a video's leading zero frames, in a batch of several), so that a
policy that keeps state per video (MustDrop's key set and thresholds) takes it from the real frames only. Samples
with several images (`batch_num_images` > 1) are refused by the engine's one-block rule.
transformers' video processor needs torchvision: `FrameProcessor` (families.video_llava) resizes every frame to
384x384 with SigLIP's normalisation, as `LlavaOnevisionVideoProcessor` does; sampling frames is the caller's.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import replace
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    BatchFeature,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionProcessor,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.image_utils import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, PILImageResampling
from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape, unpad_image
from transformers.utils import ModelOutput, cached_file

from ..core import EMPTY_SLOT, Checkpoint, Dims, EncoderView, Images, ModelInfo, Shape, TokenIds
from .llava_next import LlavaNext, with_newlines
from .video_llava import FrameProcessor, TakesFrameProcessor, is_one_video, with_video_placeholders

FRAMES = 32  # frames per video, sampled uniformly (lmms-eval's llava_onevision max_frames_num, the papers' setting)
VIDEO_NEWLINES = 1  # one image-newline token after the whole video (LLaVA-NeXT's mm_newline_position "one_token")
IMAGE_SIZE, PATCH_SIZE = 384, 14  # SigLIP so400m-patch14-384: 27 x 27 = 729 patches (the last 6 pixels unused)
GRID_PINPOINTS = [[IMAGE_SIZE * rows, IMAGE_SIZE * cols] for rows in range(1, 7) for cols in range(1, 7)]
ASPECT_RATIO = "anyres_max_9"
SPECIAL_TOKENS = ("<video>", "<|im_start|>", "<|im_end|>")
FRAME_SETTINGS = dict(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_center_crop=False,
                      resample=PILImageResampling.BICUBIC, image_mean=IMAGENET_STANDARD_MEAN,
                      image_std=IMAGENET_STANDARD_STD)  # SigLIP's: resize to 384 x 384, mean and std 0.5
#: the OV checkpoints' vocabulary (7B; the 0.5B's is 151,936) and special tokens
QWEN2_IDS = TokenIds(vocab=152128, image=151646, bos=151643, eos=151645, pad=151643, special={"<video>": 151647})
CHAT_TEMPLATE = (  # llava-hf/llava-onevision-qwen2-*-ov-hf's (transformers' conversion script): no system turn
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}"
    "{% endif %}{{'<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class FramesOnevisionProcessor(TakesFrameProcessor, LlavaOnevisionProcessor):
    """`LlavaOnevisionProcessor` with a `FrameProcessor` for videos (no torchvision), that also takes a batch of
    videos with different frame counts (`with_padded_frames`)."""

    def __call__(self, images: Any = None, text: Any = None, videos: Any = None, **kwargs: Any) -> BatchFeature:
        frames = None if videos is None or is_one_video(videos) else [len(video) for video in videos]
        if frames is None or len(set(frames)) == 1:
            return super().__call__(images=images, text=text, videos=videos, **kwargs)
        texts = [text] if isinstance(text, str) else list(text or ())
        if images is not None or len(texts) != len(videos):
            raise ValueError(f"videos of different frame counts ({frames}) take one prompt each and no images: "
                             f"got {len(texts)} prompt(s) and {'images' if images is not None else 'no images'}")
        if kwargs.get("return_tensors") != "pt" or self.tokenizer.padding_side != "left":
            raise ValueError("videos of different frame counts need return_tensors='pt' and a left-padding tokenizer "
                             "(their padded frames' tokens lie in the left padding)")
        alone = [super(FramesOnevisionProcessor, self).__call__(text=[prompt], videos=[video], **kwargs)
                 for prompt, video in zip(texts, videos)]
        return with_padded_frames(alone, self.video_token_id, self.tokenizer.pad_token_id)


class LlavaOnevision(LlavaNext):
    model_class = LlavaOnevisionForConditionalGeneration
    #: budget 627.2: 10% of one 32-frame video's 6,272 frame tokens (the video papers' lowest retention)
    checkpoints = (
        Checkpoint("llava-onevision-7b", "llava-hf/llava-onevision-qwen2-7b-ov-hf", "llava_onevision",
                   Shape(hidden=3584, intermediate=18944, layers=28, heads=28, vision_hidden=1152,
                         vision_intermediate=4304, vision_layers=26, vision_heads=16, kv_heads=4),
                   QWEN2_IDS, 1e-6, budget=627.2, paper="LLaVA-OV-7B", extra_tokens=VIDEO_NEWLINES),
        Checkpoint("llava-onevision-0.5b", "llava-hf/llava-onevision-qwen2-0.5b-ov-hf", "llava_onevision",
                   Shape(hidden=896, intermediate=4864, layers=24, heads=14, vision_hidden=1152,
                         vision_intermediate=4304, vision_layers=26, vision_heads=16, kv_heads=2),
                   replace(QWEN2_IDS, vocab=151936), 1e-6, budget=627.2, extra_tokens=VIDEO_NEWLINES),
    )
    config_class = LlavaOnevisionConfig
    sample_sizes = ((300, 200), (400, 300))  # images of 2 and 3 crops: 1,261 and 1,728 tokens
    nominal_size = None  # the budgets count against a 32-frame video
    image_aspect_ratio = "none"  # the processor's anyres_max_9 handles any aspect ratio
    conv_template = "chat_template"
    feature_functions = {"image": "get_image_features", "video": "get_video_features"}
    pixel_keys = ("pixel_values", "pixel_values_videos")
    image_feature_args = ("image_sizes", "vision_feature_layer", "vision_feature_select_strategy",
                          "vision_aspect_ratio", "batch_num_images")
    video_feature_args = ("vision_feature_layer", "vision_feature_select_strategy")
    image_size = IMAGE_SIZE
    tower_cls = False
    special_tokens = SPECIAL_TOKENS
    text_before_image = 3  # "<|im_start|>user\n"
    video_trailing = VIDEO_NEWLINES
    tower_head = "google/siglip-so400m-patch14-384"  # the released checkpoints' tower (with head, 27 layers)

    def stacks_features(self, modality: str) -> bool:
        return modality == "video"  # [B, F x 196 + 1, D]; an image's features are a list

    # -- config facts --------------------------------------------------------------------------------------------
    def frames(self, config: Any) -> int:
        return FRAMES

    @staticmethod
    def frame_tokens(config: Any) -> int:
        """Visual tokens of one frame: the patch grid pooled 2x2 (ceil(27 / 2)^2 = 196)."""
        return math.ceil(config.vision_config.image_size // config.vision_config.patch_size / 2) ** 2

    def video_tokens(self, config: Any, frames: int | None = None) -> int:
        """Visual tokens of a video of `frames` frames (default `FRAMES`): F x 196 + 1."""
        return (self.frames(config) if frames is None else frames) * self.frame_tokens(config) + VIDEO_NEWLINES

    def nominal_crops(self, config: Any) -> int:
        return self.frames(config)

    def model_info(self, config: Any) -> ModelInfo:
        """The budgets' reference is the frame tokens of one 32-frame video (6,272; its newline beside them); an
        image keeps the same share of its own tokens."""
        layer = config.vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError("models that concatenate several vision_feature_layers are not supported")
        return ModelInfo(n_visual=self.frames(config) * self.frame_tokens(config),
                         n_layers=config.text_config.num_hidden_layers,
                         vision_layer=layer % (config.vision_config.num_hidden_layers + 1) - 1, cls_kept=False,
                         crops=self.frames(config), video=True, tower_head=self.tower_head)

    def flops_dims(self, config: Any) -> Dims:
        """The nominal video: the tower on the 729 patches of each of its 32 frames, the projector on all of them
        (it runs before the pooling), 196 tokens a frame entering the decoder, and the newline."""
        patches = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
        return replace(super().flops_dims(config), vision_tokens=patches, vision_cls=0,
                       visual_per_crop=self.frame_tokens(config), crops=self.frames(config),
                       extra_tokens=VIDEO_NEWLINES, projected_per_crop=patches, vision_row_projections=2,
                       encoder_projected=True)

    # -- the encoder cut -----------------------------------------------------------------------------------------
    def images(self, model: nn.Module, pixel_values: Tensor, args: tuple, kwargs: dict[str, Any]) -> Images:
        counts = {**kwargs, **dict(zip(self.image_feature_args, args))}.get("batch_num_images")
        if counts is not None and any(int(n) != 1 for n in counts):
            raise NotImplementedError("samples with several images are not supported with visual-token pruning "
                                      "(the engine takes one visual block a sample): give one image per prompt")
        return super().images(model, pixel_values, args, kwargs)

    def visual_inputs(self, model: nn.Module, modality: str, args: tuple, kwargs: dict[str, Any]) -> Images:
        if modality == "image":
            return super().visual_inputs(model, modality, args, kwargs)
        kwargs = {**kwargs, **dict(zip(("pixel_values_videos",) + self.video_feature_args, args))}
        pixel_values = kwargs["pixel_values_videos"]
        layer = kwargs.get("vision_feature_layer")
        layer = model.config.vision_feature_layer if layer is None else layer
        strategy = kwargs.get("vision_feature_select_strategy") or model.config.vision_feature_select_strategy
        if strategy != "full":
            raise NotImplementedError("encoder-side pruning of LLaVA-OneVision needs vision_feature_select_strategy "
                                      "'full' (SigLIP has no CLS to drop)")
        videos, frames = pixel_values.shape[:2]
        return Images(pixel_values.flatten(0, 1), [frames] * videos, layer, strategy, modality="video",
                      padded=padded_frames(pixel_values) if videos > 1 else None)

    def encoder_view(self, model: nn.Module, images: Images, eager_encoder: bool = False,
                     scan_layers: tuple[int, ...] = (), received: bool = False,
                     merge: Callable[[int, Tensor, Tensor], Tensor] | None = None) -> EncoderView:
        """SigLIP's last layer with the mean attention each patch receives; a video's frames pooled 2x2 after the
        projector, as the model pools them, with every row the view carries (module docstring). The tower does not
        merge inside (`merge` is ignored): a merge in tower space has no CLS to protect and would not give a frame
        its 196 pooled tokens, nor an image's crops their grid; a policy's merging then runs at the tower's output,
        as on Qwen2.5-VL's, or is skipped (MustDrop's spatial merge)."""
        view = super().encoder_view(model, images, eager_encoder, scan_layers, received)
        per_frame = self.frame_tokens(model.config)
        if images.modality != "video":
            view.share = view.hidden.shape[1] / per_frame  # a crop's 729 patches against a frame's 196 tokens
            return view
        llava = self.multimodal(model)
        pool = lambda x: llava.apply_pooling(x.contiguous())  # noqa: E731  [N, 729, C] -> [N, 196, C]
        pool_rows = functools.partial(self.crop_rows, model, images)
        heads = view.importance.shape[1]
        keys = pool(view.keys.transpose(1, 2).flatten(2)).unflatten(2, (heads, -1)).transpose(1, 2)
        hidden = pool(llava.multi_modal_projector(view.hidden))
        tower_received = view.received
        return EncoderView(hidden, pool_rows(view.importance), keys, has_cls=False, projected=True,
                           importance_at={layer: pool_rows(rows) for layer, rows in view.importance_at.items()},
                           received=None if tower_received is None else
                           lambda layer: pool_rows(tower_received(layer)[:, None])[:, 0])

    def crop_rows(self, model: nn.Module, images: Images, rows: Tensor) -> Tensor:
        """A video frame's rows [N, H, 729] pooled 2x2 as the model pools its tokens: [N, H, 196]."""
        if images.modality != "video":
            return rows
        return self.multimodal(model).apply_pooling(rows.transpose(1, 2).contiguous()).transpose(1, 2)

    def tower_output(self, model: nn.Module, images: Images,
                     output: ModelOutput) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """Videos: the tower's `hidden_states[vision_feature_layer]` of the host's own call (the 729 patches of each
        frame, before the projector); a frame's rows pooled 27x27 -> 14x14 as the host pools its tokens (`crop_rows`:
        the bilinear `apply_pooling`, as FastVID's official `get_attn_2dPool` pools the probe's attention). Images
        (anyres crops, resized and unpadded into the packed layout) are not shown."""
        if images.modality != "video":
            raise NotImplementedError("LLaVA-OneVision's adapter shows the tower's own output for videos only")
        return (output.hidden_states[images.feature_layer],
                lambda rows: self.crop_rows(model, images, rows[:, None])[:, 0])

    def video_frames(self, model: nn.Module, input_ids: Tensor | None, kwargs: dict[str, Any]) -> Tensor | None:
        """A sample's video tokens, less the newline after the video, over a frame's 196 (0 for an image)."""
        tokens = self.token_count(model, input_ids, kwargs, model.config.video_token_id)
        return (tokens - VIDEO_NEWLINES).clamp(min=0) // self.frame_tokens(model.config)

    def unsupported(self, policy: Any, modality: str) -> str | None:
        """On videos the tower's own features (CDPruner's CLIP relevance) are not in the view: a frame's tokens exist
        only projected and pooled."""
        if modality == "video" and policy.tower_features:
            return ("on LLaVA-OneVision videos the encoder cut selects among the pooled, projected tokens of each "
                    "frame: the tower's own features are not pooled per frame; run it on images, or with the "
                    "method's relevance on the decoder's inputs where it has one (CDPruner: text='prompt')")
        return None

    def valid_tokens(self, model: nn.Module, images: Images, tokens: int) -> Tensor | None:
        """Patches that the model's own layout keeps (not removed by unpadding); every token of a video."""
        if images.modality == "video":
            return None
        positions = [grid_positions(model.config, n, size)[0] >= 0 for n, size in zip(images.crops, images.sizes)]
        return torch.cat(positions).view(-1, tokens).to(images.pixels.device)

    def lay_out(self, model: nn.Module, images: Images, image: int, feats: Tensor, keep: Tensor, n_merged: int,
                tokens: int, native_layout: bool) -> tuple[Tensor, Tensor, int]:
        if images.modality != "video":
            return arrange_onevision(self.multimodal(model), feats, keep, n_merged, images.sizes[image],
                                     native_layout)
        # each frame in its own span of `tokens` slots (the rest of the span empty), so that a batch's padded frames
        # (`with_padded_frames`) fill exactly the slots the host scatters into its padding
        frames, filled = feats.shape[:2]
        frame = torch.arange(frames, device=keep.device).unsqueeze(1)
        origins = torch.cat([keep + frame * tokens, keep.new_full((frames, n_merged), -1),
                             keep.new_full((frames, tokens - filled), EMPTY_SLOT)], dim=1).flatten()
        feats = torch.cat([feats, feats.new_zeros(frames, tokens - filled, feats.shape[-1])], 1).flatten(0, 1)
        if native_layout:  # the trailing newline, as the model lays it out
            newline = self.multimodal(model).image_newline.to(feats.dtype)
            feats = torch.cat([feats, newline[None]])
            origins = torch.cat([origins, origins.new_tensor([frames * tokens])])
        return feats, origins, frames * tokens + VIDEO_NEWLINES

    # -- benchmark inputs ----------------------------------------------------------------------------------------
    def example_image(self, config: Any, generator: torch.Generator,
                      size: tuple[int, int] | None = None) -> tuple[int, dict[str, Tensor]]:
        """One random video of `FRAMES` frames (the budgets' reference) at the tower's size."""
        if size is not None and tuple(size) != (IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"LLaVA-OneVision frames are {IMAGE_SIZE}x{IMAGE_SIZE}, got {size}")
        pixels = torch.randn(1, self.frames(config), 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
        return self.video_tokens(config), {"pixel_values_videos": pixels}

    def example_inputs(self, config: Any, text_tokens: int, generator: torch.Generator,
                       image_size: tuple[int, int] | None = None) -> dict[str, Tensor]:
        """The prompt with one random video: its placeholders are `<video>` tokens."""
        return with_video_placeholders(super().example_inputs(config, text_tokens, generator, image_size), config)

    # -- where the visual tokens come from ------------------------------------------------------------------------
    def patch_grid(self, config: Any) -> tuple[int, int]:
        """A video's frames, each a 14 x 14 grid of pooled tokens."""
        return self.frames(config), math.isqrt(self.frame_tokens(config))

    def patch_cells(self, model: nn.Module, image_size: Tensor | None, modality: str = "image") -> Tensor:
        """A video: frame after frame, each frame's pooled tokens in raster order (the frame is the crop), then the
        newline (no patch)."""
        if modality != "video":
            raise NotImplementedError("positional-bias maps of LLaVA-OneVision cover its videos (images mix a "
                                      "27 x 27 base view with a resized crop grid)")
        _, side = self.patch_grid(model.config)
        frames = self.frames(model.config)
        token = torch.arange(frames * side * side)
        cells = torch.stack([token // (side * side), token % (side * side) // side, token % side], dim=1)
        return torch.cat([cells, cells.new_full((VIDEO_NEWLINES, 3), -1)])

    # -- building ------------------------------------------------------------------------------------------------
    def build_config(self, shape: Shape, ids: TokenIds, init_std: float = 0.02, norm_eps: float = 1e-6) -> Any:
        """llava-hf/llava-onevision-qwen2-7b-ov-hf's layout (SigLIP of 26 layers at 384/14 without head, layer -1,
        all patches; GELU projector; Qwen2 with grouped-query attention; anyres_max_9 over 6 x 6 pinpoints) at
        `shape`; `ids.special["<video>"]` is the `<video>` token."""
        if "<video>" not in ids.special:
            raise ValueError("LLaVA-OneVision needs a <video> token id (TokenIds.special['<video>'])")
        vision = SiglipVisionConfig(
            image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, num_hidden_layers=shape.vision_layers,
            hidden_size=shape.vision_hidden, intermediate_size=shape.vision_intermediate,
            num_attention_heads=shape.vision_heads, vision_use_head=False, layer_norm_eps=norm_eps,
        )
        text = Qwen2Config(
            vocab_size=ids.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
            num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
            num_key_value_heads=shape.kv_heads or shape.heads, max_position_embeddings=32768,
            rms_norm_eps=norm_eps, initializer_range=init_std,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=False,
            bos_token_id=ids.bos, eos_token_id=ids.eos, pad_token_id=ids.pad,
        )
        return self.config_class(
            vision_config=vision, text_config=text, image_token_index=ids.image,
            video_token_index=ids.special["<video>"], vision_feature_layer=-1, vision_feature_select_strategy="full",
            image_grid_pinpoints=GRID_PINPOINTS, vision_aspect_ratio=ASPECT_RATIO, projector_hidden_act="gelu",
            tie_word_embeddings=False,
        )

    def build_processor(self, tokenizer: Any) -> Any:
        tokenizer.chat_template = CHAT_TEMPLATE
        image_processor = LlavaOnevisionImageProcessorPil(
            image_grid_pinpoints=GRID_PINPOINTS, image_mean=IMAGENET_STANDARD_MEAN, image_std=IMAGENET_STANDARD_STD)
        return self._processor(image_processor, FRAME_SETTINGS, tokenizer, CHAT_TEMPLATE)

    def load_processor(self, path: str | Path, **options: Any) -> Any:
        """The checkpoint's image processor, tokenizer and chat template, with a `FrameProcessor` for videos set as
        its video processor (video_preprocessor_config.json; SigLIP's settings where there is none)."""
        if options:
            raise TypeError(f"LLaVA-OneVision takes no processor options, got {', '.join(options)}")
        tokenizer = AutoTokenizer.from_pretrained(path)
        try:
            video = json.loads(Path(cached_file(str(path), "video_preprocessor_config.json")).read_text())
            frame_settings = {key: video[key] for key in FRAME_SETTINGS if key in video}
        except OSError:
            frame_settings = FRAME_SETTINGS
        return self._processor(AutoImageProcessor.from_pretrained(path), frame_settings, tokenizer,
                               getattr(tokenizer, "chat_template", None) or CHAT_TEMPLATE)

    @staticmethod
    def _processor(image_processor: Any, frame_settings: dict, tokenizer: Any, chat_template: str) -> Any:
        side = IMAGE_SIZE // PATCH_SIZE
        return FramesOnevisionProcessor(
            image_processor=image_processor, video_processor=FrameProcessor(**frame_settings), tokenizer=tokenizer,
            num_image_tokens=side * side, vision_feature_select_strategy="full", chat_template=chat_template,
            vision_aspect_ratio=ASPECT_RATIO)


LLAVA_ONEVISION = LlavaOnevision()


def with_padded_frames(alone: list[BatchFeature], video_token_id: int, pad_token_id: int) -> BatchFeature:
    """One batch of prompts with one video each (`alone`: each processed on its own, batch of one) whose videos
    have different frame counts, as the host takes a batch: one [B, F, 3, H, W] tensor and as many `<video>`
    placeholders in each row as its video gives tokens.

    A shorter video's frames are padded at the front with zero frames, and their tokens' placeholders go into its
    row's left padding (attention mask 0), so that the host's scatter, which fills each row's placeholders in order,
    puts the padded frames' tokens there and the real ones where the video stands alone: the model never attends to
    them (the engine treats placeholders in the padding as padding), and each row's real tokens are its alone prompt.
    """
    frames = [sample["pixel_values_videos"].shape[1] for sample in alone]
    most = max(frames)
    per_frame = [int(((s["input_ids"] == video_token_id).sum() - VIDEO_NEWLINES) // f) for s, f in zip(alone, frames)]
    padded = [(most - f) * n for f, n in zip(frames, per_frame)]
    width = max(s["input_ids"].shape[1] + n for s, n in zip(alone, padded))
    ids, masks, pixels = [], [], []
    for sample, n_padded, n_frames in zip(alone, padded, frames):
        real, mask, video = sample["input_ids"][0], sample["attention_mask"][0], sample["pixel_values_videos"][0]
        pad = width - real.numel() - n_padded
        ids.append(torch.cat([real.new_full((pad,), pad_token_id), real.new_full((n_padded,), video_token_id), real]))
        masks.append(torch.cat([mask.new_zeros(pad + n_padded), mask]))
        pixels.append(torch.cat([video.new_zeros(most - n_frames, *video.shape[1:]), video]))
    return BatchFeature({"input_ids": torch.stack(ids), "attention_mask": torch.stack(masks),
                         "pixel_values_videos": torch.stack(pixels)})


def padded_frames(pixel_values: Tensor) -> list[int]:
    """How many of each video's first frames [B, F, 3, H, W] are `with_padded_frames`' zero frames: padding, since no
    frame of 8-bit pixels is all zeros after SigLIP's normalisation (a zero needs a pixel value of 127.5)."""
    real = pixel_values.flatten(2).ne(0).any(-1)  # [B, F]
    return (real.cumsum(1) == 0).sum(1).tolist()


def grid_positions(config: Any, n_crops: int, image_size: Tensor) -> tuple[Tensor, int, Tensor]:
    """Where each crop patch of one image lands in the model's packed visual tokens (`pack_image_features`).

    The base view's 729 patches first, then the grid's: unpadded to the image's aspect (-1 for patches removed),
    resized bilinearly to about `anyres_max_9` crops' worth where the grid is larger (ratio > 1.1; a patch then
    lands on the token it is resized into), a newline token closing each row. Returns (positions
    [n_crops x 729], length of the packed tokens, positions of the newline tokens).
    """
    side = config.vision_config.image_size // config.vision_config.patch_size
    per_crop = side * side
    if n_crops == 1:  # one view (a multi-image sample's): its patches, then a newline
        return torch.arange(per_crop), per_crop + 1, torch.tensor([per_crop])
    size = torch.as_tensor(image_size).cpu()
    rows, cols = get_anyres_image_grid_shape(size.tolist(), config.image_grid_pinpoints,
                                             config.vision_config.image_size)
    grid = torch.arange(per_crop, n_crops * per_crop).view(rows, cols, side, side).transpose(1, 2)
    kept = unpad_image(grid.reshape(1, rows * side, cols * side), size)[0]  # [h, w] patch ids
    height, width = kept.shape
    ratio = math.sqrt(height * width / (int(config.vision_aspect_ratio.removeprefix("anyres_max_")) * per_crop))
    out_h, out_w = (int(height // ratio), int(width // ratio)) if ratio > 1.1 else (height, width)
    row = torch.arange(height) * out_h // height
    col = torch.arange(width) * out_w // width
    position = torch.full((n_crops * per_crop,), -1, dtype=torch.long)
    position[:per_crop] = torch.arange(per_crop)
    position[kept.flatten()] = (per_crop + row.unsqueeze(1) * (out_w + 1) + col).flatten()
    newline_at = per_crop + torch.arange(out_h) * (out_w + 1) + out_w
    return position, per_crop + out_h * (out_w + 1), newline_at


def arrange_onevision(llava: nn.Module, feats: Tensor, keep: Tensor, n_merged: int, image_size: Tensor,
                      native_layout: bool = False) -> tuple[Tensor, Tensor, int]:
    """Lay out the reduced crops of one image (module docstring): the base view's tokens as they are ([kept,
    merged]), then the grid crops' kept patches in raster order of the whole grid (compact, default) or in the
    model's packed order with row newlines (`native_layout`), then their merged tokens.
    Returns (tokens, original indices in the model's packed order, -1 for merged tokens; placeholder slots).
    feats: [crops, k + n_merged, D]; keep: [crops, k] patch indices.
    """
    config = llava.config
    side = config.vision_config.image_size // config.vision_config.patch_size
    n_crops, k = keep.shape
    if native_layout and k == side * side and not n_merged:  # every patch kept: exactly as the host packs them
        raster = feats.gather(1, keep.argsort(1).unsqueeze(-1).expand_as(feats))
        packed = llava.pack_image_features([raster], torch.as_tensor(image_size).view(1, 2).cpu(),
                                           image_newline=llava.image_newline,
                                           vision_aspect_ratio=config.vision_aspect_ratio)[0][0]
        return packed, torch.arange(packed.shape[0], device=keep.device), packed.shape[0]
    position, slots, newline_at = grid_positions(config, n_crops, image_size)
    crop = torch.arange(n_crops, device=keep.device).unsqueeze(1)
    origin = position.to(keep.device)[crop * side * side + keep]
    tokens, origins = [feats[0]], [torch.cat([origin[0], origin.new_full((n_merged,), -1)])]
    if n_crops > 1:
        sub, sub_keep, sub_origin = feats[1:, :k], keep[1:], origin[1:]
        if native_layout:
            real = sub_origin >= 0
            kept, kept_origin = with_newlines(sub[real], sub_origin[real], newline_at.to(keep.device),
                                              llava.image_newline)
        else:
            _, cols = get_anyres_image_grid_shape(torch.as_tensor(image_size).tolist(), config.image_grid_pinpoints,
                                                  config.vision_config.image_size)
            grid_row, grid_col = (crop[1:] - 1) // cols, (crop[1:] - 1) % cols
            raster = (grid_row * side + sub_keep // side) * (cols * side) + grid_col * side + sub_keep % side
            order = raster.flatten().argsort()
            kept, kept_origin = sub.flatten(0, 1)[order], sub_origin.flatten()[order]
        tokens += [kept, feats[1:, k:].flatten(0, 1)]
        origins += [kept_origin, origin.new_full(((n_crops - 1) * n_merged,), -1)]
    return torch.cat(tokens), torch.cat(origins), slots
