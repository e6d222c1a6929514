"""The one place that knows how the installed transformers names the KV cache.

transformers 5.24 renamed the cache argument of its models and decoder layers, and the field of their outputs,
from `past_key_values` to `cache`. The engine reads and passes the cache only through these helpers, so both
releases run the same code. (The tested range itself is checked in `visiondrop.stack`.)
"""
from __future__ import annotations

import inspect
from typing import Any

from torch import Tensor
from transformers.cache_utils import Cache
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaDecoderLayer.forward).parameters else "past_key_values"


def cache_kwargs(cache: Cache | None) -> dict[str, Any]:
    """The keyword that hands `cache` to a model, a decoder layer or a model output under this release."""
    return {CACHE_ARG: cache}


def cached_keys(cache: Cache, layer_idx: int) -> Tensor:
    """The post-RoPE keys [B, H_kv, kv, hd] a `DynamicCache` holds for decoder layer `layer_idx`."""
    return cache.layers[layer_idx].keys


def cache_bytes(cache: Cache) -> int:
    """The bytes of the keys and values a `DynamicCache` holds, all layers."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def keep_cached(cache: Cache, layer_idx: int, rows: Tensor) -> None:
    """Cut the keys and values a `DynamicCache` holds for decoder layer `layer_idx` to the cached rows `rows` [B, kv']
    of each batch row (new tensors: the old ones' memory is freed)."""
    layer = cache.layers[layer_idx]
    index = rows[:, None, :, None]
    layer.keys = layer.keys.gather(2, index.expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3]))
    layer.values = layer.values.gather(2, index.expand(-1, layer.values.shape[1], -1, layer.values.shape[3]))


def pop_cache(kwargs: dict[str, Any]) -> Cache | None:
    """Take the cache out of a forward's keywords, under either name (callers may still use the old one)."""
    new, old = kwargs.pop("cache", None), kwargs.pop("past_key_values", None)
    return new if new is not None else old
