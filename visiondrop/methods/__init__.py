"""The methods: what each states about itself (`Method`), the registry, and the policy of a method at a budget.

A method is one module holding `METHOD = Method(...)`: its policy factory (whose keyword options, with their
defaults, are the method's options), display name, smallest reachable budget, FLOPs overhead recipe and the budget
the contract tests run it at; its policy (an `engine.Policy`) states its schedule and its scoring. Registering it
is one line in `METHODS`. The FLOPs count, the tables, the latency benchmark and the harness ask the method;
nothing else keeps per-method tables.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable

from ..core import Cut, Dims, ModelInfo, TokenCounts
from ..engine import Policy

#: method name -> the module that defines its `METHOD`
METHODS = {
    "none": "visiondrop.methods.none",
    "visiondrop": "visiondrop.methods.visiondrop",
    "fastv": "baselines.fastv",
    "pyramiddrop": "baselines.pyramiddrop",
    "sparsevlm": "baselines.sparsevlm",
    "visionzip": "baselines.visionzip",
    "dart": "baselines.dart",
    "random": "baselines.random",
    "divprune": "baselines.divprune",
    "vispruner": "baselines.vispruner",
    "cdpruner": "baselines.cdpruner",
    "vscan": "baselines.vscan",
    "fastervlm": "baselines.fastervlm",
    "hiprune": "baselines.hiprune",
    "tome": "baselines.tome",
    "mustdrop": "baselines.mustdrop",
    "evs": "baselines.evs",
    "vidcom2": "baselines.vidcom2",
    "dycoke": "baselines.dycoke",
    "prunevid": "baselines.prunevid",
    "fastvid": "baselines.fastvid",
    "holitom": "baselines.holitom",
}


class Unreachable(ValueError):
    """A budget (or options) a method cannot reach on a model; `floor`, where known, is the smallest reachable."""

    def __init__(self, message: str, floor: float | None = None):
        super().__init__(message)
        self.floor = floor


@dataclass(frozen=True)
class Overhead:
    """The matrix products of a method's own scoring and merging, as the FLOPs count charges them
    (`visiondrop.efficiency.flops.overhead_flops`; an encoder cut's keys, and its CLS row unless `eager_encoder`
    reads it from the tower, are charged to every method that has one).

    rows: the query rows that score a decoder cut, by the scoring rule's name (`engine.scoring.RULES`): "visual"
    (every visual token), "text" (the last prompt token), "question" (the text tokens), "all_queries" (every prompt
    token), or None (no attention rows);
    merges: leftovers merged into contextual tokens (`engine.contextual_merge`);
    rater_choice: the visual rows against the text once before the first cut (SparseVLM's raters);
    key_norms: the keys of every token at a decoder cut, for their norms, where no attention rows need them (DART);
    pivots: tokens whose similarity to every visual token is computed at a decoder cut (DART's pivots);
    frame_pairs: the distance between every two tokens of a video frame at a decoder cut (FastVID's densities; frames
    of `Dims.visual_per_crop` tokens);
    selection: (cut, width of the tokens it selects among) -> multiply-accumulates of the method's own selection
    at that cut beyond attention rows and merging (DivPrune's pairwise similarities, VisPruner's rounds);
    eager_encoder: the encoder cut reads its CLS row from an eager tower's own probabilities (False: it
    recomputes the row from the layer's q/k); the layer's keys are computed either way;
    projected: (encoder cut, the decoder's width) -> multiply-accumulates of a method's own products on the
    projected tokens at an encoder cut (CDPruner's kernel and greedy MAP, VScan's merge); such a method projects
    every patch, so the projector on the dropped ones is charged too.
    tower_rows: a decoder-side method that reads the tower's attention (`Policy.tower_attention`): at its first cut,
    every frame's (or crop's) attention each token receives at the feature layer, from the q and k of its tokens;
    tower: (dims, encoder cut) -> (tokens entering each vision-tower layer, multiply-accumulates of the method's
    own matching there), for a method that merges inside the tower (ToMe); None: the tower runs all its tokens;
    tower_head: a decoder-side method that runs the pooling head of the tower's original checkpoint on every frame
    (or crop) where the family names one (`Family.tower_head`; FastVID's SigLIP head): the probe's key and value
    projections of every tower token, its logits and weighted sum, its query and output projections, and the MLP.
    """

    rows: str | None = None
    merges: bool = False
    rater_choice: bool = False
    key_norms: bool = False
    pivots: int = 0
    frame_pairs: bool = False
    selection: Callable[[Cut, int], int] | None = None
    eager_encoder: bool = False
    projected: Callable[[Cut, int], int] | None = None
    tower_rows: bool = False
    tower: Callable[[Dims, Cut], tuple[list[int], int]] | None = None
    tower_head: bool = False


@dataclass(frozen=True)
class Method:
    """Everything the rest of the code asks about one method."""

    name: str
    #: as the papers' tables name it
    title: str
    #: (info, budget, **options) -> Policy. Its keyword options, with defaults, are the method's options. It is
    #: called for budgets below all the visual tokens only, or with options that replace the budget.
    build: Callable[..., Policy]
    #: the smallest budget reachable with the default options on a model: a smaller one is refused, naming it
    smallest_budget: Callable[[ModelInfo], float]
    #: (**options) -> its FLOPs overhead recipe
    overhead: Callable[..., Overhead] = lambda **_: Overhead()
    #: (**options) -> what decides the tokens kept at its cuts: {"encoder": rule, "decoder": rule}, each a name in
    #: `engine.scoring.RULES` (a kind of cut it does not make is absent); the reports read this, not the FLOPs recipe
    scoring: Callable[..., dict[str, str]] = lambda **_: {}
    #: options that, given, replace the budget (e.g. FastV's `keep`): a budget of all the visual tokens then does
    #: not mean the unpruned model
    replaces_budget: tuple[str, ...] = ()
    #: a budget of a 576-token LLaVA-1.5 it reaches with its defaults on a 32-layer decoder (scaled to other
    #: models' visual tokens): the one the contract tests (tests/test_contract.py) run it at
    example_budget: float = 64
    #: (the model's config) -> options the tests, the FLOPs count's proxy and the latency benchmark add to the
    #: defaults where those need what a tiny or random model lacks (CDPruner: a CLIP text side and an instruction)
    example_options: Callable[[Any], dict[str, Any]] = lambda config: {}
    #: the second setting the contract tests run it at: (a budget counted as `example_budget` is, options added to
    #: `example_options`), its paper's other budget or alternative options; None: twice the example budget, unless
    #: its counts follow the content (`counts_follow_content`), where a budget names no count to double
    second_example: tuple[float, dict[str, Any]] | None = None
    #: (dims, budget) -> the FLOPs count's schedule on a multi-crop model at its nominal crops, where one measured
    #: proxy image would not give the paper's comparison; None: measured
    nominal_counts: Callable[[Dims, float], TokenCounts] | None = None
    #: reduces videos only (its reduction is across frames) and refuses images with a clear error
    video_only: bool = False
    #: keeps exactly the count `describe()` states; False where the count depends on the video (per-frame budgets
    #: rounded per frame, as VidCom2's official code does): within a token a frame of it
    exact_count: bool = True
    #: its counts follow each image's content (thresholds: MustDrop): a budget names a setting, not a count, and
    #: `describe()` states what the last forward measured; a ratio keeps no share of an image
    counts_follow_content: bool = False

    @property
    def examples(self) -> tuple[tuple[float, dict[str, Any]], ...]:
        """The settings the contract tests run: the example budget with the defaults, then the second example where
        there is one that prunes (a budget of all of a LLaVA-1.5's 576 visual tokens, without options, is the
        unpruned model)."""
        second = self.second_example or (None if self.counts_follow_content else (2 * self.example_budget, {}))
        return ((self.example_budget, {}),) + ((second,) if second and (second[0] < 576 or second[1]) else ())

    @property
    def options(self) -> dict[str, Any]:
        """The method's keyword options and their defaults (`inspect.Parameter.empty` where there is none)."""
        params = list(inspect.signature(self.build).parameters.values())[2:]  # after (info, budget)
        return {p.name: p.default for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}

    def resolved_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """`options` with the defaults filled in (unknown keys kept, for `policy_for` to name)."""
        defaults = {k: v for k, v in self.options.items() if v is not inspect.Parameter.empty}
        return {**defaults, **options}

    def check_options(self, options: dict[str, Any]) -> None:
        """Name the valid options (with defaults) when a given one is not among them."""
        valid = self.options
        unknown = sorted(set(options) - set(valid))
        if unknown:
            listed = ", ".join(f"{name}={default!r}" for name, default in valid.items()) or "none"
            raise TypeError(f"method {self.name!r} has no option {', '.join(map(repr, unknown))}; its options (with "
                            f"defaults) are: {listed}")


@functools.cache
def method(name: str) -> Method:
    """The registered method `name`."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    return importlib.import_module(METHODS[name]).METHOD


def method_title(name: str) -> str:
    """The name the papers' tables use for a method; a method no longer registered keeps its id."""
    return method(name).title if name in METHODS else name


def unpruned() -> Policy:
    """The unpruned model, run through the engine's own layer loop."""
    return Policy()


def policy_for(info: ModelInfo, name: str, budget: float | None = None, ratio: float | None = None,
               **options: Any) -> Policy:
    """The policy of method `name` at `budget` for a model described by `info`.

    `ratio` gives the budget as a retention ratio of the visual tokens instead: budget = ratio x the model's
    nominal count (`info.n_visual`). Methods scale their counts to each sample's own visual tokens, so on models
    whose count varies per sample (LLaVA-NeXT grids, dynamic resolution, frames) every sample keeps that share
    of its own tokens; on LLaVA-1.5 `ratio=64/576` is `budget=64`.

    Raises ValueError if the budget is unreachable, TypeError for a budget that is not a number or an unknown option.
    """
    chosen = method(name)
    if ratio is not None:
        if budget is not None:
            raise TypeError("give the budget as budget= (tokens) or ratio= (retention ratio), not both")
        check_budget(ratio)
        if ratio > 1:
            raise ValueError(f"ratio is the share of the visual tokens kept, in (0, 1]; got {ratio}")
        budget = ratio * info.n_visual
    check_budget(budget)
    chosen.check_options(options)
    replaced = any(options.get(option) is not None for option in chosen.replaces_budget)
    if name != "none" and budget is not None and budget >= info.n_visual and not replaced:
        return unpruned()  # every method keeps all the tokens at a budget of all of them
    return chosen.build(info, budget, **options)


def check_budget(budget: Any) -> None:
    """Refuse a budget no method can use here, before a factory fails on it with a Python internal."""
    if budget is None:  # methods that take an explicit schedule (or none) instead
        return
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        hint = ""
        if isinstance(budget, str):
            try:
                hint = f": pass the number {float(budget):g}, not a string"
            except ValueError:
                pass
        raise TypeError(f"budget must be a number (average visual tokens per decoder layer), got "
                        f"{type(budget).__name__} {budget!r}{hint}")
    if not math.isfinite(budget) or budget <= 0:
        raise ValueError(f"budget must be a finite number of visual tokens above 0, got {budget} "
                         "(method='none' runs the unpruned model)")
