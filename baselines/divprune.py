"""DivPrune's policy: keep the most diverse projected visual tokens (max-min diversity), before the LLM.

As the official code (github.com/vbdi/divprune 799e2d9, `LlavaMetaForCausalLM.DivPrune` with `BASELINE=OURS
LAYER_INDEX=0 SUBSET_RATIO=r`) does it on LLaVA-1.5 (methods.md section 10):
- one cut before decoder layer 0, on the projector outputs of the image's visual tokens (the LLM's input
  embeddings); every decoder layer sees the same k tokens, so the budget ("# Tokens") is simply k;
- D = 1 - cos between all pairs of those tokens (`x / x.norm`, one matrix product); the first pick is the token
  whose nearest other token is farthest (the second smallest of its column, the smallest being itself), each
  next pick the token whose minimum distance to the picked ones is largest (first index on ties; here ties
  within rounding, `TIE_ULPS`, so that an image whose tokens repeat exactly keeps the same ones in a batch as alone);
- the kept tokens enter the LLM in their original order, positions renumbered contiguously. The selection
  ignores the text.
The official keep count is int(round(SUBSET_RATIO x 576)); `budget=k` is SUBSET_RATIO = k / 576 (the scripts'
0.098 is budget 56). Official quirks that do not arise here: it hard-codes the image at sequence rows 35..610
(`SYS_TOKEN_LEN = 35`, right only for LLaVA-1.5's vicuna prompt), prunes only the first sample of a batch, and
reads its environment variables even unpruned.

On LLaVA-NeXT the official code selects among the whole visual block of an image at once (base crop, grid crops and
image-newline tokens, as the LLM receives them), not crop by crop; so does this policy, keeping the budget's share
of each image's own visual tokens (round(k x n / 2880) of its n).
"""
from __future__ import annotations

import torch
from torch import Tensor

from visiondrop.engine import DecoderCut, Policy, Selection
from visiondrop.core import Cut, ModelInfo
from visiondrop.methods import Method, Overhead
from visiondrop.methods.shared import whole_count


#: distances (1 - cos, of scale 1) within this many ulps of the largest are a tie
TIE_ULPS = 64


def max_min_diverse(features: Tensor, k: int) -> Tensor:
    """The k rows of `features` [G, n, D] DivPrune picks, in pick order [G, k] (its official operations)."""
    unit = features / features.norm(dim=-1, keepdim=True)
    distance = 1.0 - unit @ unit.transpose(-1, -2)  # [G, n, n], symmetric
    rows = torch.arange(features.shape[0], device=features.device)
    picks = torch.empty(features.shape[0], k, dtype=torch.long, device=features.device)
    scores = distance.topk(2, dim=1, largest=False).values[:, 1]  # distance to the nearest other token
    nearest_picked = torch.full_like(scores, float("inf"))
    # rounding-level ties go to the first index: where an image repeats tokens exactly (LLaVA-OneVision's square
    # images, whose 1x1 grid crop is their base view) the host's features differ in a batch and alone by rounding
    tie = TIE_ULPS * torch.finfo(torch.promote_types(distance.dtype, torch.float32)).eps
    for i in range(k):
        picks[:, i] = (scores >= scores.max(dim=-1, keepdim=True).values - tie).int().argmax(dim=-1)
        nearest_picked = torch.minimum(nearest_picked, distance[rows, picks[:, i]])
        scores = nearest_picked  # the minimum over the picked rows, as the official min over their stack
    return picks


class DivPrune(Policy):
    name = "divprune"
    cut_layers = (0,)

    def __init__(self, info: ModelInfo, keep: int):
        self.info, self.keep = info, keep

    def select_decoder(self, cut: DecoderCut) -> Selection:
        picks = max_min_diverse(cut.visual_rows(cut.hidden), cut.scaled(self.keep, self.info.n_visual))
        return Selection(picks.sort(dim=-1).values)

    def describe(self) -> dict:
        return {"method": self.name, "keep": self.keep, "layers": list(self.cut_layers),
                "equivalent_tokens": self.keep}


def policy(info: ModelInfo, budget: float | None = None) -> Policy:
    """DivPrune keeping `budget` visual tokens (SUBSET_RATIO = budget / the model's visual tokens)."""
    if budget is None:
        raise ValueError("DivPrune needs a budget (its keep count; the official SUBSET_RATIO is budget / "
                         f"{info.n_visual})")
    return DivPrune(info, whole_count(budget, info, "DivPrune"))


def selection_macs(cut: Cut, width: int) -> int:
    """The pairwise cosine similarities of the tokens it selects among (the greedy steps are no products)."""
    return cut.before * cut.before * width


METHOD = Method("divprune", "DivPrune", policy, smallest_budget=lambda info: 1,
                overhead=lambda **_: Overhead(selection=selection_macs), scoring=lambda **_: {"decoder": "diversity"},
                second_example=(192, {}))
