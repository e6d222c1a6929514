"""The one public entry point: `apply(model, method, budget)` returns an undoable handle."""
from __future__ import annotations

import importlib
import inspect
import math
import numbers
from typing import Any, Callable

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
    """The policy of `method` at `budget` for a model described by `info`.

    Raises ValueError if the budget is unreachable, TypeError for a budget that is not a number or an unknown option.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    module, name = METHODS[method].split(":")
    factory = getattr(importlib.import_module(module), name)
    check_budget(budget)
    check_options(method, factory, options)
    return factory(info, budget, **options)


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


def check_options(method: str, factory: Callable[..., Policy], options: dict[str, Any]) -> None:
    """Name the method's valid options (read from its factory's signature) when a given one is not among them."""
    params = list(inspect.signature(factory).parameters.values())[2:]  # after (info, budget)
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    valid = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(options) - {p.name for p in valid})
    if unknown:
        listed = ", ".join(f"{p.name}={p.default!r}" for p in valid) or "none"
        raise TypeError(f"method {method!r} has no option {', '.join(map(repr, unknown))}; its options (with "
                        f"defaults) are: {listed}")


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
