"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): a windowed ViT without CLS, a 2x2 patch merger, a Qwen2
decoder with multimodal rotary positions (M-RoPE).

What differs from LLaVA, and how this adapter handles it:
- Dynamic resolution: an image of h x w patches gives h*w/4 visual tokens (one per 2x2 group, in raster order).
  The budgets' reference (`ModelInfo.n_visual`) is a nominal 672x672 image: 576 tokens, as LLaVA-1.5's, so
  `budget=64` is the same retention (64/576) on both; every method scales its counts to each image's own tokens
  (`DecoderCut.scaled`, `EncoderView.share`), and `ratio=` states the share directly.
- Positions are M-RoPE's [3, B, L] (temporal, height, width), built by the model (`get_rope_index`); the text
  after an image continues from its largest position. They are never renumbered (`fixed_positions`): kept
  tokens keep their positions at every cut, as every Qwen2.5-VL pruning implementation read does (LightCompress,
  EffiVLM-Bench, DART; the shared reference's field-notes.md), and decoding continues after the unpruned prompt,
  so a method that cuts nothing is the stock model. A merged (contextual) token gathers tokens from all over the
  image (its members are assigned by key similarity, not by place), so it takes the centre of the image's grid
  (`merged_position`) rather than the place of any one member.
- Encoder-side scoring without CLS, as the VisionDrop paper prescribes for such towers: the mean attention each
  patch receives from all patches of its image at the tower's last full-attention layer (block 31 of 32, not a
  windowed one), recomputed from that block's own qkv projection and rotary embedding (the tower keeps SDPA). The
  official VisionZip, VisionDrop and SparseVLM repositories have no Qwen2.5-VL adaptation (users ask for one:
  VisionZip #4 #9); the closest is LightCompress's, which the shared reference's field-notes.md reports to use this
  CLS substitute at the tower's last layer with the window order undone (its code was not read for this adapter).
  A visual token's score is the mean of its four patches; its hidden vector the concatenation of its four patches' outputs (what the merger takes, so merged
  tokens average groups before the merger's norm and MLP, as LLaVA's merge before the projector); its key the mean
  of its patches' keys (before the rotary embedding: content, not place). The tower orders patches by attention
  window; the view undoes that order (`get_vision_window_index`), as the tower's own output does. The tower runs
  without its merger there: the encoder cut projects only the tokens it keeps and merges.
- Images of different sizes are encoded one at a time (`image_groups`), so a policy sees equal token counts.
Videos: decoder-side cuts see a video's tokens as the sample's visual block (one video per sample), frame (temporal
grid) after frame (`video_frames`), keeping their M-RoPE positions; encoder cuts take images only and refuse
videos; the tower's attention (`tower_functions`) is shown for videos too, per temporal grid at the last
full-attention block (each grid attends within itself there).
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessorPil,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
from transformers.processing_utils import ProcessorMixin
from transformers.vision_utils import get_vision_window_index

from ..core import Checkpoint, Dims, EncoderView, Images, ModelInfo, Shape, TokenIds
from .base import Family

NOMINAL_SIDE = 672  # the budgets' reference image: (672 / 28)^2 = 576 visual tokens, as LLaVA-1.5's
PATCH_SIZE, MERGE_SIZE, TEMPORAL_PATCH = 14, 2, 2
FULL_ATTENTION_BLOCKS = [7, 15, 23, 31]  # Qwen2.5-VL-7B's tower: 32 blocks, windows of 112 pixels elsewhere
WINDOW_SIZE = 112
MROPE_SECTION = [16, 24, 24]  # temporal, height, width shares of head_dim / 2 = 64 (7B)
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 16384  # the checkpoint's image processor defaults
SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                  "<|video_pad|>")
QUERY_CHUNK = 1024  # query rows per step of the encoder view's attention (bounds its memory)
CHAT_TEMPLATE = (  # Qwen2.5-VL-Instruct's, for images and text
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class Qwen2_5_VLImageTextProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL's processor for images and text, without the video processor (whose lookup needs torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


@contextlib.contextmanager
def captured_blocks(tower: nn.Module,
                    blocks: Iterable[int]) -> Iterator[dict[int, tuple[Tensor, tuple[Tensor, Tensor]]]]:
    """Inside, the tower's runs note each of `blocks`' attention inputs: block -> (hidden states [P, D], rotary
    (cos, sin)), filled as the tower runs (once)."""
    captured = {}

    def grab(index, module, args, kwargs):
        if index in captured:  # the rows would describe one of the runs only
            raise RuntimeError("the vision tower ran more than once in one captured encoding")
        captured[index] = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0],
                           kwargs["position_embeddings"])

    hooks = [tower.blocks[i].attn.register_forward_pre_hook(functools.partial(grab, i), with_kwargs=True)
             for i in blocks]
    try:
        yield captured
    finally:
        for hook in hooks:
            hook.remove()


