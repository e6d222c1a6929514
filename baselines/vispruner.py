"""VisPruner's policy: important tokens by CLS attention plus diverse ones by iterative de-duplication, before the LLM.

As the official code (github.com/Theia-4869/VisPruner aefa01a, `LlavaMetaForCausalLM.encode_images` with
`--visual_token_num T --important_ratio r`) does it on LLaVA-1.5 (methods.md section 10):
- one encoder-side cut, on the vision layer LLaVA projects (CLIP layer 22, `hidden_states[-2]`): features and
  attention both from that layer; no decoder cut, so every decoder layer sees the same T tokens and the budget
  ("# Tokens") is T;
- important: the T_imp = int(T x r) patches with the largest head-mean CLS attention (`argsort(descending)`);
- diverse: the other patches, as a list in descending-attention order, thinned ToMe-style until T - T_imp remain:
  each round splits the list into even (a) and odd (b) places, scores each a by its largest cosine similarity to
  any b (`x / x.norm`, `a @ b.T`), drops the min(8, R - T_div) highest-scoring a's, and continues with
  [the other a's in descending score order, then every b];
- the important and diverse patches enter the LLM in raster order (a boolean mask), CLS dropped, positions
  contiguous. The selection depends on the image only.

**Eager encoder by default.** The diverse stage hangs on the order of near-equal scores (exact float32 ties on the parity
model): noise of 1e-7 on the features changes dozens of kept tokens. So by default (`eager_encoder=True`) the tower runs
with eager attention, image by image as the official evaluation does, and the CLS row is its own attention
probabilities (`families.llava.clip_encoder_view(eager_encoder=True)`): then the features, the scores and the kept set
are bit-identical to the official run, and a sample keeps the same tokens in any batch. Exact ties among the
scores are frequent and decide the set: both sorts are torch's default (not stable) `argsort`, as in the official
code, so ties fall as the platform's sort puts them (on the parity model a stable sort would change 7-18 kept
tokens at budgets 64 and 32; CUDA's sort may order ties otherwise than the CPU's of the official runs).
`eager_encoder=False` keeps the tower's own attention (SDPA) on the whole batch and recomputes the CLS row from layer 22's
q/k: faster and lighter (no attention maps; about half the time of the eager path on the tiny model, CPU), the same
important set, but another, equally plausible diverse set: on the parity model 29 of the 128 kept tokens differ from
the official ones; on the test suite's tiny model (seed 0, six demo images) 9-22 of 128 differ, 11-16 of 64, 6-11
of 32.

Budgets: T = budget; `important_ratio` (default 0.5, the official default and the README's 128 example; its
README uses 0.75 at 64) splits it. The official code fails with a shape error when the diverse list has an odd
length (an odd T_imp); here the extra token counts among the a's.

On LLaVA-NeXT the official code selects T tokens on every crop (base and grid) and lays them out in the model's
own layout, image-newline tokens included (`newlines="keep"`, the default here; "drop": the compact layout of
the official VisionDrop/VisionZip code); this policy selects budget / 5 per crop among the patches that survive
unpadding, where the official code also ranks the padding and then loses what it picked there.
"""
from __future__ import annotations

import torch
from torch import Tensor

from visiondrop.engine import EncoderView, Policy, Selection
from visiondrop.core import Cut, ModelInfo
from visiondrop.methods import Method, Overhead
from visiondrop.methods.shared import newline_choice, whole_count

DROPPED_PER_ROUND = 8  # the official diverse stage drops at most 8 tokens per round


def split_budget(budget: float, important_ratio: float, info: ModelInfo) -> tuple[int, int]:
    """(important, diverse) tokens per crop; LLaVA-NeXT splits budget / crops on every crop, Video-LLaVA on every
    frame; a budget between whole per-crop counts (a retention ratio) takes the nearest
    (`methods.shared.whole_count`)."""
    per_crop = whole_count(budget, info, "VisPruner", parts=info.crops)
    important = int(per_crop * important_ratio)
    return important, per_crop - important


def diverse_rounds(unit: Tensor, residual: Tensor, n_diverse: int) -> Tensor:
    """Thin the residual lists [G, R] (indices into the unit-norm features [G, N, D], descending attention) to
    `n_diverse` each, as the official rounds do; the survivors [G, n_diverse] in the official final order."""
    if n_diverse <= 0:
        return residual[:, :0]
    while (dropped := min(DROPPED_PER_ROUND, residual.shape[1] - n_diverse)) > 0:
        tokens = unit.gather(1, residual.unsqueeze(-1).expand(-1, -1, unit.shape[-1]))
        a, b = tokens[:, ::2], tokens[:, 1::2]
        scores = (a @ b.transpose(-1, -2)).max(dim=-1).values
        distinct = scores.argsort(dim=-1, descending=True)[:, dropped:]
        residual = torch.cat([residual[:, ::2].gather(1, distinct), residual[:, 1::2]], dim=-1)
    return residual


