"""LLaVA-1.5 (`LlavaForConditionalGeneration`): a CLIP tower, a 2-layer GELU projector, a Llama decoder, 1-D RoPE."""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from ..core import Checkpoint, Dims, EncoderView, Images, ModelInfo, Shape, TokenIds
from .base import Family

IMAGE_SIZE, PATCH_SIZE = 336, 14  # CLIP ViT-L/14-336, the tower of every LLaVA-1.5 and 1.6 checkpoint
CHAT_TEMPLATE = (  # llava-1.5 ("USER: <image>\n... ASSISTANT:") format
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def tower_layers(vision_tower: nn.Module) -> nn.ModuleList:
    try:  # CLIPVisionModel wraps a CLIPVisionTransformer; llava-hf builds the transformer directly
        return getattr(vision_tower, "vision_model", vision_tower).encoder.layers
    except AttributeError:
        raise TypeError(f"encoder-side pruning needs a CLIP-style vision tower, got {type(vision_tower).__name__}")


def feature_layer_index(vision_tower: nn.Module, vision_feature_layer: int) -> int:
    """0-based index of the tower layer whose output is `hidden_states[vision_feature_layer]`."""
    if not isinstance(vision_feature_layer, int):
        raise ValueError("encoder-side pruning needs a single vision_feature_layer, not a list")
    return vision_feature_layer % (len(tower_layers(vision_tower)) + 1) - 1


class TowerCapture:
    """The inputs of some layers' attention in a CLIP-style tower, captured with forward pre-hooks while the tower runs
    inside `with` (the engine's own call, or the host's encoding: `Family.tower_attention`), and their attention rows
    computed from them afterwards.

    By default the rows are recomputed from each layer's own q/k projections, so the tower keeps its SDPA attention;
    with `eager` (the tower running eager attention), the CLS rows, or the mean attention received at every layer
    where `received`, are the layers' own attention probabilities. `received`: every layer's input (or eager mean) is
    captured, for `received_at` at any layer. `cls`: token 0 is CLS, whose row `importance` gives; without (SigLIP),
    `importance` is the mean attention each token receives from all tokens of its crop.
    """

    def __init__(self, layers: nn.ModuleList, indices: Iterable[int], eager: bool = False, received: bool = False,
                 cls: bool = True):
        self.layers, self.indices, self.eager, self.received, self.cls = layers, set(indices), eager, received, cls
        self.captured: dict[tuple[str, int], Tensor] = {}
        self.means: dict[int, Tensor] = {}
        self.projected_keys: dict[int, Tensor] = {}
        self.hooks: list = []

    def __enter__(self) -> "TowerCapture":
        for index in self.indices:
            attn = self.layers[index].self_attn
            self.hooks.append(attn.register_forward_pre_hook(functools.partial(self._grab_input, index),
                                                             with_kwargs=True))
            if self.eager:
                self.hooks.append(attn.register_forward_hook(functools.partial(self._grab_probabilities, index)))
        if self.received:
            self.hooks += [
                layer.self_attn.register_forward_hook(functools.partial(self._grab_mean, i)) if self.eager else
                layer.self_attn.register_forward_pre_hook(functools.partial(self._grab_input, i), with_kwargs=True)
                for i, layer in enumerate(self.layers) if self.eager or i not in self.indices]
        return self

    def __exit__(self, *exc: Any) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []

    def _grab_input(self, index, module, args, kwargs):
        if ("x", index) in self.captured:  # the rows would describe one of the runs only
            raise RuntimeError("the vision tower ran more than once in one captured encoding")
        self.captured["x", index] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    def _grab_probabilities(self, index, module, args, output):
        self.captured["cls", index] = output[1][:, :, 0] if self.cls else output[1].mean(2)  # [N, H, T]

    def _grab_mean(self, index, module, args, output):
        self.means[index] = output[1].mean(dim=1).mean(dim=1)  # the official order: heads, then queries

    @staticmethod
    def _heads(attn: nn.Module, t: Tensor) -> Tensor:
        return t.view(*t.shape[:2], -1, attn.head_dim).transpose(1, 2)

    def probabilities(self, index: int, queries: slice) -> Tensor:
        """Layer `index`'s attention probabilities of the query rows `queries`, recomputed from its own q/k."""
        attn, x = self.layers[index].self_attn, self.captured["x", index]
        scores = (self._heads(attn, attn.q_proj(x[:, queries])) @ self.keys_of(index).transpose(-1, -2)) * attn.scale
        return scores.softmax(-1, dtype=torch.float32).to(x.dtype)

    def importance(self, index: int) -> Tensor:
        """Layer `index`'s importance rows [N, H, T] (`EncoderView.importance`): CLS's attention, or without CLS the
        mean attention each token receives from its crop (recomputed crop by crop: bounded memory)."""
        if self.eager:
            return self.captured["cls", index]
        if self.cls:
            return self.probabilities(index, slice(0, 1))[:, :, 0]
        attn, x = self.layers[index].self_attn, self.captured["x", index]
        rows = [((self._heads(attn, attn.q_proj(crop)) @ crop_keys.transpose(-1, -2)) * attn.scale).softmax(
            -1, dtype=torch.float32).mean(2) for crop, crop_keys in zip(x.split(1), self.keys_of(index).split(1))]
        return torch.cat(rows).to(x.dtype)

    def keys_of(self, index: int) -> Tensor:
        """Layer `index`'s keys [N, H, T, hd]."""
        if index not in self.projected_keys:
            attn = self.layers[index].self_attn
            self.projected_keys[index] = self._heads(attn, attn.k_proj(self.captured["x", index]))
        return self.projected_keys[index]

    def received_at(self, index: int) -> Tensor:
        """The attention each token receives at layer `index` [N, T], mean over the heads, then over every query."""
        if index not in self.means:  # recomputed from the layer's own q/k (the SDPA tower gives no probabilities)
            self.means[index] = self.probabilities(index, slice(None)).mean(dim=1).mean(dim=1)
        return self.means[index]


def clip_encoder_view(vision_tower: nn.Module, pixel_values: Tensor, layer_idx: int, eager_encoder: bool = False,
                      scan_layers: tuple[int, ...] = (), received: bool = False,
                      merge: Callable[[int, Tensor, Tensor], Tensor] | None = None, cls: bool = True) -> EncoderView:
    """Run a CLIP-style tower and capture layer `layer_idx`: its output, CLS attention row and keys (and the CLS rows
    of the `scan_layers` too, in `importance_at`).

    By default the CLS rows and the keys are recomputed from the layers' own projections (their inputs captured
    with forward pre-hooks, `TowerCapture`), so the tower keeps its SDPA attention. With `eager_encoder`, every layer
    runs eager attention and the CLS rows are the layers' own attention probabilities: bit-identical to official code
    that asks the tower for `output_attentions` (VisPruner, VScan), at the cost of the eager tower's speed and memory.
    `received`: the view also gives the attention each token receives at any layer (`EncoderView.received`), as
    `attentions[l].mean(1).mean(1)` of the eager probabilities, or recomputed on demand from the layer's input.
    `merge` (`Policy.merge_in_tower`): every layer up to `layer_idx` merges its tokens between its attention and
    its MLP (`merging_layers`), on its keys averaged over heads.
    A tower without CLS (`cls=False`: SigLIP) gives the mean attention each token receives from all tokens of its
    crop instead of the CLS row, the CLS substitute of `EncoderView`.
    """
    layers = tower_layers(vision_tower)
    capture = TowerCapture(layers, {layer_idx, *scan_layers}, eager_encoder, received, cls)
    with capture, _attention_implementation(vision_tower, "eager" if eager_encoder else None), \
            merging_layers(layers[:layer_idx + 1], merge):
        out = vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
    return EncoderView(out.hidden_states[layer_idx + 1], capture.importance(layer_idx), capture.keys_of(layer_idx),
                       importance_at={index: capture.importance(index) for index in scan_layers},
                       received=capture.received_at if received else None, merged_in_tower=merge is not None,
                       tokens=out.hidden_states[0].shape[1] if merge is not None else None, has_cls=cls)


def padded_cat(parts: Sequence[Tensor], dim: int) -> Tensor:
    """The images' tensors concatenated along the crops, zero-padded at the end of `dim` (their tokens) to the
    longest: a merge inside the tower (`Policy.merge_in_tower`) may leave each image its own count."""
    longest = max(t.shape[dim] for t in parts)
    return torch.cat([torch.cat([t, t.new_zeros(*t.shape[:dim], longest - t.shape[dim], *t.shape[dim + 1:])], dim)
                      for t in parts])


@contextlib.contextmanager
def merging_layers(layers: Sequence[nn.Module], merge: Callable[[int, Tensor, Tensor], Tensor] | None):
    """Inside, CLIP layer i runs attention, `merge(i, tokens, keys averaged over heads)`, then its MLP on the merged
    tokens (ToMe's place for the merge), or, for a `TowerMerge.at_output`, the whole layer and then
    `merge(i, output, output)`; the layers' own forward again afterwards. No-op for `merge` None."""
    if merge is None:
        yield
        return

    def merging_forward(layer: nn.Module, index: int, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if getattr(merge, "at_output", False):  # `TowerMerge.at_output`: the whole layer, then the merge
            out = type(layer).forward(layer, hidden_states, *args, **kwargs)
            return merge(index, out, out)
        keys = {}
        hook = layer.self_attn.k_proj.register_forward_hook(lambda m, a, out: keys.setdefault("k", out))
        try:
            attended, _ = layer.self_attn(layer.layer_norm1(hidden_states), *args, **kwargs)
        finally:
            hook.remove()
        hidden = hidden_states + attended
        k = keys["k"]
        metric = k.view(*k.shape[:2], -1, layer.self_attn.head_dim).transpose(1, 2).mean(1)  # [N, T, hd]
        hidden = merge(index, hidden, metric)
        return hidden + layer.mlp(layer.layer_norm2(hidden))

    for index, layer in enumerate(layers):
        layer.forward = functools.partial(merging_forward, layer, index)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


@contextlib.contextmanager
def _attention_implementation(vision_tower: nn.Module, implementation: str | None):
    """The tower runs with `implementation` inside (None: its own), and its own again afterwards."""
    config = vision_tower.config
    own = config._attn_implementation
    if implementation is not None:
        config._attn_implementation = implementation
    try:
        yield
    finally:
        config._attn_implementation = own


#: llava-hf's vocabulary, and a free id for Video-LLaVA's <video> (the LLaVA families ignore it)
LLAVA_HF_IDS = TokenIds(vocab=32064, image=32000, bos=1, eos=2, pad=32001, special={"<video>": 32002})
#: Vicuna-7B and CLIP ViT-L/14-336, the widths and depths of every LLaVA-7B checkpoint here
LLAVA_7B_SHAPE = Shape(hidden=4096, intermediate=11008, layers=32, heads=32, vision_hidden=1024,
                       vision_intermediate=4096, vision_layers=24, vision_heads=16)


class Llava(Family):
    model_class = LlavaForConditionalGeneration
    checkpoints = (Checkpoint("llava-1.5-7b", "llava-hf/llava-1.5-7b-hf", "llava", LLAVA_7B_SHAPE, LLAVA_HF_IDS, 1e-5,
                              budget=64, paper="LLaVA-1.5-7B"),)
    config_class = LlavaConfig
    image_aspect_ratio = "pad"  # LLaVA-1.5's evaluation expands images to a square
    conv_template = "vicuna_v1"
    image_size = IMAGE_SIZE  # the vision tower's input side, in pixels
    tower_cls = True  # the vision tower has a CLS token (CLIP; SigLIP has none)
    #: `get_image_features`' positional arguments after pixel_values
    image_feature_args: tuple[str, ...] = ("vision_feature_layer", "vision_feature_select_strategy")

    # -- parts ---------------------------------------------------------------------------------------------------
    def multimodal(self, model: nn.Module) -> nn.Module:
        return model.model

    def language_model(self, model: nn.Module) -> nn.Module:
        return model.model.language_model

    def decoder_layers(self, lm: nn.Module) -> nn.ModuleList:
        return lm.layers[: lm.config.num_hidden_layers]

    def final_norm(self, lm: nn.Module) -> nn.Module:
        return lm.norm

    def projector(self, model: nn.Module) -> nn.Module:
        return model.model.multi_modal_projector

    def vision_tower(self, model: nn.Module, modality: str = "image") -> nn.Module:
        """The tower that encodes `modality` (`Images.modality`); LLaVA has one."""
        return model.model.vision_tower

    # -- config facts --------------------------------------------------------------------------------------------
    def nominal_crops(self, config: Any) -> int:
        """Vision-tower crops of one image (the budgets' reference)."""
        return 1

    def model_info(self, config: Any) -> ModelInfo:
        vision = config.vision_config
        cls_kept = config.vision_feature_select_strategy == "full"
        layer = config.vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError("models that concatenate several vision_feature_layers are not supported")
        per_crop = (vision.image_size // vision.patch_size) ** 2 + int(cls_kept)
        crops = self.nominal_crops(config)
        return ModelInfo(n_visual=per_crop * crops, n_layers=config.text_config.num_hidden_layers,
                         vision_layer=layer % (vision.num_hidden_layers + 1) - 1, cls_kept=cls_kept, crops=crops)

    def flops_dims(self, config: Any) -> Dims:
        text, vision = config.text_config, config.vision_config
        feature_layer = config.vision_feature_layer
        patches = (vision.image_size // vision.patch_size) ** 2
        return Dims(
            hidden=text.hidden_size, intermediate=text.intermediate_size, n_layers=text.num_hidden_layers,
            vocab=text.vocab_size, n_heads=text.num_attention_heads,
            n_kv_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
            vision_hidden=vision.hidden_size, vision_intermediate=vision.intermediate_size,
            vision_layers=vision.num_hidden_layers, vision_heads=vision.num_attention_heads,
            vision_tokens=patches + 1, patch_size=vision.patch_size,
            projector_in=vision.hidden_size * (1 if isinstance(feature_layer, int) else len(feature_layer)),
            visual_per_crop=patches + int(config.vision_feature_select_strategy == "full"),
            crops=self.nominal_crops(config), model_type=config.model_type,
        )

    # -- positions ------------------------------------------------------------------------------------------
    def positions(self, mask: Tensor, position_ids: Tensor | None) -> Tensor:
        if position_ids is None:
            position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return position_ids.expand(mask.shape[0], -1)

    def renumbered(self, first: Tensor, length: int) -> Tensor:
        return first + torch.arange(length, device=first.device)

    # -- encoder cut ---------------------------------------------------------------------------------------------
    def images(self, model: nn.Module, pixel_values: Tensor, args: tuple, kwargs: dict[str, Any]) -> Images:
        kwargs = {**kwargs, **dict(zip(self.image_feature_args, args))}
        layer = kwargs.get("vision_feature_layer")
        layer = model.config.vision_feature_layer if layer is None else layer
        strategy = kwargs.get("vision_feature_select_strategy") or model.config.vision_feature_select_strategy
        return Images(pixel_values, [1] * pixel_values.shape[0], layer, strategy, kwargs.get("image_sizes"))

    def example_image(self, config: Any, generator: torch.Generator,
                      size: tuple[int, int] | None = None) -> tuple[int, dict[str, Tensor]]:
        vision = config.vision_config
        if size is not None and tuple(size) != (vision.image_size,) * 2:
            raise ValueError(f"LLaVA-1.5 resizes every image to {vision.image_size}x{vision.image_size} (always "
                             f"the same visual tokens); got size {tuple(size)}: use LLaVA-NeXT for larger images")
        side = vision.image_size // vision.patch_size
        tokens = side * side + int(config.vision_feature_select_strategy == "full")
        pixels = torch.randn(1, 3, vision.image_size, vision.image_size, generator=generator)
        return tokens, {"pixel_values": pixels}

    def encoder_view(self, model: nn.Module, images: Images, eager_encoder: bool = False,
                     scan_layers: tuple[int, ...] = (), received: bool = False,
                     merge: Callable[[int, Tensor, Tensor], Tensor] | None = None) -> EncoderView:
        tower = self.vision_tower(model, images.modality)
        layer = feature_layer_index(tower, images.feature_layer)
        if not eager_encoder:
            return clip_encoder_view(tower, images.pixels, layer, False, scan_layers, received, merge, self.tower_cls)
        # image by image (its crops together), as the official evaluations run: bit-exact whatever the batch
        views = [clip_encoder_view(tower, pixels, layer, True, scan_layers, received, merge, self.tower_cls)
                 for pixels in images.pixels.split(images.crops)]
        view = EncoderView(*(padded_cat(parts, dim) for parts, dim in zip(
                               zip(*((v.hidden, v.importance, v.keys) for v in views)), (1, 2, 2))),
                           importance_at={i: padded_cat([v.importance_at[i] for v in views], 2) for i in scan_layers},
                           merged_in_tower=merge is not None, tokens=views[0].tokens, has_cls=self.tower_cls)
        counts = [v.hidden.shape[1] for v in views]
        if len(set(counts)) > 1:  # a merge inside the tower left the images different counts: the rest is padding
            view.valid = torch.arange(max(counts), device=view.hidden.device) < torch.tensor(
                [n for n, v in zip(counts, views) for _ in range(v.hidden.shape[0])], device=view.hidden.device)[:, None]
        if received:
            view.received = lambda at: torch.cat([v.received(at) for v in views])
        return view

    def tower_attention(self, model: nn.Module, images: Images, encode: Callable[[], Any]) -> tuple[Any, list[Tensor]]:
        """The feature layer's input captured in the host's own tower pass; with CLS, the mean attention each token
        receives from every query (CLS included); without, the importance rows as the view scores by
        (`crop_rows`), mean over heads."""
        tower = self.vision_tower(model, images.modality)
        layer = feature_layer_index(tower, images.feature_layer)
        with TowerCapture(tower_layers(tower), (layer,), cls=self.tower_cls) as capture:
            out = encode()
        with torch.no_grad():
            if self.tower_cls:
                return out, [capture.received_at(layer)]
            return out, [self.crop_rows(model, images, capture.importance(layer)).float().mean(1)]

    def crop_rows(self, model: nn.Module, images: Images, rows: Tensor) -> Tensor:
        """Rows [N, H, T] over each crop's tower tokens as rows over the crop's visual tokens (the same here;
        LLaVA-OneVision pools a video's frames)."""
        return rows

    def lay_out(self, model: nn.Module, images: Images, image: int, feats: Tensor, keep: Tensor, n_merged: int,
                tokens: int, native_layout: bool) -> tuple[Tensor, Tensor, int]:
        cls_offset = 1 if images.select_strategy == "default" else 0  # "default" drops CLS from the visual tokens
        origins = torch.cat([keep[0] - cls_offset, keep.new_full((n_merged,), -1)]).clamp(min=-1)
        return feats[0], origins, tokens - cls_offset

    # -- where the visual tokens come from ------------------------------------------------------------------------
    def patch_grid(self, config: Any) -> tuple[int, int]:
        return self.nominal_crops(config), config.vision_config.image_size // config.vision_config.patch_size

    def patch_cells(self, model: nn.Module, image_size: Tensor | None,
                    modality: str = "image") -> Tensor:
        """One crop in raster order, after CLS where the visual tokens keep it ("full")."""
        _, side = self.patch_grid(model.config)
        patch = torch.arange(side * side)
        cells = torch.stack([torch.zeros_like(patch), patch // side, patch % side], dim=1)
        if model.config.vision_feature_select_strategy == "full":
            cells = torch.cat([cells.new_full((1, 3), -1), cells])
        return cells

    # -- building ------------------------------------------------------------------------------------------------
    def build_config(self, shape: Shape, ids: TokenIds, init_std: float = 0.02, norm_eps: float = 1e-6) -> Any:
        """llava-hf's layout (CLIP ViT at 336/14, vision_feature_layer=-2, 2-layer GELU projector, Llama)."""
        vision = CLIPVisionConfig(
            image_size=self.image_size, patch_size=PATCH_SIZE, num_hidden_layers=shape.vision_layers,
            hidden_size=shape.vision_hidden, intermediate_size=shape.vision_intermediate,
            num_attention_heads=shape.vision_heads, hidden_act="quick_gelu",
            initializer_range=init_std,  # CLIP scales attention/MLP init by width; this widens the embeddings
        )
        text = LlamaConfig(
            vocab_size=ids.vocab, num_hidden_layers=shape.layers, hidden_size=shape.hidden,
            intermediate_size=shape.intermediate, num_attention_heads=shape.heads, num_key_value_heads=shape.heads,
            max_position_embeddings=4096, initializer_range=init_std, rms_norm_eps=norm_eps,
            bos_token_id=ids.bos, eos_token_id=ids.eos, pad_token_id=ids.pad,
        )
        return self.config_class(
            vision_config=vision, text_config=text, image_token_index=ids.image,
            image_seq_length=(self.image_size // PATCH_SIZE) ** 2, vision_feature_layer=-2,
            vision_feature_select_strategy="default", projector_hidden_act="gelu",
            bos_token_id=ids.bos, eos_token_id=ids.eos, pad_token_id=ids.pad, **self.extra_config(),
        )

    def extra_config(self) -> dict[str, Any]:
        """Config fields of this family beyond LLaVA-1.5's."""
        return {}

    def build_processor(self, tokenizer: Any) -> Any:
        # The PIL backends need no torchvision. They save under the torchvision class name, so AutoProcessor picks
        # the torchvision backend where that is installed, as for the real checkpoints, and the PIL one otherwise.
        return LlavaProcessor(image_processor=CLIPImageProcessorPil(**self.image_processor_kwargs()),
                              **self.processor_kwargs(tokenizer))

    def image_processor_kwargs(self) -> dict[str, Any]:
        return dict(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                    do_center_crop=True, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)

    def processor_kwargs(self, tokenizer: Any) -> dict[str, Any]:
        return dict(tokenizer=tokenizer, patch_size=PATCH_SIZE, vision_feature_select_strategy="default",
                    num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)  # 1: the CLS token


LLAVA = Llava()
