"""HiPrune's policy: anchor, buffer and register tokens from a middle and a deep vision layer, before the projector.

As the official code (github.com/Danielement321/HiPrune 6e83a12, `LLaVA/llava/model/llava_arch.py` `encode_images`,
environment `HIPRUNE_RETENTION=T HIPRUNE_ALPHA=0.1 HIPRUNE_OBJECT_LAYER=9`) does it on LLaVA-1.5:
- one encoder-side cut; every decoder layer sees the same T tokens, so the budget ("# Tokens") is T;
- score of a layer: its attention probabilities (the tower runs with `output_attentions`, eager), mean over the
  heads, then over every query (CLS included), at the patch columns: the attention each patch receives;
- anchors: the round(T x alpha / 5) patches scoring highest at the object layer (`HIPRUNE_OBJECT_LAYER` 9, 1-based:
  `attentions[8]`); buffers: their neighbours at index -1, +1, -24, +24, clamped to the image (so a patch at a row's
  start takes the previous row's last one, as the official index arithmetic does), duplicates removed;
- registers: the T - (anchors + buffers) highest at the feature layer (`attentions[-2]`, CLIP layer 22) among the
  rest (the official code subtracts 1 from the taken patches' scores);
- the kept patches enter the LLM in raster order (a boolean mask), CLS dropped, positions contiguous. The selection
  depends on the image only.
Official settings: T = 192 / 128 / 64 on LLaVA-1.5, 640 / 320 / 160 on LLaVA-NeXT (T / crops per crop: the official
code divides by the crops of each image, this policy by the nominal 5, and selects among the patches that survive
unpadding; `newlines="keep"` lays them out as the official code, with the image-newline tokens), retention 0.334 /
0.223 / 0.112 on Qwen2.5-VL (`ratio=`), alpha 0.1; object layer 9 on CLIP towers (with CLS: LLaVA-1.5, NeXT,
Video-LLaVA) and 16 on Qwen2.5-VL's 32-block tower (without CLS), whose official port scores each 2x2-merged token
by the attention its four patches receive at block 16 and at the last block, with the grid's own width for the
+-row buffers; here that attention is taken over the whole image (the port's FlashAttention path; blocks 16 and 32
are full-attention blocks anyway).

By default (`eager_encoder=True`) the CLIP tower runs eagerly, image by image, and the scores are its own
attention probabilities, bit-identical to the official run; `eager_encoder=False` keeps SDPA and recomputes the two
layers' attention from their q/k.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from visiondrop.engine import EncoderView, Policy, Selection, unmarked
from visiondrop.families import ModelInfo
from visiondrop.methods import Method, Overhead
from visiondrop.methods.shared import newline_choice, whole_count

if TYPE_CHECKING:
    from visiondrop.core import Cut

#: the official object layer and the feature layer it is counted against (1-based) of a tower with CLS (CLIP ViT-L:
#: 9 of 23) and of one without (Qwen2.5-VL: 16 of 32); other towers take the same relative depth
OBJECT_LAYER_CLS, OBJECT_LAYER_NO_CLS = (9, 23), (16, 32)
NEIGHBOURS = 5  # an anchor and its buffers: itself, left, right, above, below


def anchors_for(keep: int, alpha: float) -> int:
    return round(keep * alpha / NEIGHBOURS)


def hiprune_selection(view: EncoderView, keep: int, alpha: float, object_layer: int, deep_layer: int) -> Selection:
    """Anchors and buffers at `object_layer`, registers at `deep_layer` (0-based tower layers), per image or crop;
    view indices in raster order."""
    keep = max(view.scaled(keep), 1)
    first = int(view.has_cls)
    shallow, deep = view.received(object_layer)[:, first:], view.received(deep_layer)[:, first:]
    n = shallow.shape[1]
    width = view.grid[1] if view.grid else round(n ** 0.5)
    if view.valid is not None:  # patches the layout discards are never anchors nor registers
        invalid = ~view.valid[:, first:]
        shallow, deep = shallow.masked_fill(invalid, float("-inf")), deep.masked_fill(invalid, float("-inf"))
    anchors = shallow.topk(anchors_for(keep, alpha), dim=1).indices
    near = torch.cat([anchors, anchors - 1, anchors + 1, anchors - width, anchors + width], dim=1).clamp(0, n - 1)
    taken = torch.zeros(shallow.shape, dtype=torch.bool, device=shallow.device).scatter_(1, near, True)
    # the official registers are the top (keep - taken) by the deep score less 1 where taken, a count that differs
    # per crop (neighbourhoods overlap): the first that many of each row's top keep, so nothing is read to the host
    ranked = (deep - taken.int()).topk(keep, dim=1).indices  # the official subtraction
    wanted = torch.arange(keep, device=shallow.device) < keep - taken.sum(dim=1, keepdim=True)
    taken |= torch.zeros_like(taken).scatter_(1, ranked, wanted)
    return Selection(unmarked(~taken, keep) + first)  # the taken patches in raster order (the official mask)


class HiPrune(Policy):
    name = "hiprune"
    received_attention = True

    def __init__(self, keep: int, info: ModelInfo, alpha: float, object_layer: int | None, eager_encoder: bool,
                 native_layout: bool):
        if object_layer is None:  # the official layer at the same relative depth of this tower
            official, feature = OBJECT_LAYER_CLS if info.tower_cls else OBJECT_LAYER_NO_CLS
            object_layer = max(1, round(official * (info.vision_layer + 1) / feature))
        self.keep, self.crops, self.alpha, self.object_layer = keep, info.crops, alpha, object_layer
        self.encoder_layer = info.vision_layer
        self.eager_encoder, self.native_layout = eager_encoder, native_layout

    def select_encoder(self, view: EncoderView) -> Selection:
        return hiprune_selection(view, self.keep, self.alpha, self.object_layer - 1, self.encoder_layer)

    def describe(self) -> dict:
        return {"method": self.name, "encoder_layer": self.encoder_layer, "keep": self.keep,
                "anchors": anchors_for(self.keep, self.alpha), "alpha": self.alpha, "object_layer": self.object_layer,
                "eager_encoder": self.eager_encoder, "equivalent_tokens": self.keep * self.crops}  # NeXT: nominal crops


def policy(info: ModelInfo, budget: float | None = None, alpha: float = 0.1, object_layer: int | None = None,
           eager_encoder: bool = True, newlines: str = "keep") -> Policy:
    """HiPrune keeping `budget` patches (HIPRUNE_RETENTION; per crop or frame: budget / crops).

    alpha: HIPRUNE_ALPHA, the share of anchors and buffers (0.1); object_layer: HIPRUNE_OBJECT_LAYER, 1-based
    (None: 9 on CLIP towers, 16 on Qwen2.5-VL's, the official scripts'); eager_encoder: eager CLIP tower,
    bit-identical to the official scores (default), or False: SDPA, the two layers' attention recomputed;
    newlines (LLaVA-NeXT): "keep" (the model's own layout, as official) or "drop" (`methods.shared.newline_choice`).
    """
    if budget is None:
        raise ValueError("HiPrune needs a budget (its HIPRUNE_RETENTION)")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha is the share of anchor and buffer tokens, in [0, 1]; got {alpha}")
    if object_layer is not None and not 1 <= object_layer <= info.vision_layer + 1:
        raise ValueError(f"object_layer is a vision-tower layer, 1-based, from 1 to the feature layer "
                         f"{info.vision_layer + 1}; got {object_layer}")
    keep = whole_count(budget, info, "HiPrune", parts=info.crops)
    if NEIGHBOURS * anchors_for(keep, alpha) > keep:
        raise ValueError(f"HiPrune's {anchors_for(keep, alpha)} anchors at alpha={alpha} may take up to "
                         f"{NEIGHBOURS * anchors_for(keep, alpha)} tokens with their buffers, more than the {keep} "
                         "kept: lower alpha or raise the budget")
    return HiPrune(keep, info, alpha, object_layer, bool(eager_encoder), newline_choice(newlines))


def selection_macs(cut: Cut, width: int, eager_encoder: bool = True) -> int:
    """Without the eager tower's probabilities, the two layers' attention is recomputed: q of every token and all the
    logits at each layer, and k at the object layer (the feature layer's keys are the encoder stage's own, charged
    to every encoder stage; `width`: the tower's hidden size on CLIP)."""
    logits = cut.before * cut.before * width
    return 0 if eager_encoder else 3 * cut.before * width * width + 2 * logits


def overhead(eager_encoder: bool = True, **_) -> Overhead:
    return Overhead(selection=lambda cut, width: selection_macs(cut, width, eager_encoder),
                    eager_encoder=eager_encoder)


METHOD = Method("hiprune", "HiPrune", policy, smallest_budget=lambda info: info.crops, overhead=overhead,
                example_budget=128, scoring=lambda **_: {"encoder": "vision_tower"})
