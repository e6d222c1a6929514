"""The encoder-side cut: reduce a vision tower layer's output before the projector.

The CLS attention row and the keys of that one layer are recomputed from its own projections (captured with a
forward pre-hook), so the tower keeps its SDPA attention.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .attention import _rows
from .policy import EncoderView, Policy


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


def encoder_view(vision_tower: nn.Module, pixel_values: Tensor, layer_idx: int) -> EncoderView:
    """Run the tower and capture what an encoder-side policy needs from layer `layer_idx`."""
    attn = tower_layers(vision_tower)[layer_idx].self_attn
    captured = {}

    def grab(module, args, kwargs):
        captured["x"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    hook = attn.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        out = vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
    finally:
        hook.remove()
    x = captured["x"]
    heads = lambda t: t.view(*t.shape[:2], -1, attn.head_dim).transpose(1, 2)  # noqa: E731
    keys = heads(attn.k_proj(x))
    cls_query = heads(attn.q_proj(x[:, :1]))
    cls_attention = ((cls_query @ keys.transpose(-1, -2)) * attn.scale).softmax(-1, dtype=torch.float32)
    return EncoderView(out.hidden_states[layer_idx + 1], cls_attention[:, :, 0].to(x.dtype), keys)


def reduce_images(llava: nn.Module, policy: Policy, pixel_values: Tensor, vision_feature_layer: int,
                  select_strategy: str) -> tuple[Tensor, Tensor, Tensor]:
    """Project only the tokens an encoder-side policy keeps.

    Returns (features [N, S, D] zero-padded to the S placeholder slots the unpatched model fills per image,
    valid [N] the number of real rows, origins [N, S] original visual indices, -1 for CLS and merged tokens).
    """
    view = encoder_view(llava.vision_tower, pixel_values, feature_layer_index(llava.vision_tower,
                                                                              vision_feature_layer))
    sel = policy.select_encoder(view)
    tokens = _rows(view.hidden, sel.keep)
    n_merged = 0
    if sel.merged is not None:
        tokens, n_merged = torch.cat([tokens, sel.merged], dim=1), sel.merged.shape[1]
    features = llava.multi_modal_projector(tokens)
    cls_offset = 1 if select_strategy == "default" else 0  # "default" drops CLS from the model's visual tokens
    slots = view.hidden.shape[1] - cls_offset
    n, valid = features.shape[:2]
    if valid > slots:
        raise ValueError(f"{policy.name} keeps {valid} tokens per image but the model has {slots} image slots")
    origins = torch.cat([sel.keep - cls_offset, sel.keep.new_full((n, n_merged), -1)], dim=1).clamp(min=-1)
    padded = features.new_zeros(n, slots, features.shape[-1])
    padded[:, :valid] = features
    return padded, torch.full((n,), valid, device=features.device), origins
