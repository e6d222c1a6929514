"""Model-family adapters: one module per host family (`base.Family` is the interface), and the registry.

Adapters are imported on first lookup, so that importing the registry stays cheap.
"""
from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from ..core import Checkpoint, Dims, Images, ModelInfo, Shape, TokenIds
from .base import Family

#: config.model_type -> "module:adapter"
FAMILIES = {
    "llava": "visiondrop.families.llava:LLAVA",
    "llava_next": "visiondrop.families.llava_next:LLAVA_NEXT",
    "qwen2_5_vl": "visiondrop.families.qwen2_5_vl:QWEN2_5_VL",
    "qwen3_vl": "visiondrop.families.qwen3_vl:QWEN3_VL",
    "qwen3_vl_moe": "visiondrop.families.qwen3_vl:QWEN3_VL_MOE",
    "video_llava": "visiondrop.families.video_llava:VIDEO_LLAVA",
    "llava_onevision": "visiondrop.families.llava_onevision:LLAVA_ONEVISION",
}


def _load(spec: str) -> Family:
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def family_by_type(model_type: str | None) -> Family:
    """The adapter of a config's model_type."""
    if model_type not in FAMILIES:
        raise TypeError(f"unsupported model type {model_type!r}; supported: {', '.join(FAMILIES)}")
    return _load(FAMILIES[model_type])


def family_for(config: Any) -> Family:
    """The adapter of a transformers config (by its model_type)."""
    return family_by_type(getattr(config, "model_type", None))


def family_of(model: nn.Module) -> Family:
    """The adapter of a loaded model (by its class)."""
    families = [_load(spec) for spec in FAMILIES.values()]
    for family in families:
        if type(model) is family.model_class:
            return family
    raise TypeError(f"unsupported model type {type(model).__name__}; supported: "
                    f"{', '.join(f.model_class.__name__ for f in families)}")


def checkpoints() -> dict[str, Checkpoint]:
    """Every registered family's released checkpoints by name, in registry order: the models the FLOPs count and
    the latency benchmark know."""
    return {c.name: c for spec in FAMILIES.values() for c in _load(spec).checkpoints}


def checkpoint_config(name: str, width: str = "full", init_std: float = 0.02) -> Any:
    """The config of the registered checkpoint `name` at `width` ("full", "reduced", "tiny"), built by its family
    (random weights from it measure real speed: `visiondrop.efficiency.latency`); `init_std` of those weights
    (larger: logits farther from uniform, for checks that compare greedy tokens)."""
    known = checkpoints()
    if name not in known:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(known)}")
    checkpoint = known[name]
    return family_by_type(checkpoint.model_type).build_config(checkpoint.shape_at(width), checkpoint.ids, init_std,
                                                              norm_eps=checkpoint.norm_eps)


def info_of(model: nn.Module) -> ModelInfo:
    """The `ModelInfo` of a loaded model; TypeError if no family supports it."""
    return family_of(model).model_info(model.config)


def flops_dims(config: Any) -> Dims:
    """The FLOPs dimensions of a transformers config of a supported family."""
    return family_for(config).flops_dims(config)


__all__ = ["FAMILIES", "Checkpoint", "Dims", "checkpoint_config", "checkpoints", "Family", "Images", "ModelInfo", "Shape", "TokenIds", "family_by_type", "family_for",
           "family_of", "flops_dims", "info_of"]
