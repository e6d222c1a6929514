"""The one public entry point: `apply(model, method, budget)` returns an undoable handle."""
from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from .engine import Policy, Trace
from .engine.patch import Pruner
from .models import ModelInfo
from .stack import check_transformers

#: method name -> "module:factory"; a factory takes (ModelInfo, budget, **options) and returns a Policy.
METHODS = {
    "none": "visiondrop.api:unpruned",
    "visiondrop": "visiondrop.api:visiondrop",
    "fastv": "baselines.fastv:policy",
    "pyramiddrop": "baselines.pyramiddrop:policy",
    "sparsevlm": "baselines.sparsevlm:policy",
    "visionzip": "baselines.visionzip:policy",
    "random": "baselines.random_drop:policy",
}


def unpruned(info: ModelInfo, budget: float | None = None) -> Policy:
    """The unpruned model, run through the engine's own layer loop."""
    if budget is not None and budget != info.n_visual:
        raise ValueError(f"method 'none' keeps all {info.n_visual} visual tokens; got budget={budget}")
    return Policy()


def visiondrop(info: ModelInfo, budget: float | None = None, schedule: dict | None = None,
               newlines: str = "drop") -> Policy:
    """VisionDrop from a budget (average visual tokens per decoder layer) or an explicit schedule.

    newlines (LLaVA-NeXT): "drop" the image-newline tokens and the unpadding, as the official code (default), or
    "keep" transformers' layout for the kept patches (see `engine.encoder.arrange_anyres`).
    """
    from .policy import Schedule, VisionDrop, schedule_for_budget

    if (budget is None) == (schedule is None):
        raise ValueError("VisionDrop needs exactly one of budget= or schedule=")
    if schedule is None and budget >= info.n_visual:
        return unpruned(info, info.n_visual)
    policy = VisionDrop(Schedule.parse(schedule) if schedule is not None else schedule_for_budget(budget, info), info)
    policy.keep_newlines = newline_choice(newlines)
    return policy


def newline_choice(newlines: str) -> bool:
    """The `newlines` option of the encoder-side methods on LLaVA-NeXT: True to keep them."""
    if newlines not in ("drop", "keep"):
        raise ValueError(f"newlines must be 'drop' (official layout) or 'keep', got {newlines!r}")
    return newlines == "keep"


def build_policy(model: nn.Module, method: str, budget: float | None = None, **options: Any) -> Policy:
    return policy_for(ModelInfo.of(model), method, budget, **options)


def policy_for(info: ModelInfo, method: str, budget: float | None = None, **options: Any) -> Policy:
    """The policy of `method` at `budget` for a model described by `info` (raises ValueError if unreachable)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    module, factory = METHODS[method].split(":")
    return getattr(importlib.import_module(module), factory)(info, budget, **options)


class Handle:
    """A method applied to a model. Use as a context manager, or call `remove()`."""

    def __init__(self, model: nn.Module, policy: Policy):
        check_transformers()  # the engine relies on transformers internals: refuse an untested release
        self.policy = policy
        self._pruner = Pruner(model, policy)

    @property
    def trace(self) -> Trace:
        """What the last forward pass with images did (see `visiondrop.engine.Trace`)."""
        return self._pruner.trace

    def remove(self) -> None:
        self._pruner.remove()

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def apply(model: nn.Module, method: str = "visiondrop", budget: float | None = None, **options: Any) -> Handle:
    """Apply a visual-token reduction method to a loaded LLaVA model.

    budget: average number of visual tokens per decoder layer (the papers' "# Tokens"). Method options
    (e.g. VisionDrop's `schedule=`) are passed as keywords.
    """
    return Handle(model, build_policy(model, method, budget, **options))