def received_heads(attn: nn.Module, x: Tensor, rotary: tuple[Tensor, Tensor], crops: int, unit: int,
                   raster: Tensor) -> tuple[Tensor, Tensor]:
    """The mean attention each visual token receives from its crop at a tower block [N, H, T] (raster order), and
    its keys [N, H, T, hd], from the block's attention input x [P, D] and rotary (cos, sin) of one image's `crops`
    (temporal patches, each attending within itself); a token is `unit` patches, `raster` undoes the window order."""
    cos, sin = rotary
    n_patches, heads = x.shape[0] // crops, attn.num_heads
    q, k, _ = attn.qkv(x).reshape(x.shape[0], 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
    q_rot, k_rot = (t.transpose(0, 1) for t in apply_rotary_pos_emb_vision(q, k, cos, sin))  # [H, P, hd]
    total = q.new_zeros(crops, heads, n_patches, dtype=torch.float32)
    for crop, (q_crop, k_crop) in enumerate(zip(q_rot.split(n_patches, 1), k_rot.split(n_patches, 1))):
        for rows in q_crop.split(QUERY_CHUNK, dim=1):  # every patch attends to every patch of its crop
            total[crop] += ((rows @ k_crop.transpose(-1, -2)) * attn.scaling).softmax(-1, dtype=torch.float32).sum(1)
    total /= n_patches
    n_tokens = n_patches // unit
    keys = k.reshape(crops * n_tokens, unit, heads, -1).mean(1)[raster]
    importance = total.view(crops, heads, n_tokens, unit).mean(-1).transpose(0, 1).reshape(heads, -1)
    return (importance[:, raster].view(heads, crops, n_tokens).transpose(0, 1).to(x.dtype),
            keys.view(crops, n_tokens, heads, -1).transpose(1, 2))


class Qwen2_5_VL(Family):
    model_class = Qwen2_5_VLForConditionalGeneration
    nominal_side = NOMINAL_SIDE  # pixels of the budgets' reference image's side
    title = "Qwen2.5-VL"  # in error messages
    #: encoder cuts take images only (`feature_functions`); the tower's attention is read for videos too
    tower_functions = {"image": "get_image_features", "video": "get_video_features"}
    sample_sizes = ((224, 224), (280, 196), (168, 336))  # 64, 70, 72 visual tokens
    nominal_size = (NOMINAL_SIDE, NOMINAL_SIDE)
    checkpoints = (Checkpoint(
        "qwen2.5-vl-7b", "Qwen/Qwen2.5-VL-7B-Instruct", "qwen2_5_vl",
        Shape(hidden=3584, intermediate=18944, layers=28, heads=28, vision_hidden=1280, vision_intermediate=3420,
              vision_layers=32, vision_heads=16, kv_heads=4),
        TokenIds(vocab=152064, image=151655, bos=151643, eos=151645, pad=151643,
                 special={"<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|video_pad|>": 151656}),
        1e-6, budget=64),)
    image_aspect_ratio = "none"  # dynamic resolution takes any aspect ratio
    conv_template = "chat_template"
    fixed_positions = True
    image_token = "<|image_pad|>"
    special_tokens = SPECIAL_TOKENS

    # -- parts ---------------------------------------------------------------------------------------------------
    def multimodal(self, model: nn.Module) -> nn.Module:
        return model.model

    def language_model(self, model: nn.Module) -> nn.Module:
        return model.model.language_model

    def decoder_layers(self, lm: nn.Module) -> nn.ModuleList:
        return lm.layers

    def final_norm(self, lm: nn.Module) -> nn.Module:
        return lm.norm

    def vision_tower(self, model: nn.Module) -> nn.Module:
        return model.model.visual

    def projector(self, model: nn.Module) -> Callable[[Tensor], Tensor]:
        """The merger on visual tokens given as their four patches' vectors concatenated: [N, k, 4 D] -> [N, k, D']."""
        merger = self.vision_tower(model).merger
        width = merger.ln_q.weight.shape[0]  # D, one patch's

        def project(groups: Tensor) -> Tensor:
            return merger(groups.reshape(-1, width)).view(*groups.shape[:2], -1)

        return project

    # -- config facts --------------------------------------------------------------------------------------------
    def flops_dims(self, config: Any) -> Dims:
        """On the nominal 672x672 image (the FLOPs count's convention, `efficiency.flops`)."""
        text, vision = config.text_config, config.vision_config
        side, unit = self.nominal_side // vision.patch_size, vision.spatial_merge_size ** 2
        return Dims(
            hidden=text.hidden_size, intermediate=text.intermediate_size, n_layers=text.num_hidden_layers,
            vocab=text.vocab_size, n_heads=text.num_attention_heads, n_kv_heads=text.num_key_value_heads,
            head_dim=text.hidden_size // text.num_attention_heads, vision_hidden=vision.hidden_size,
            vision_intermediate=vision.intermediate_size, vision_layers=vision.depth, vision_heads=vision.num_heads,
            vision_tokens=side * side, patch_size=vision.patch_size, projector_in=vision.hidden_size * unit,
            visual_per_crop=side * side // unit, model_type=config.model_type, vision_cls=0,
            patch_channels=vision.in_channels * vision.temporal_patch_size, vision_mlp=3,
            vision_windowed_layers=vision.depth - len(vision.fullatt_block_indexes),
            vision_window=(vision.window_size // vision.patch_size) ** 2, projector_mid=vision.hidden_size * unit,
        )

    def model_info(self, config: Any) -> ModelInfo:
        vision = config.vision_config
        side = self.nominal_side // (vision.patch_size * vision.spatial_merge_size)
        return ModelInfo(n_visual=side * side, n_layers=config.text_config.num_hidden_layers,
                         vision_layer=vision.depth - 1, cls_kept=False, tower_cls=False)

    # -- visual tokens -------------------------------------------------------------------------------------------
    def has_images(self, kwargs: dict[str, Any]) -> bool:
        encoded = kwargs.get("mm_encoder_outputs") or {}
        return any(kwargs.get(key) is not None for key in ("pixel_values", "pixel_values_videos")) \
            or any(encoded.get(m) is not None for m in ("image", "video"))

    def image_token_mask(self, model: nn.Module, input_ids: Tensor | None,
                         inputs_embeds: Tensor | None) -> Tensor | None:
        """Image and video tokens: a video's block is its frames' tokens (`video_frames`)."""
        if input_ids is None:
            return super().image_token_mask(model, input_ids, inputs_embeds)
        return (input_ids == model.config.image_token_id) | (input_ids == model.config.video_token_id)

    def video_frames(self, model: nn.Module, input_ids: Tensor | None, kwargs: dict[str, Any]) -> Tensor | None:
        """A video's temporal grids: a frame is a grid of `temporal_patch_size` (2) input frames, h * w / 4 tokens.

        From `video_grid_thw` (one row per video, in batch order) where the forward has it; in generate(), which
        encodes the videos beforehand and passes their M-RoPE positions instead, the times the block's (row,
        column) position returns to its first token's."""
        if input_ids is None:
            return None
        video = input_ids == model.config.video_token_id
        frames = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
        if not video.any():
            return frames
        grids, positions = kwargs.get("video_grid_thw"), kwargs.get("position_ids")
        if grids is not None:
            if int(video.any(1).sum()) != grids.shape[0]:
                raise ValueError(f"{grids.shape[0]} video grids for {int(video.any(1).sum())} samples with a video: "
                                 "one video per sample is supported")
            frames[video.any(1)] = grids[:, 0].to(frames.device)
        elif positions is not None and positions.dim() == 3:
            for b in video.any(1).nonzero()[:, 0].tolist():
                rows, cols = positions[-2, b, video[b]], positions[-1, b, video[b]]
                frames[b] = int(((rows == rows[0]) & (cols == cols[0])).sum())
        else:
            raise ValueError("a Qwen2.5-VL forward with video tokens needs video_grid_thw or the M-RoPE position_ids")
        return frames

    # -- positions -----------------------------------------------------------------------------------------------
    def positions(self, mask: Tensor, position_ids: Tensor | None) -> Tensor:
        if position_ids is None:  # only text: the model would count real tokens on every axis
            position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
        if position_ids.dim() == 2:
            position_ids = position_ids.unsqueeze(0)
        elif position_ids.shape[0] == 4:  # generate() puts the text positions (for packed masks) first
            position_ids = position_ids[1:]
        return position_ids.expand(3, mask.shape[0], -1)

    def merged_position(self, block: Tensor) -> Tensor:
        """The centre of the block's grid on each axis (for a whole image: its middle row and column)."""
        return (block.amin(-1) + block.amax(-1)) // 2

    # -- encoder cut ---------------------------------------------------------------------------------------------
    def images(self, model: nn.Module, pixel_values: Tensor, args: tuple, kwargs: dict[str, Any]) -> Images:
        grid = kwargs.get("image_grid_thw", args[0] if args else None)
        if grid is None:
            raise ValueError(f"{self.title} image features need image_grid_thw (the processor returns it)")
        return Images(pixel_values, [1] * grid.shape[0], self.vision_tower(model).config.depth - 1, "full", grid)

    def visual_inputs(self, model: nn.Module, modality: str, args: tuple, kwargs: dict[str, Any]) -> Images:
        """Images, or videos whose temporal patches are the crops (`get_video_features(pixel_values_videos,
        video_grid_thw)`: Qwen3-VL's encoder cuts, and on Qwen2.5-VL the tower's attention, `tower_functions`)."""
        if modality == "image":
            return super().visual_inputs(model, modality, args, kwargs)
        pixels = args[0] if args else kwargs["pixel_values_videos"]
        grid = args[1] if len(args) > 1 else kwargs.get("video_grid_thw")
        if grid is None:
            raise ValueError("video features need video_grid_thw (the processor returns it)")
        return Images(pixels, grid[:, 0].tolist(), self.vision_tower(model).config.depth - 1, "full", grid, "video")

    def image_groups(self, images: Images) -> list[Images]:
        """One image (or video) at a time: its patches (rows of the pixels), its grid, its temporal patches."""
        patches = images.sizes.prod(-1).tolist()
        return [Images(pixels, [crops], images.feature_layer, images.select_strategy, images.sizes[i:i + 1],
                       images.modality)
                for i, (pixels, crops) in enumerate(zip(images.pixels.split(patches), images.crops))]

    def encoder_view(self, model: nn.Module, images: Images, eager_encoder: bool = False,
                     scan_layers: tuple[int, ...] = (), received: bool = False, merge: Any = None) -> EncoderView:
        """The tower's output and the mean attention received at its last full-attention block, per visual token
        (and at the `scan_layers` blocks, in `importance_at`, computed over the whole image as at a full-attention
        block); the crops of the view are the images' temporal patches where there are several (a Qwen3-VL video),
        each attending within itself.

        `eager_encoder` changes nothing here: the tower's attention gives no probabilities to read (no official code
        to be bit-identical with), the row is recomputed either way, and images are encoded one at a time anyway.
        `received`: the same mean attention received at any block, on demand (over the whole image, as at the
        full-attention blocks), mean over heads, queries and each token's 4 patches. `merge` is ignored: merging
        inside the windowed tower would break its 2x2 merger groups."""
        tower = self.vision_tower(model)
        config = tower.config
        last_full = self.scoring_block(config)
        bypassed = self.bypassed_mergers(tower)
        for merger, forward in bypassed.items():  # projected later: only what is kept
            merger.forward = forward
        try:
            blocks = range(len(tower.blocks)) if received else {last_full, *scan_layers}
            with captured_blocks(tower, blocks) as captured:
                out = tower(images.pixels.type(tower.dtype), grid_thw=images.sizes)
        finally:
            for merger in bypassed:
                del merger.forward
        unit, crops = config.spatial_merge_size ** 2, images.crops[0]
        raster = self.raster_order(images, config).to(out.last_hidden_state.device)

        def heads_at(index: int) -> tuple[Tensor, Tensor]:
            return received_heads(tower.blocks[index].attn, *captured[index], crops, unit, raster)

        importance, keys = heads_at(last_full)
        n_tokens = importance.shape[-1]
        hidden = out.last_hidden_state.reshape(crops * n_tokens, -1)[raster].view(crops, n_tokens, -1)  # [N, T, 4 D]
        nominal = self.model_info(model.config).per_crop
        _, _, cols = (int(n) // config.spatial_merge_size for n in images.sizes[0])
        return EncoderView(hidden, importance, keys, has_cls=False, share=n_tokens / nominal,
                           importance_at={i: heads_at(i)[0] for i in scan_layers},
                           grid=(n_tokens // cols, cols),
                           received=(lambda block: heads_at(block)[0].mean(1)) if received else None,
                           side=self.side_of(out, raster, crops, n_tokens))

    def tower_attention(self, model: nn.Module, images: Images, encode: Callable[[], Any]) -> tuple[Any, list[Tensor]]:
        """The scoring block's input captured in the host's own tower pass over every image of the call, split per
        image (each image's patches lie together, in its own window order), each scored as `encoder_view` scores
        it alone."""
        tower = self.vision_tower(model)
        config = tower.config
        block = self.scoring_block(config)
        with captured_blocks(tower, (block,)) as captured:
            out = encode()
        x, (cos, sin) = captured[block]
        patches = images.sizes.prod(-1).tolist()
        rows = []
        with torch.no_grad():
            for group, x_image, cos_image, sin_image in zip(self.image_groups(images), x.split(patches),
                                                            cos.split(patches), sin.split(patches)):
                raster = self.raster_order(group, config).to(x.device)
                importance, _ = received_heads(tower.blocks[block].attn, x_image, (cos_image, sin_image),
                                               group.crops[0], config.spatial_merge_size ** 2, raster)
                rows.append(importance.float().mean(1))
        return out, rows

    def scoring_block(self, config: Any) -> int:
        """The tower block whose attention received scores the tokens: the last full-attention one (31 of 32)."""
        return config.fullatt_block_indexes[-1]

    def bypassed_mergers(self, tower: nn.Module) -> dict[nn.Module, Callable[[Tensor], Tensor]]:
        """The tower's mergers and what they do instead in the encoder view's run (the cut projects later)."""
        unit = tower.config.spatial_merge_size ** 2
        return {tower.merger: lambda x: x[::unit]}

    def raster_order(self, images: Images, config: Any) -> Tensor:
        """The tower's output tokens (2x2 groups) of the call in raster order: the window order undone."""
        window_index, _ = get_vision_window_index(images.sizes, config.spatial_merge_size, config.window_size,
                                                  config.patch_size)
        return torch.argsort(window_index)

    def side_of(self, out: Any, raster: Tensor, crops: int, n_tokens: int) -> Tensor | None:
        """The view's side features from the tower's output (none here; Qwen3-VL's DeepStack)."""
        return None

    image_layout_key = "image_grid_thw"

    def patch_grid(self, config: Any) -> tuple[int, int]:
        """The nominal image's token grid (24 x 24), onto which every image's own grid is scaled."""
        vision = config.vision_config
        return 1, self.nominal_side // (vision.patch_size * vision.spatial_merge_size)

    def patch_cells(self, model: nn.Module, image_size: Tensor | None,
                    modality: str = "image") -> Tensor:
        """Each visual token (a 2x2 patch group, raster order) at its relative place in the nominal grid: row r of
        an image h tokens high lands in row r * 24 // h (several tokens share a cell on large images, cells stay
        empty on small ones)."""
        if image_size is None:
            raise ValueError(f"{self.title}'s visual tokens depend on the image size: pass the processor's "
                             "image_grid_thw")
        _, side = self.patch_grid(model.config)
        merge = model.config.vision_config.spatial_merge_size
        t, h, w = (int(n) for n in image_size)
        rows, cols = h // merge, w // merge
        token = torch.arange(t * rows * cols) % (rows * cols)
        return torch.stack([torch.zeros_like(token), token // cols * side // rows, token % cols * side // cols], 1)

    def lay_out(self, model: nn.Module, images: Images, image: int, feats: Tensor, keep: Tensor, n_merged: int,
                tokens: int, native_layout: bool) -> tuple[Tensor, Tensor, int]:
        """An image's tokens, or a video's temporal patches one after the other, each [kept, merged]."""
        frame = torch.arange(keep.shape[0], device=keep.device).unsqueeze(1) * tokens
        origins = torch.cat([keep + frame, keep.new_full((keep.shape[0], n_merged), -1)], 1).flatten()
        return feats.flatten(0, 1), origins, keep.shape[0] * tokens

    def example_image(self, config: Any, generator: torch.Generator,
                      size: tuple[int, int] | None = None) -> tuple[int, dict[str, Tensor]]:
        """An image of `size` (height, width; default the nominal 672x672: 48 x 48 patches, 576 visual tokens), in
        multiples of the merged patch (28 pixels)."""
        vision = config.vision_config
        height, width = size or (self.nominal_side, self.nominal_side)
        unit = vision.patch_size * vision.spatial_merge_size
        if height % unit or width % unit:
            raise ValueError(f"{self.title} example images are multiples of {unit} pixels, got {height}x{width}")
        rows, cols = height // vision.patch_size, width // vision.patch_size
        grid = torch.tensor([[1, rows, cols]])
        channels = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
        pixels = torch.randn(rows * cols, channels, generator=generator)
        return rows * cols // vision.spatial_merge_size ** 2, {"pixel_values": pixels, "image_grid_thw": grid}

    text_before_image = 15  # "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n" + start

    def example_inputs(self, config: Any, text_tokens: int, generator: torch.Generator,
                       image_size: tuple[int, int] | None = None) -> dict[str, Tensor]:
        """The base prompt with the image between <|vision_start|> and <|vision_end|> (two of its text tokens) and
        the token types M-RoPE's positions are built from."""
        inputs = super().example_inputs(config, text_tokens, generator, image_size)
        ids = inputs["input_ids"][0]
        image = ids == config.image_token_id
        first, count = int(image.long().argmax()), int(image.sum())
        ids[first - 1], ids[first + count] = config.vision_start_token_id, config.vision_end_token_id
        return {**inputs, "mm_token_type_ids": image.int()[None]}

    # -- building ------------------------------------------------------------------------------------------------
    def build_config(self, shape: Shape, ids: TokenIds, init_std: float = 0.02, norm_eps: float = 1e-6) -> Any:
        """Qwen2.5-VL-7B-Instruct's layout (32-block windowed ViT with full attention in blocks 7/15/23/31, 2x2
        merger, M-RoPE decoder with grouped-query attention) at `shape`; M-RoPE's sections scaled to the head."""
        head_dim = shape.hidden // shape.heads
        section = [s * head_dim // 128 for s in MROPE_SECTION[1:]]
        section = [head_dim // 2 - sum(section), *section]
        text = dict(
            vocab_size=ids.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
            num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
            num_key_value_heads=shape.kv_heads or shape.heads, max_position_embeddings=128000, rms_norm_eps=norm_eps,
            initializer_range=init_std, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                         "mrope_section": section},
            bos_token_id=ids.bos, eos_token_id=ids.eos, pad_token_id=ids.pad, tie_word_embeddings=False,
        )
        full = [round((i + 1) * shape.vision_layers / 32) - 1 for i in FULL_ATTENTION_BLOCKS]  # by relative depth
        # ids without Qwen's special tokens (the FLOPs proxy): placed around the image token as in the checkpoint
        special = {"<|vision_start|>": ids.image - 3, "<|vision_end|>": ids.image - 2,
                   "<|video_pad|>": ids.image + 1} | ids.special
        vision = dict(
            depth=shape.vision_layers, hidden_size=shape.vision_hidden, intermediate_size=shape.vision_intermediate,
            num_heads=shape.vision_heads, out_hidden_size=shape.hidden, patch_size=PATCH_SIZE,
            spatial_merge_size=MERGE_SIZE, temporal_patch_size=TEMPORAL_PATCH, window_size=WINDOW_SIZE,
            fullatt_block_indexes=full, initializer_range=init_std,
        )
        return Qwen2_5_VLConfig(
            text_config=text, vision_config=vision, image_token_id=ids.image,
            video_token_id=special["<|video_pad|>"], vision_start_token_id=special["<|vision_start|>"],
            vision_end_token_id=special["<|vision_end|>"], tie_word_embeddings=False,
            bos_token_id=ids.bos, eos_token_id=ids.eos, pad_token_id=ids.pad,
        )

    #: the processor built around the tokenizer and image processor, the chat template where the checkpoint has
    #: none, and the image processor settings of the real checkpoints
    processor_class: type = Qwen2_5_VLImageTextProcessor
    chat_template: str = CHAT_TEMPLATE
    image_processor_options: dict[str, Any] = dict(
        min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=PATCH_SIZE, merge_size=MERGE_SIZE,
        temporal_patch_size=TEMPORAL_PATCH, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)

    def build_processor(self, tokenizer: Any) -> Any:
        tokenizer.chat_template = self.chat_template
        image_processor = Qwen2VLImageProcessorPil(**self.image_processor_options)
        return self.processor_class(image_processor=image_processor, tokenizer=tokenizer,
                                    chat_template=self.chat_template)

    def load_processor(self, path: str, min_pixels: int | None = None, max_pixels: int | None = None) -> Any:
        """The checkpoint's image processor and tokenizer (its chat template, else this adapter's copy of the
        Instruct checkpoint's) as the adapter's processor; `min_pixels` / `max_pixels` bound the resized image's
        area (the processor's own defaults otherwise)."""
        bounds = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
        image_processor = AutoImageProcessor.from_pretrained(path, **bounds)
        tokenizer = AutoTokenizer.from_pretrained(path)
        return self.processor_class(image_processor=image_processor, tokenizer=tokenizer,
                                    chat_template=tokenizer.chat_template or self.chat_template)


QWEN2_5_VL = Qwen2_5_VL()
