"""Qwen3-VL (`Qwen3VLForConditionalGeneration`, and the MoE `Qwen3VLMoeForConditionalGeneration`): a ViT without
CLS or windows, a 2x2 patch merger, DeepStack, and a Qwen3 decoder with interleaved M-RoPE.

Built on the Qwen2.5-VL adapter (`qwen2_5_vl`: dynamic resolution, M-RoPE positions kept at every cut, merged
tokens at the centre of the grid, one image at a time in the encoder cut); what differs, and how it is handled:
- The ViT: patch 16, a 2x2 merger (32 pixels a visual token), a learned position embedding interpolated to each
  image's grid plus a 2-D rotary embedding, full attention in all 27 blocks (no windows: the tower keeps the
  processor's patch order, each 2x2 group contiguous, groups in raster order). The budgets' reference
  (`ModelInfo.n_visual`) is a nominal 768x768 image: 24 x 24 = 576 visual tokens, as LLaVA-1.5's and the Qwen2.5-VL
  adapter's, so `budget=64` is the same retention on all three.
- Encoder-side scoring without CLS, as the VisionDrop paper prescribes for such towers: the mean attention each
  patch receives from all patches of its image, at the tower's last block (26), whose output the merger projects
  (every block attends to the whole image, so the last is the latest view of the features that are kept, as on
  Qwen2.5-VL, where it is the last full-attention block); recomputed from that block's own qkv projection and
  rotary embedding (the tower keeps SDPA); a visual token's score is the mean of its four patches'. The official
  VisionZip/VisionDrop/SparseVLM code has no Qwen3-VL path. Of the engines with one: OpenVINO GenAI enabled its
  CDPruner (similarity and instruction relevance on the projected features, no attention) for Qwen3-VL in
  openvinotoolkit/openvino.genai#3499; vLLM's EVS (vllm-project/vllm#29752, video only) drops tokens of frames
  that repeat the previous one before the language model; neither scores with the tower's attention, and their
  handling of the DeepStack rows was not read for this adapter.
- DeepStack: the outputs of ViT blocks 8, 16 and 24 go through their own mergers (`deepstack_merger_list`) and are
  added to the hidden states of the visual tokens after decoder layers 0, 1 and 2. They are the engine's side
  features (`Family.side_features`): each kept token carries its own three rows through every cut before layer 3,
  and a merged (contextual) token gets its members' rows combined with the weights that made the token itself
  (`Selection.weights`: anchor + mean of members for VisionZip/VisionDrop). In the encoder cut the combination
  is taken before the DeepStack mergers, as the main features merge before the main merger; in a decoder cut,
  on the rows as the decoder adds them. Cuts from layer 3 on need no rows.
- The decoder: Qwen3 layers with per-head q/k norms (which the engine's attention rows apply, `engine.attention`),
  grouped-query attention and interleaved M-RoPE (`mrope_section` [24, 20, 20] of head_dim / 2 = 64, the axes
  interleaved across the frequencies; transformers' rotary embedding folds it into cos/sin). The text after an
  image continues from the image's first position plus its larger side in tokens; decoding continues after the
  unpruned prompt (`rope_deltas`), so a method that cuts nothing is the stock model. The model's forward needs
  `mm_token_type_ids` (the processor returns it).
- MoE (Qwen3-VL-30B-A3B): the decoder layers differ only in their MLP (128 experts, 8 a token), which the engine
  never looks into; the same adapter serves both (`QWEN3_VL_MOE`).
- Videos: the processor writes a text timestamp (`<t seconds>`) before every temporal patch (two frames) and
  wraps the patch's tokens in `<|vision_start|> ... <|vision_end|>`, so a video is several visual spans separated by
  text (`visual_spans`). Decoder cuts treat a sample's visual tokens as one set across the spans, keep each kept
  token in its own span and never touch the timestamps (vLLM's EVS for Qwen3-VL had to be reworked for this
  layout: vllm-project/vllm#30847, fixed by #33607); encoder cuts run per temporal patch (the tower attends
  within each one), each keeping its share of its own tokens, laid out in its own span. A merged token takes the
  centre of the grid of the span it lies in (an encoder cut's: its own frame's; a decoder cut's, which follow the
  last span's kept tokens: the last frame's), as an image's takes the image's. Without torchvision, `FramePairProcessor`
  resizes every frame with the image processor (its pixel bounds per frame, not the video processor's per clip)
  and stacks consecutive frames into temporal patches; frames come sampled (`harness.video.read_frames`), without
  their times, so timestamps assume Qwen3-VL's own sampling rate of 2 frames a second.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
import numpy as np
from transformers import (
    BatchFeature,
    Qwen2VLImageProcessorPil,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
    Qwen3VLProcessor,
)
from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures
from transformers.processing_utils import ProcessorMixin
from transformers.utils import ModelOutput
from transformers.video_processing_utils import VideoProcessorMixin
from transformers.video_utils import VideoMetadata

from ..core import EMPTY_SLOT, Checkpoint, Dims, Images, Shape, TokenIds
from .qwen2_5_vl import CHAT_TEMPLATE as QWEN2_5_CHAT_TEMPLATE
from .qwen2_5_vl import Qwen2_5_VL

NOMINAL_SIDE = 768  # the budgets' reference image: (768 / 32)^2 = 576 visual tokens, as LLaVA-1.5's
PATCH_SIZE, MERGE_SIZE, TEMPORAL_PATCH = 16, 2, 2
VISION_DEPTH, DEEPSTACK_BLOCKS = 27, (8, 16, 24)  # Qwen3-VL-8B's tower
MROPE_SECTION = [24, 20, 20]  # temporal, height, width shares of head_dim / 2 = 64, interleaved
POSITION_EMBEDDINGS = 2304  # the learned 48 x 48 grid, interpolated to each image's
MIN_PIXELS, MAX_PIXELS = 65536, 16777216  # the checkpoint's image processor (size shortest_edge / longest_edge)
IMAGE_MEAN = IMAGE_STD = [0.5, 0.5, 0.5]
FRAMES = 16  # frames sampled per video by default (uniformly over the clip; 8 temporal patches)
FPS = 2.0  # Qwen3-VL's own sampling rate, which the timestamps of pre-sampled frames assume
IMAGE_LINE = "{% if content['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
#: Qwen3-VL-Instruct's chat template for images, videos and text: Qwen2.5-VL's without its default system message; a
#: video's placeholder is expanded by the processor into each temporal patch's timestamp and vision tokens
#: Qwen3-VL's vocabulary and the ids of its special tokens
IDS = TokenIds(vocab=151936, image=151655, bos=151643, eos=151645, pad=151643,
               special={"<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|video_pad|>": 151656})
CHAT_TEMPLATE = QWEN2_5_CHAT_TEMPLATE.replace(
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}", "").replace(
    IMAGE_LINE, IMAGE_LINE + "{% elif content['type'] == 'video' %}{{ '<|video_pad|>' }}")


class FramePairProcessor(VideoProcessorMixin):
    """Videos -> `pixel_values_videos` [t * h * w, 3 * 2 * 16 * 16], `video_grid_thw` [[t, h, w]] and the metadata
    the timestamps are written from, without torchvision.

    Takes per video an array [frames, H, W, 3] (uint8) or a list of PIL frames, already sampled. Every frame goes
    through the image processor (resize to multiples of 32 within its pixel bounds, normalisation, patches in
    merge-block order) as one temporal slice; consecutive frames make a temporal patch (an odd last frame is
    repeated, as Qwen's processors pad).
    """

    model_input_names = ["pixel_values_videos", "video_grid_thw"]

    def __init__(self, **kwargs: Any) -> None:
        self.frame_kwargs = {k: v for k, v in kwargs.items() if k in _FRAME_KEYS}
        super().__init__(**{k: v for k, v in kwargs.items() if k not in _FRAME_KEYS})
        self.merge_size, self.temporal_patch_size = MERGE_SIZE, TEMPORAL_PATCH

    def preprocess(self, videos: Any, return_tensors: str | None = "pt", **kwargs: Any) -> BatchFeature:
        frames = Qwen2VLImageProcessorPil(**{**self.frame_kwargs, "temporal_patch_size": 1})
        batch = [videos] if _is_one_video(videos) else list(videos)
        pixels, grids, metadata = [], [], []
        for video in batch:
            video = list(video)
            if len(video) % TEMPORAL_PATCH:
                video.append(video[-1])
            out = frames.preprocess(video, return_tensors="pt")
            (_, h, w) = out["image_grid_thw"][0].tolist()
            slices = out["pixel_values"].view(len(video), h * w, 3, 1, PATCH_SIZE, PATCH_SIZE)
            pairs = torch.cat([slices[0::2], slices[1::2]], dim=3)  # [t, h w, 3, 2, p, p]
            pixels.append(pairs.reshape(-1, 3 * TEMPORAL_PATCH * PATCH_SIZE ** 2))
            grids.append([len(video) // TEMPORAL_PATCH, h, w])
            metadata.append(VideoMetadata(total_num_frames=len(video), fps=FPS,
                                          frames_indices=list(range(len(video)))))
        return BatchFeature({"pixel_values_videos": torch.cat(pixels), "video_grid_thw": torch.tensor(grids),
                             "video_metadata": metadata})

    def to_dict(self) -> dict[str, Any]:
        return {**self.frame_kwargs, "video_processor_type": type(self).__name__}


_FRAME_KEYS = ("min_pixels", "max_pixels", "patch_size", "merge_size", "image_mean", "image_std")


def _is_one_video(videos: Any) -> bool:
    return isinstance(videos, np.ndarray) and videos.ndim == 4 or (
        isinstance(videos, list) and bool(videos) and not isinstance(videos[0], (list, np.ndarray)))


class Qwen3VLImageTextProcessor(Qwen3VLProcessor):
    """Qwen3-VL's processor for images, videos (`FramePairProcessor`) and text, without the checkpoint's video
    processor (whose lookup needs torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, video_processor=None, **kwargs):
        self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
        self.vision_start_token, self.vision_end_token = "<|vision_start|>", "<|vision_end|>"
        for name in ("image", "video", "vision_start", "vision_end"):
            setattr(self, f"{name}_token_id", tokenizer.convert_tokens_to_ids(getattr(self, f"{name}_token")))
        video_processor = video_processor or FramePairProcessor(**_frame_options(image_processor))
        ProcessorMixin.__init__(self, image_processor, tokenizer, video_processor, chat_template=chat_template)

    def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
        if argument_name == "video_processor" and isinstance(argument, FramePairProcessor):
            return FramePairProcessor
        return super().check_argument_for_proper_class(argument_name, argument)


def _frame_options(image_processor: Any) -> dict[str, Any]:
    """The image processor's settings that frames are processed with."""
    size = image_processor.size
    return {"min_pixels": size["shortest_edge"], "max_pixels": size["longest_edge"], "patch_size": PATCH_SIZE,
            "merge_size": MERGE_SIZE, "image_mean": list(image_processor.image_mean),
            "image_std": list(image_processor.image_std)}


class Qwen3_VL(Qwen2_5_VL):
    model_class = Qwen3VLForConditionalGeneration
    checkpoints = (Checkpoint(
        "qwen3-vl-8b", "Qwen/Qwen3-VL-8B-Instruct", "qwen3_vl",
        Shape(hidden=4096, intermediate=12288, layers=36, heads=32, vision_hidden=1152, vision_intermediate=4304,
              vision_layers=27, vision_heads=16, kv_heads=8),
        IDS, 1e-6, budget=64),)
    nominal_side = NOMINAL_SIDE
    sample_sizes = ((256, 256), (320, 224), (192, 384))  # 64, 70, 72 visual tokens (32 pixels each)
    nominal_size = (NOMINAL_SIDE, NOMINAL_SIDE)
    title = "Qwen3-VL"
    feature_functions = {"image": "get_image_features", "video": "get_video_features"}
    visual_spans = True  # a video's temporal patches, each after its timestamp
    processor_class = Qwen3VLImageTextProcessor
    chat_template = CHAT_TEMPLATE
    image_processor_options = dict(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=PATCH_SIZE,
                                   merge_size=MERGE_SIZE, temporal_patch_size=TEMPORAL_PATCH, image_mean=IMAGE_MEAN,
                                   image_std=IMAGE_STD)
    video_layout_key = "video_grid_thw"

    def has_images(self, kwargs: dict[str, Any]) -> bool:
        """Images or videos: the host adds DeepStack rows to both, so the engine takes over for either."""
        encoded = kwargs.get("mm_encoder_outputs") or {}
        return (kwargs.get("pixel_values") is not None or kwargs.get("pixel_values_videos") is not None
                or encoded.get("image") is not None or encoded.get("video") is not None)

    def image_token_mask(self, model: nn.Module, input_ids: Tensor | None,
                         inputs_embeds: Tensor | None) -> Tensor | None:
        """Image and video placeholders: the host's `visual_pos_masks`, where its DeepStack rows go."""
        marks = [super().image_token_mask(model, input_ids, inputs_embeds)]
        video = model.config.video_token_id
        if input_ids is not None:
            marks.append(input_ids == video)
        elif inputs_embeds is not None:
            embed = model.get_input_embeddings()(torch.tensor(video, device=inputs_embeds.device))
            marks.append((inputs_embeds == embed).all(-1))
        return None if marks[0] is None else marks[0] | marks[1]

    # -- parts ---------------------------------------------------------------------------------------------------
    def projector(self, model: nn.Module) -> Callable[[Tensor], Tensor]:
        """The merger on visual tokens given as their four patches' vectors concatenated: [N, k, 4 D] -> [N, k, D']."""
        return _grouped(self.vision_tower(model).merger)

    def side_projector(self, model: nn.Module) -> Callable[[Tensor], Tensor]:
        """The DeepStack mergers, one per row: [N, k, 3, 4 D] -> [N, k, 3, D']."""
        mergers = [_grouped(m) for m in self.vision_tower(model).deepstack_merger_list]
        return lambda side: torch.stack([merge(side[:, :, i]) for i, merge in enumerate(mergers)], 2)

    # -- DeepStack -----------------------------------------------------------------------------------------------
    def side_features(self, kwargs: dict[str, Any], visual: Tensor) -> tuple[tuple[int, ...], Tensor] | None:
        """The DeepStack rows the host hands its language model (added after layers 0, 1, 2 there)."""
        rows, where = kwargs.get("deepstack_visual_embeds"), kwargs.get("visual_pos_masks")
        if rows is None:
            return None
        if not torch.equal(where.to(visual.device), visual):
            raise RuntimeError("Qwen3-VL's DeepStack rows are not on the visual tokens the engine found")
        return tuple(range(len(rows))), torch.stack(list(rows), 1)

    def encoder_output(self, features: list[Tensor], side: list[Tensor] | None) -> ModelOutput:
        levels = side[0].shape[1]
        return BaseModelOutputWithDeepstackFeatures(
            last_hidden_state=features[0], pooler_output=features,
            deepstack_features=[tuple(rows[:, i] for rows in side) for i in range(levels)])

    # -- config facts --------------------------------------------------------------------------------------------
    def flops_dims(self, config: Any) -> Dims:
        """On the nominal 768x768 image (the FLOPs count's convention, `efficiency.flops`): full attention in every
        tower block, a two-matrix GELU MLP, the merger and the three DeepStack mergers (4 D -> 4 D -> D') on
        each projected token; a MoE decoder counts the experts a token is routed to (`text.num_experts_per_tok`
        of `moe_intermediate_size`) and the router."""
        text, vision = config.text_config, config.vision_config
        side, unit = self.nominal_side // vision.patch_size, vision.spatial_merge_size ** 2
        experts = getattr(text, "num_experts_per_tok", 0)
        intermediate = experts * text.moe_intermediate_size if experts else text.intermediate_size
        return Dims(
            hidden=text.hidden_size, intermediate=intermediate, n_layers=text.num_hidden_layers,
            vocab=text.vocab_size, n_heads=text.num_attention_heads, n_kv_heads=text.num_key_value_heads,
            head_dim=text.head_dim, vision_hidden=vision.hidden_size, vision_intermediate=vision.intermediate_size,
            vision_layers=vision.depth, vision_heads=vision.num_heads, vision_tokens=side * side,
            patch_size=vision.patch_size, projector_in=vision.hidden_size * unit, visual_per_crop=side * side // unit,
            model_type=config.model_type, vision_cls=0, patch_channels=vision.in_channels * vision.temporal_patch_size,
            vision_mlp=2, projector_mid=vision.hidden_size * unit,
            side_projectors=len(vision.deepstack_visual_indexes), router=getattr(text, "num_experts", 0),
        )

    def frames(self, config: Any) -> int:
        return FRAMES

    def video_frames(self, model: nn.Module, input_ids: Tensor | None, kwargs: dict[str, Any]) -> Tensor | None:
        """A video's temporal patches (two frames each, the video methods' frames): its spans of video placeholders,
        one after each timestamp. (Qwen2.5-VL's count from the M-RoPE positions does not apply: each temporal patch
        is positioned as an image of its own, after its timestamp's text.)"""
        if input_ids is None:
            return None
        video = input_ids == model.config.video_token_id
        return (video & ~torch.nn.functional.pad(video, (1, 0))[:, :-1]).sum(1)

    # -- encoder cut ---------------------------------------------------------------------------------------------
    def lay_out(self, model: nn.Module, images: Images, image: int, feats: Tensor, keep: Tensor, n_merged: int,
                tokens: int, native_layout: bool) -> tuple[Tensor, Tensor, int]:
        """An image's tokens fill its first slots; a video's temporal patches each fill the first slots of its own
        span (the rest of the span stays empty: `EMPTY_SLOT`)."""
        if feats.shape[0] == 1:
            return super().lay_out(model, images, image, feats, keep, n_merged, tokens, native_layout)
        crops, filled = feats.shape[:2]
        empty = tokens - filled
        rows = torch.cat([feats, feats.new_zeros(crops, empty, feats.shape[-1])], 1).flatten(0, 1)
        frame = torch.arange(crops, device=keep.device).unsqueeze(1) * tokens
        origins = torch.cat([keep + frame, keep.new_full((crops, n_merged), -1),
                             keep.new_full((crops, empty), EMPTY_SLOT)], 1).flatten()
        return rows, origins, crops * tokens

    def scoring_block(self, config: Any) -> int:
        """The last block (26 of 27), whose output the merger projects: every block attends to the whole image."""
        return config.depth - 1

    def bypassed_mergers(self, tower: nn.Module) -> dict[nn.Module, Callable[[Tensor], Tensor]]:
        """The merger and the DeepStack mergers pass their input through: the view keeps the DeepStack blocks'
        outputs as side features, projected later for what is kept."""
        return {merger: (lambda x: x) for merger in [tower.merger, *tower.deepstack_merger_list]}

    def raster_order(self, images: Images, config: Any) -> Tensor:
        """The tower keeps the processor's order: 2x2 groups in raster order already."""
        return torch.arange(int(images.sizes.prod(-1).sum()) // config.spatial_merge_size ** 2)

    def side_of(self, out: Any, raster: Tensor, crops: int, n_tokens: int) -> Tensor:
        """The DeepStack blocks' outputs per token (its four patches' vectors) [N, T, 3, 4 D]."""
        return torch.stack([f.reshape(crops * n_tokens, -1)[raster].view(crops, n_tokens, -1)
                            for f in out.deepstack_features], 2)

    text_before_image = 4  # "<|im_start|>user\n" + <|vision_start|>

    # -- building ------------------------------------------------------------------------------------------------
    def build_config(self, shape: Shape, ids: TokenIds, init_std: float = 0.02, norm_eps: float = 1e-6) -> Any:
        """Qwen3-VL-8B-Instruct's layout (27-block ViT with DeepStack after blocks 8/16/24, patch 16, 2x2 merger,
        36-layer Qwen3 decoder with grouped-query attention and interleaved M-RoPE) at `shape`; M-RoPE's sections
        scaled to the head, DeepStack blocks mapped by relative depth onto a shallower tower."""
        return Qwen3VLConfig(**self._config_parts(shape, ids, init_std, norm_eps))

    def _config_parts(self, shape: Shape, ids: TokenIds, init_std: float, norm_eps: float,
                      **text_extra: Any) -> dict[str, Any]:
        head_dim = shape.head_dim or shape.hidden // shape.heads
        section = [s * head_dim // 128 for s in MROPE_SECTION[1:]]
        section = [head_dim // 2 - sum(section), *section]
        text = dict(
            vocab_size=ids.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
            num_hidden_layers=shape.layers, num_attention_heads=shape.heads, head_dim=head_dim,
            num_key_value_heads=shape.kv_heads or shape.heads, max_position_embeddings=262144, rms_norm_eps=norm_eps,
            initializer_range=init_std, rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                                         "mrope_section": section, "mrope_interleaved": True},
            bos_token_id=ids.bos, eos_token_id=ids.eos, pad_token_id=ids.pad, tie_word_embeddings=False,
            **text_extra,
        )
        deepstack = [round(b * shape.vision_layers / VISION_DEPTH) for b in DEEPSTACK_BLOCKS]
        special = {"<|vision_start|>": ids.image - 3, "<|vision_end|>": ids.image - 2,
                   "<|video_pad|>": ids.image + 1} | ids.special
        vision = dict(
            depth=shape.vision_layers, hidden_size=shape.vision_hidden, intermediate_size=shape.vision_intermediate,
            num_heads=shape.vision_heads, out_hidden_size=shape.hidden, patch_size=PATCH_SIZE,
            spatial_merge_size=MERGE_SIZE, temporal_patch_size=TEMPORAL_PATCH,
            num_position_embeddings=POSITION_EMBEDDINGS, deepstack_visual_indexes=deepstack,
            initializer_range=init_std,
        )
        return dict(text_config=text, vision_config=vision, image_token_id=ids.image,
                    video_token_id=special["<|video_pad|>"], vision_start_token_id=special["<|vision_start|>"],
                    vision_end_token_id=special["<|vision_end|>"], tie_word_embeddings=False,
                    bos_token_id=ids.bos, eos_token_id=ids.eos, pad_token_id=ids.pad)

class Qwen3_VL_MoE(Qwen3_VL):
    """Qwen3-VL-30B-A3B: the same model with mixture-of-experts MLPs in its decoder layers."""

    model_class = Qwen3VLMoeForConditionalGeneration
    title = "Qwen3-VL-MoE"
    #: `intermediate` is one expert's width (moe_intermediate_size); 32 heads of 128 on a 2048-wide decoder
    checkpoints = (Checkpoint(
        "qwen3-vl-30b-a3b", "Qwen/Qwen3-VL-30B-A3B-Instruct", "qwen3_vl_moe",
        Shape(hidden=2048, intermediate=768, layers=48, heads=32, vision_hidden=1152, vision_intermediate=4304,
              vision_layers=27, vision_heads=16, kv_heads=4, head_dim=128),
        IDS, 1e-6, budget=64),)

    def build_config(self, shape: Shape, ids: TokenIds, init_std: float = 0.02, norm_eps: float = 1e-6) -> Any:
        """Qwen3-VL-30B-A3B-Instruct's layout: as Qwen3-VL-8B's, with 128 experts of `shape.intermediate` in every
        decoder layer, 8 routed a token (`shape.layers` decoder layers: 48 in the checkpoint). A decoder narrower
        than `TINY_BELOW` (the tests' tiny models) gets 8 experts, 2 routed a token: the same routing, in a file of
        megabytes rather than hundreds."""
        experts, routed = (EXPERTS, EXPERTS_PER_TOKEN) if shape.hidden >= TINY_BELOW else (8, 2)
        return Qwen3VLMoeConfig(**self._config_parts(
            shape, ids, init_std, norm_eps, moe_intermediate_size=shape.intermediate, num_experts=experts,
            num_experts_per_tok=routed, decoder_sparse_step=1, mlp_only_layers=[]))


EXPERTS, EXPERTS_PER_TOKEN = 128, 8  # Qwen3-VL-30B-A3B-Instruct's
TINY_BELOW = 256  # decoder widths of test models (the latency benchmark's reduced 2048 / 8 keeps all experts)


def _grouped(merger: nn.Module) -> Callable[[Tensor], Tensor]:
    """A Qwen3-VL patch merger on tokens given as their four patches' vectors concatenated: [N, k, 4 D] -> [N, k,
    D']."""

    def project(groups: Tensor) -> Tensor:
        projected = merger(groups.reshape(-1, merger.norm.normalized_shape[0]))
        return projected.view(*groups.shape[:2], projected.shape[-1])  # also where a small image keeps no token

    return project


QWEN3_VL = Qwen3_VL()
QWEN3_VL_MOE = Qwen3_VL_MoE()
