"""The unpruned model, run through the engine's own layer loop (the reference every method is measured against)."""
from __future__ import annotations

from ..engine import Policy
from ..core import ModelInfo
from . import Method, unpruned


def policy(info: ModelInfo, budget: float | None = None) -> Policy:
    if budget is not None and budget != info.n_visual:
        raise ValueError(f"method 'none' keeps all {info.n_visual} visual tokens; got budget={budget}")
    return unpruned()


METHOD = Method("none", "Vanilla", policy, smallest_budget=lambda info: info.n_visual, example_budget=576)
