"""The one public entry point: `apply(model, method, budget)` returns an undoable handle."""
from __future__ import annotations

from typing import Any

from torch import nn

from .engine import Policy, Trace
from .engine.patch import Pruner
from .methods import METHODS, policy_for
from .families import info_of
from .stack import check_transformers

__all__ = ["METHODS", "Handle", "apply", "build_policy", "policy_for"]


def build_policy(model: nn.Module, method: str, budget: float | None = None, ratio: float | None = None,
                 **options: Any) -> Policy:
    """The policy of `method` at `budget` (or retention `ratio`) for a loaded model (`methods.policy_for`)."""
    return policy_for(info_of(model), method, budget, ratio, **options)


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

    def instruct(self, questions: list[str] | None) -> None:
        """Each sample's instruction for the next forwards, one per sample with an image in batch order, for
        text-conditioned methods (CDPruner); None: the method's `instruction=` again. Others ignore it."""
        self.policy.instruct(questions)

    def remove(self) -> None:
        self._pruner.remove()

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def apply(model: nn.Module, method: str = "visiondrop", budget: float | None = None, ratio: float | None = None,
          **options: Any) -> Handle:
    """Apply a visual-token reduction method to a loaded model of a supported family (`visiondrop.families`).

    budget: average number of visual tokens per decoder layer (the papers' "# Tokens"); or ratio: the same as a
    retention ratio of each sample's own visual tokens. Method options (e.g. VisionDrop's `schedule=`) are passed
    as keywords.
    """
    return Handle(model, build_policy(model, method, budget, ratio, **options))