def vispruner_selection(view: EncoderView, important: int, diverse: int) -> Selection:
    """Important + diverse patches of every crop, in raster order (indices into the view's tokens)."""
    important, diverse = view.scaled(important), view.scaled(diverse)  # an image's share of the nominal counts
    first = int(view.has_cls)
    attention = view.importance[:, :, first:].mean(dim=1)  # [N, patches], head mean
    features = view.hidden[:, first:]
    unit = features / features.norm(dim=-1, keepdim=True)
    valid = None if view.valid is None else view.valid[:, first:]
    if valid is not None:
        attention = attention.masked_fill(~valid, float("-inf"))  # ranked last, and cut off below
    order = attention.argsort(dim=-1, descending=True)
    counts = [attention.shape[1]] * attention.shape[0] if valid is None else valid.sum(1).tolist()
    # crops with no more valid patches than the budget keep them all (and padding, which the layout drops);
    # crops with as many valid patches as each other thin their residual lists together
    keep = order[:, :important + diverse].clone()
    for n in sorted(set(counts)):
        rows = [i for i, c in enumerate(counts) if c == n]
        if n > important + diverse:
            keep[rows, important:] = diverse_rounds(unit[rows], order[rows, important:n], diverse)
    return Selection(keep.sort(dim=-1).values + first)


class VisPruner(Policy):
    name = "vispruner"

    def __init__(self, important: int, diverse: int, info: ModelInfo, eager_encoder: bool, native_layout: bool):
        self.important, self.diverse, self.crops = important, diverse, info.crops
        self.encoder_layer = info.vision_layer
        self.eager_encoder, self.native_layout = eager_encoder, native_layout

    def select_encoder(self, view: EncoderView) -> Selection:
        return vispruner_selection(view, self.important, self.diverse)

    def describe(self) -> dict:
        return {"method": self.name, "encoder_layer": self.encoder_layer, "important": self.important,
                "diverse": self.diverse, "eager_encoder": self.eager_encoder,
                "equivalent_tokens": (self.important + self.diverse) * self.crops}  # NeXT: nominal crops


def policy(info: ModelInfo, budget: float | None = None, important_ratio: float = 0.5, eager_encoder: bool = True,
           newlines: str = "keep") -> Policy:
    """VisPruner keeping `budget` tokens (per crop: budget / crops), int(T x important_ratio) of them important.

    eager_encoder: eager vision tower, bit-identical to the official selection (default), or False: the tower's own
    attention, faster, another diverse set (module docstring). newlines (LLaVA-NeXT): "keep" (the model's own
    layout, as the official code) or "drop" (`methods.shared.newline_choice`).
    """
    if budget is None:
        raise ValueError("VisPruner needs a budget (its visual_token_num)")
    if not 0 <= important_ratio <= 1:
        raise ValueError(f"important_ratio is the important share of the budget, in [0, 1]; got {important_ratio}")
    important, diverse = split_budget(budget, important_ratio, info)
    return VisPruner(important, diverse, info, bool(eager_encoder), newline_choice(newlines))


def selection_macs(cut: Cut, width: int, important_ratio: float = 0.5) -> int:
    """The a @ b.T products of the diverse rounds on the `width`-wide patch features (CLS excluded)."""
    important = int(cut.kept * important_ratio)
    diverse, residual, macs = cut.kept - important, cut.before - 1 - important, 0
    while diverse > 0 and (dropped := min(DROPPED_PER_ROUND, residual - diverse)) > 0:
        macs += (residual - residual // 2) * (residual // 2) * width
        residual -= dropped
    return macs


def overhead(important_ratio: float = 0.5, eager_encoder: bool = True, **_) -> Overhead:
    return Overhead(selection=lambda cut, width: selection_macs(cut, width, important_ratio),
                    eager_encoder=eager_encoder)


METHOD = Method("vispruner", "VisPruner", policy, smallest_budget=lambda info: info.crops, overhead=overhead,
                example_budget=128, scoring=lambda **_: {"encoder": "vision_tower"},
                second_example=(64, {"important_ratio": 0.25}))
