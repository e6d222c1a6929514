"""FastV (arXiv 2403.06764): one cut inside the decoder, scored by the attention the image receives.

As the official code does it (github.com/pkunlp-icler/FastV d165972, llava-hf variant with KV cache):
- all tokens run through decoder layers 0..K-1; before layer K the image tokens are ranked by the attention
  probabilities of layer K-1, averaged over heads, in the row of the LAST prompt token, over the image columns;
- the top `keep` image tokens stay in their original order; nothing is merged;
- kept tokens keep their ORIGINAL position ids (gaps remain) and decode positions continue from the full prompt
  length in every layer; the cut happens once, in the prefill, so every decode step sees the same kept set.
  Generating without a KV cache re-runs the prompt at every step and so re-ranks with the newest token as the
  query, which is what the official code does without a cache (its dynamic mode); `Replay` holds the set fixed.

Budget: the papers' "# Tokens" is the mean visual-token count over the decoder layers (methods.md 0.1, 2(f)), so
budget T keeps n_keep = round((n_layers*T - K*N0) / (n_layers - K)) tokens after the cut (576 tokens, 32 layers,
K=2: 192 -> 166, 128 -> 98, 64 -> 30). Budgets below K*N0/n_layers (36 here; 144 on a 4-layer decoder, where
K maps to 1) are out of reach.

Options (keywords of `visiondrop.apply` beside `budget`):
- `k` (default 2): the cut layer K as in the official `fastv_k`, given for a 32-layer decoder and mapped to
  other depths by relative depth (`ModelInfo.relative_layers`: K=2 stays 2 on LLaVA-7B, becomes 1 on a 4-layer
  decoder); scoring uses layer K-1, so 1 <= k <= 31.
- `keep`: the number of image tokens kept after the cut, overriding the budget conversion (e.g. the official
  `fastv_r` convention, keep = round(N0*(1-R)), or papers that keep exactly T tokens after layer K).
- `scoring` (`visiondrop.engine.scoring`): "text" (default, the official code: the last prompt token's row),
  "all_queries" (the paper: the mean attention a token receives from all query rows of the prompt, causally
  masked zeros included, padding rows left out) or "visual" (VisionDrop's visual-to-visual rule at layer K-1: the
  kept set no longer depends on the question; K and the counts are unchanged), for the controlled study.
"""
from __future__ import annotations

from torch import Tensor

from visiondrop.engine import DecoderCut, Policy, Selection, topk_in_order
from visiondrop.engine.scoring import scorer
from visiondrop.methods import Method, Overhead
from visiondrop.core import ModelInfo

SCORINGS = ("text", "all_queries", "visual")
DEFAULT_K = 2


def smallest_budget(info: ModelInfo) -> float:
    """With the default k: the first k layers (k mapped by relative depth) keep all the visual tokens."""
    (k,) = info.relative_layers([DEFAULT_K], "FastV k (it scores with layer k-1)")
    return k * info.n_visual / info.n_layers


def keep_for_budget(budget: float, info: ModelInfo, k: int) -> int:
    """Image tokens kept after layer k so that the mean over all decoder layers is `budget`."""
    floor = k * info.n_visual / info.n_layers
    if budget < floor:
        raise ValueError(f"FastV with k={k} cannot reach budget {budget}: the first {k} layers keep all "
                         f"{info.n_visual} visual tokens, so the smallest reachable budget is {floor:g}")
    return round((info.n_layers * budget - k * info.n_visual) / (info.n_layers - k))


class FastV(Policy):
    name = "fastv"
    renumber_positions = False  # the official code keeps the kept tokens' original position ids

    def __init__(self, info: ModelInfo, k: int, keep: int, scoring: str):
        self.info, self.k, self.keep, self.scoring = info, k, keep, scoring
        self.cut_layers = (k,)
        self._score = scorer(scoring, SCORINGS, "FastV")

    def scores(self, cut: DecoderCut) -> Tensor:
        """Importance [G, n] of the current visual tokens, from layer K-1's attention (the layer that has run)."""
        return self._score(cut, self.k - 1, hidden=cut.prev_hidden)

    def select_decoder(self, cut: DecoderCut) -> Selection:
        return Selection(topk_in_order(self.scores(cut), cut.scaled(self.keep, self.info.n_visual)))

    def describe(self) -> dict:
        n0, layers = self.info.n_visual, self.info.n_layers
        return {"method": self.name, "k": self.k, "keep": self.keep, "scoring": self.scoring,
                "equivalent_tokens": (self.k * n0 + (layers - self.k) * self.keep) / layers}


def policy(info: ModelInfo, budget: float | None = None, k: int = DEFAULT_K, keep: int | None = None,
           scoring: str = "text") -> Policy:
    """FastV from a budget (average visual tokens per decoder layer) or an explicit `keep` count."""
    (k,) = info.relative_layers([k], "FastV k (it scores with layer k-1)")
    if keep is None:
        if budget is None:
            raise ValueError("FastV needs budget= or keep=")
        keep = keep_for_budget(budget, info, k)
    elif not 0 <= keep <= info.n_visual:
        raise ValueError(f"FastV keep must be between 0 and {info.n_visual}, got {keep}")
    return FastV(info, k, keep, scoring)


METHOD = Method("fastv", "FastV", policy, smallest_budget, replaces_budget=("keep",),
                overhead=lambda scoring="text", **_: Overhead(rows=scoring),
                scoring=lambda scoring="text", **_: {"decoder": scoring}, second_example=(128, {"k": 3, "scoring": "all_queries"}))
