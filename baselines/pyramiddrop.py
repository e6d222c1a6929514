"""PyramidDrop (arXiv 2410.17247): a pyramid of decoder stages, each keeping a fixed fraction of the image.

As the official code does it (github.com/Cooperx521/PyramidDrop 6444f30, `pdrop_forward` / `pdrop_rank_drop`):
- the decoder is split into stages by `layer_list`; before each boundary layer l the current visual tokens are
  ranked by the attention row of the last instruction token (the last prompt position, recomputed at every cut),
  computed with layer l's OWN input_layernorm and q/k projections (the layer about to run), RoPE at the current
  contiguous positions, a float32 softmax over the whole causal row, mean over heads, image columns only;
- stage s keeps int(N0 * lambda**s) tokens, counted from the ORIGINAL number N0 of visual tokens (int
  truncation, not from the previous stage's count); the top-k are sorted back into their original order;
- nothing is merged; positions are renumbered contiguously after every cut (the official code shifts decode
  positions down by the dropped count at each boundary, which is the same thing).

Budget: the papers' "# Tokens" is the mean visual-token count over the decoder layers (methods.md 0.1, 3(f)).
A budget T is turned into lambda by solving T = N0 * sum_s(len_s * lambda**s) / n_layers over the stage
lengths len_s (bisection, the mean is increasing in lambda); the kept counts are then the official truncated
ones, so the equivalent tokens in `describe()` are slightly below T (64 -> lambda ~0.1916, 576/110/21/4 tokens,
63.875). The first stage keeps all N0 tokens, so budgets below layer_list[0] * N0 / n_layers are out of reach
(36 for [2, 8, 16], 144 for [8, 16, 24]).

Options (keywords of `visiondrop.apply` beside `budget`):
- `layer_list` (default [2, 8, 16]): the boundary layers, given for a 32-layer decoder and mapped to other
  depths by relative depth, kept distinct (`ModelInfo.relative_layers`: [1, 2, 3] on a 4-layer decoder);
  1 <= l < 32, increasing. The official code's default is [8, 16, 24] with lambda 0.5
  (270 tokens), which cannot go below 144; the PDrop author recommends [2, 8, 16] with lambda solved for the
  budget (issue Cooperx521/PyramidDrop#29), hence the default here. `layer_list=[8, 16, 24]` is the official one.
- `decay`: lambda itself, overriding the budget conversion (the official `image_token_ratio_list` is
  [lambda, lambda**2, lambda**3]); e.g. `layer_list=[8, 16, 24], decay=0.5` keeps 576/288/144/72.
- `scoring` (`visiondrop.engine.scoring`): "text" (default, the official rule above) or "visual" (VisionDrop's
  visual-to-visual rule with the same layer's projections: the kept sets no longer depend on the question, the
  cuts and counts are unchanged). The paper's controlled study (`experiment=controlled_study`) swaps exactly this.

Official quirks (methods.md 3(g)): ratios relative to N0 with int truncation and the next layer's projections
are reproduced; batch size 1 and right padding are not needed here (each sample is scored on its own row, so a
batch gives what each prompt gives alone). Under generation without a KV cache the official query index stays
on the last *prompt* token (prompt_len recorded at input preparation), so by causality every step re-selects
the prefill's set; here the query is the last token of the sequence given (a generated token on those steps),
so replay the prefill's selections (engine `Replay`) to get the official behaviour there.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from visiondrop.engine import DecoderCut, Policy, Selection, topk_in_order
from visiondrop.engine.scoring import scorer
from visiondrop.methods import Method, Overhead
from visiondrop.core import ModelInfo

DEFAULT_LAYERS = (2, 8, 16)
SCORINGS = ("text", "visual")


def stage_counts(n0: int, decay: float, n_stages: int) -> list[int]:
    """Visual tokens in each stage: int(N0 * lambda**s) for s = 0..n_stages, relative to the original N0."""
    return [int(n0 * decay**s) for s in range(n_stages + 1)]


def mean_tokens(counts: Sequence[float], layers: tuple[int, ...], n_layers: int) -> float:
    """Mean visual tokens over the decoder layers when stage s covers layers[s-1] .. layers[s] - 1."""
    bounds = (0, *layers, n_layers)
    return sum(c * (end - begin) for c, begin, end in zip(counts, bounds, bounds[1:])) / n_layers


def smallest_budget(info: ModelInfo) -> float:
    """With the default layer_list: the layers before the first cut (mapped by relative depth) keep all the visual
    tokens."""
    layers = info.relative_layers(list(DEFAULT_LAYERS), "PyramidDrop layer_list")
    return layers[0] * info.n_visual / info.n_layers


def decay_for_budget(budget: float, info: ModelInfo, layers: tuple[int, ...]) -> float:
    """lambda whose (untruncated) stage sizes N0 * lambda**s average `budget` tokens over the decoder layers."""
    floor = layers[0] * info.n_visual / info.n_layers
    if budget < floor:
        raise ValueError(f"PyramidDrop with layer_list {list(layers)} cannot reach budget {budget}: the first "
                         f"{layers[0]} layers keep all {info.n_visual} visual tokens, so the smallest reachable "
                         f"budget is {floor:g}")
    low, high = 0.0, 1.0
    for _ in range(60):  # the mean is increasing in lambda: bisect down to float precision
        mid = (low + high) / 2
        sizes = [info.n_visual * mid**s for s in range(len(layers) + 1)]
        low, high = (mid, high) if mean_tokens(sizes, layers, info.n_layers) < budget else (low, mid)
    return low


class PyramidDrop(Policy):
    name = "pyramiddrop"

    def __init__(self, info: ModelInfo, layers: tuple[int, ...], decay: float, scoring: str = "text"):
        self.info, self.decay, self.scoring = info, decay, scoring
        self.cut_layers = layers
        self._score = scorer(scoring, SCORINGS, "PyramidDrop")

    def scores(self, cut: DecoderCut) -> Tensor:
        """Importance [G, n] of the current visual tokens, by the attention of the layer about to run."""
        return self._score(cut, cut.layer_idx)

    def select_decoder(self, cut: DecoderCut) -> Selection:
        stage = self.cut_layers.index(cut.layer_idx) + 1
        keep = stage_counts(cut.original_visual, self.decay, stage)[-1]
        return Selection(topk_in_order(self.scores(cut), keep))

    def describe(self) -> dict:
        counts = stage_counts(self.info.n_visual, self.decay, len(self.cut_layers))
        return {"method": self.name, "layer_list": list(self.cut_layers), "decay": self.decay,
                "scoring": self.scoring, "keep_counts": counts,
                "equivalent_tokens": mean_tokens(counts, self.cut_layers, self.info.n_layers)}


def policy(info: ModelInfo, budget: float | None = None, layer_list: list[int] | tuple[int, ...] = DEFAULT_LAYERS,
           decay: float | None = None, scoring: str = "text") -> Policy:
    """PyramidDrop from a budget (average visual tokens per decoder layer) or an explicit `decay` (lambda)."""
    layers = info.relative_layers(list(layer_list), "PyramidDrop layer_list")
    if decay is None:
        if budget is None:
            raise ValueError("PyramidDrop needs budget= or decay=")
        decay = decay_for_budget(budget, info, layers)
    elif not 0 <= decay <= 1:
        raise ValueError(f"PyramidDrop decay (lambda) must be between 0 and 1, got {decay}")
    return PyramidDrop(info, layers, decay, scoring)


METHOD = Method("pyramiddrop", "PDrop", policy, smallest_budget, replaces_budget=("decay",),
                overhead=lambda scoring="text", **_: Overhead(rows=scoring),
                scoring=lambda scoring="text", **_: {"decoder": scoring}, second_example=(192, {"scoring": "visual"}))
