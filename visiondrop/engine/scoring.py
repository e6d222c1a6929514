"""The decoder-side scoring rules, written once: how important each current visual token is at a cut.

Each scorer reads the attention rows of one decoder layer (`DecoderCut.attention`, recomputed from the layer's own
q/k projections) and returns one score per current visual token, [G, n], higher is more important:
- `text_last_token`: the row of the last prompt token (the last instruction token), mean over heads (FastV's
  official code, PyramidDrop). Text-guided: the kept set depends on the question.
- `text_all_queries`: the mean attention a token receives from every query row of the prompt, causally masked
  zeros included, padding rows left out, mean over heads (the FastV paper). Text-guided.
- `visual_to_visual`: the attention a token receives from the visual tokens: visual query rows, mean over heads,
  then over the query rows, masked zeros included (VisionDrop). The visual tokens precede the question, so under
  causal attention the scores never depend on it.

`layer_idx` is the layer whose attention scores the cut and `hidden` what enters it (None: what enters the cut
layer; FastV passes the previous layer and `cut.prev_hidden`).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .policy import DecoderCut

Scorer = Callable[..., Tensor]


def text_last_token(cut: DecoderCut, layer_idx: int, hidden: Tensor | None = None) -> Tensor:
    probs = cut.attention(layer_idx, cut.last_token(), hidden=hidden)[:, :, 0]  # [G, H, L]
    return probs.mean(1).gather(1, cut.visual)


def text_all_queries(cut: DecoderCut, layer_idx: int, hidden: Tensor | None = None) -> Tensor:
    length = cut.hidden.shape[1]
    queries = torch.arange(length, device=cut.hidden.device).expand(cut.hidden.shape[0], -1)
    rows = cut.attention(layer_idx, queries, hidden=hidden)  # [G, H, L, L]
    real = cut.mask.unsqueeze(1).unsqueeze(-1).to(rows.dtype)  # padding rows are not queries
    probs = (rows * real).sum(2) / cut.mask.sum(1).view(-1, 1, 1).to(rows.dtype)
    return probs.mean(1).gather(1, cut.visual)


def visual_to_visual(cut: DecoderCut, layer_idx: int, hidden: Tensor | None = None,
                     keys: Tensor | None = None) -> Tensor:
    """`keys`: that layer's post-RoPE keys when the caller needs them too (VisionDrop merges on them)."""
    probs = cut.attention(layer_idx, cut.visual, hidden=hidden, keys=keys).mean(1)  # [G, n queries, L]
    return probs.gather(2, cut.visual.unsqueeze(1).expand(-1, cut.n_visual, -1)).mean(1)


#: Every rule that decides which visual tokens a method keeps, by the one name the methods' `scoring` options,
#: their FLOPs recipes (`methods.Overhead.rows`), `Method.scoring` and the reports use, with the reports' label.
RULES = {
    "text": "text-guided (last prompt token)",
    "all_queries": "text-guided (all prompt tokens)",
    "question": "text-guided (question tokens)",
    "visual": "visual-only (visual-to-visual attention)",
    "vision_tower": "visual-only (vision-tower attention: the CLS row, or the mean received without CLS)",
    "key_norms": "duplication (dissimilarity to pivots chosen by key norms)",
    "diversity": "diversity (max-min cosine distance)",
    "similarity": "redundancy (the most similar tokens merged)",
    "random": "none (random control)",
    "temporal": "temporal redundancy (similarity to the same place in other frames)",
    "uniqueness": "visual-only (distinctiveness from the video's and the frame's mean token)",
    "density": "visual-only (salient by a frame's attention row, anchors at density peaks of segments)",
}

#: The rules written here, by the `scoring` option values that choose them: "text" is the last instruction token's row.
SCORERS: dict[str, Scorer] = {"text": text_last_token, "all_queries": text_all_queries, "visual": visual_to_visual}


def scorer(scoring: str, allowed: tuple[str, ...], method: str) -> Scorer:
    """The rule named `scoring` among the `allowed` ones of `method`, or a ValueError naming them."""
    if scoring not in allowed:
        raise ValueError(f"{method} scoring must be one of {allowed}, got {scoring!r}")
    return SCORERS[scoring]
