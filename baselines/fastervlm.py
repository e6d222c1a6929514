"""FasterVLM's policy: keep the patches CLS attends to most at the vision layer LLaVA projects, before the projector.

As the official code (github.com/Theia-4869/FasterVLM f5d5f12, `LlavaMetaForCausalLM.encode_images` with
`--visual-token-num T`) does it on LLaVA-1.5:
- one encoder-side cut, on CLIP layer 22 (`hidden_states[-2]`, `attentions[-2]`: the tower runs with
  `output_attentions`, so eager attention); no decoder cut, so every decoder layer sees the same T tokens and the
  budget ("# Tokens") is T;
- score: the CLS query's attention row over the 576 patches, mean over the heads; keep `topk(T)`;
- the kept patches enter the LLM in raster order (a boolean mask), CLS dropped, positions contiguous. The selection
  depends on the image only.
Its README's settings are reduction ratios of 576: 75% -> 144, 90% -> 58, 95% -> 29 (and 50% -> 288 in the paper);
LightCompress's config uses `rate: 0.778` (128 kept).

By default (`eager_encoder=True`) the tower runs eagerly, image by image, and the CLS row is its own attention
probabilities, bit-identical to the official run; `eager_encoder=False` keeps the tower's SDPA attention and
recomputes the row from layer 22's q/k (the same top-k unless two scores sit within float noise of the boundary;
`official.json` records the margins).

On LLaVA-NeXT the official code keeps T on every crop (README: 29 x 5 = 145) in the model's own layout with the
image-newline tokens (`newlines="keep"`, the default); this policy selects budget / 5 per crop among the patches
that survive unpadding. Video-LLaVA: per frame. Towers without CLS (Qwen2.5-VL): the mean attention each token
receives at the last full-attention block (`EncoderView`), as LightCompress substitutes for CLS.
"""
from __future__ import annotations

from visiondrop.engine import EncoderView, Policy, Selection, topk_in_order
from visiondrop.families import ModelInfo
from visiondrop.methods import Method, Overhead
from visiondrop.methods.shared import newline_choice, whole_count


def cls_topk(view: EncoderView, keep: int) -> Selection:
    """The `keep` patches (scaled to the view's images) with the largest head-mean importance, in raster order."""
    first = int(view.has_cls)
    scores = view.importance[:, :, first:].mean(dim=1)
    if view.valid is not None:
        scores = scores.masked_fill(~view.valid[:, first:], float("-inf"))
    return Selection(topk_in_order(scores, max(view.scaled(keep), 1)) + first)


class FasterVLM(Policy):
    name = "fastervlm"

    def __init__(self, keep: int, info: ModelInfo, eager_encoder: bool, native_layout: bool):
        self.keep, self.crops = keep, info.crops
        self.encoder_layer = info.vision_layer
        self.eager_encoder, self.native_layout = eager_encoder, native_layout

    def select_encoder(self, view: EncoderView) -> Selection:
        return cls_topk(view, self.keep)

    def describe(self) -> dict:
        return {"method": self.name, "encoder_layer": self.encoder_layer, "keep": self.keep,
                "eager_encoder": self.eager_encoder, "equivalent_tokens": self.keep * self.crops}  # NeXT: nominal crops


def policy(info: ModelInfo, budget: float | None = None, eager_encoder: bool = True, newlines: str = "keep") -> Policy:
    """FasterVLM keeping `budget` patches (its visual_token_num; per crop or frame: budget / crops).

    eager_encoder: eager vision tower, bit-identical to the official scores (default), or False: the tower's own
    attention with the CLS row recomputed. newlines (LLaVA-NeXT): "keep" (the model's own layout, as the official
    code) or "drop" (`methods.shared.newline_choice`).
    """
    if budget is None:
        raise ValueError("FasterVLM needs a budget (its visual_token_num)")
    keep = whole_count(budget, info, "FasterVLM", parts=info.crops)
    return FasterVLM(keep, info, bool(eager_encoder), newline_choice(newlines))


def overhead(eager_encoder: bool = True, **_) -> Overhead:
    return Overhead(eager_encoder=eager_encoder)  # the top-k is no product


METHOD = Method("fastervlm", "FasterVLM", policy, smallest_budget=lambda info: info.crops, overhead=overhead,
                example_budget=144, scoring=lambda **_: {"encoder": "vision_tower"},
                second_example=(64, {"newlines": "drop"}))
