"""The few attention rows a policy needs, recomputed from a layer's own projections.

The main pass keeps SDPA / FlashAttention; scoring never switches the model to `output_attentions=True`.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.masking_utils import (ALL_MASK_ATTENTION_FUNCTIONS, and_masks, bidirectional_mask_function,
                                      causal_mask_function)

from ..core import Rotate
from ..families.base import Family


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """x: [B, L, ...], index: [B, Q] -> [B, Q, ...]."""
    return x.gather(1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:]))


def _heads(x: Tensor, head_dim: int, norm: nn.Module | None = None) -> Tensor:
    """[B, L, H*hd] -> [B, H, L, hd], through the attention's per-head norm where it has one (Qwen3's q_norm and
    k_norm, applied to each head's query or key before RoPE)."""
    x = x.view(*x.shape[:2], -1, head_dim)
    return (x if norm is None else norm(x)).transpose(1, 2)


def decoder_keys(layer: nn.Module, hidden: Tensor, cos: Tensor, sin: Tensor, rotate: Rotate = Family.rotate,
                 ) -> Tensor:
    """Post-RoPE keys of a decoder layer for the hidden states entering it: [B, H_kv, L, hd].

    rotate: the model family's RoPE (`Family.rotate`).
    """
    attn = layer.self_attn
    k = _heads(attn.k_proj(layer.input_layernorm(hidden)), attn.head_dim, getattr(attn, "k_norm", None))
    return rotate(k, cos, sin)


def decoder_attention(
    layer: nn.Module, hidden: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, queries: Tensor,
    keys: Tensor | None = None, rotate: Rotate = Family.rotate, causal: bool = True,
) -> Tensor:
    """Causal attention probabilities of the `queries` rows of a decoder layer, computed as the layer would
    (`causal=False`: over every real token, for methods that score without the causal mask).

    hidden: [B, L, D] entering the layer; cos/sin: [B, L, hd]; mask: [B, L] real-token mask;
    queries: [B, Q] sequence indices; keys: this layer's post-RoPE keys if already computed; rotate: the model
    family's RoPE. Returns [B, H, Q, L]; the softmax runs in float32 and is cast back to the hidden dtype, as the
    official implementations do.
    """
    x = layer.input_layernorm(hidden)
    q = _queries(layer, gather_rows(x, queries), gather_rows(cos, queries), gather_rows(sin, queries), rotate)
    k = decoder_keys(layer, hidden, cos, sin, rotate) if keys is None else keys
    key_pos = torch.arange(hidden.shape[1], device=hidden.device)
    allowed = mask.unsqueeze(1).expand(-1, queries.shape[1], -1)  # [B, Q, L]
    if causal:
        allowed = allowed & (key_pos.view(1, 1, -1) <= queries.unsqueeze(-1))
    return _probabilities(layer, q, k, allowed, hidden.dtype)


def cached_attention(layer: nn.Module, hidden: Tensor, cos: Tensor, sin: Tensor, keys: Tensor, mask: Tensor,
                     rotate: Rotate = Family.rotate) -> Tensor:
    """Attention probabilities [B, H, q, kv] of a decode step's q new tokens at a decoder layer over its cached keys.

    hidden: [B, q, D] entering the layer; cos/sin: [B, q, hd] of the new tokens; keys: [B, H_kv, kv, hd] the layer's
    post-RoPE keys as cached (the new tokens' last); mask: [B, kv] real keys. Causal among the new tokens.
    """
    q = _queries(layer, layer.input_layernorm(hidden), cos, sin, rotate)
    q_len, kv_len = hidden.shape[1], keys.shape[2]
    query_pos = torch.arange(kv_len - q_len, kv_len, device=hidden.device)
    allowed = mask.unsqueeze(1) & (torch.arange(kv_len, device=hidden.device).view(1, 1, -1)
                                   <= query_pos.view(1, -1, 1))
    return _probabilities(layer, q, keys, allowed, hidden.dtype)


def _queries(layer: nn.Module, normed: Tensor, cos: Tensor, sin: Tensor, rotate: Rotate) -> Tensor:
    """Post-RoPE queries [B, H, Q, hd] of a decoder layer for the query rows [B, Q, D] after its input norm."""
    attn = layer.self_attn
    q = _heads(attn.q_proj(normed), attn.head_dim, getattr(attn, "q_norm", None))
    return rotate(q, cos, sin)


def _probabilities(layer: nn.Module, q: Tensor, k: Tensor, allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """softmax(q k^T x scaling) over the `allowed` [B, Q, L] keys, in float32, cast to `dtype`: [B, H, Q, L]."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = (q @ k.transpose(-1, -2)) * layer.self_attn.scaling
    logits = logits.masked_fill(~allowed.unsqueeze(1), torch.finfo(logits.dtype).min)
    return logits.softmax(dim=-1, dtype=torch.float32).to(dtype)


def causal_mask(config, mask: Tensor, q_len: int, dtype: torch.dtype, causal: bool = True,
                blocked: Tensor | None = None) -> Tensor | None:
    """The 4-D (or 2-D, or None) mask the model's attention implementation expects, from a 2-D key mask.

    mask: [B, kv] marks real tokens among the keys; the last `q_len` keys are the queries. Built by the same
    transformers function the unpatched model uses, so SDPA keeps its `is_causal` fast path when it can.
    `causal=False`: every query attends to every real key (`Policy.bidirectional_layers`), which FlashAttention's
    causal kernels cannot. blocked: [B, r, kv], keys that each of the last r queries must not see besides (a
    replayed decode-time KV selection, `Policy.replayed_steps`); eager and SDPA take it, FlashAttention has no
    per-query masks.
    """
    if not causal and "flash" in config._attn_implementation:
        raise NotImplementedError("this method runs a decoder layer without the causal mask (as its official code "
                                  "does), which FlashAttention cannot: load the model with attn_implementation="
                                  "'sdpa' or 'eager', or turn that behaviour off in the method's options")
    build = ALL_MASK_ATTENTION_FUNCTIONS[config._attn_implementation]
    kv_len = mask.shape[1]
    function = causal_mask_function if causal else bidirectional_mask_function
    options = {} if causal else {"allow_is_causal_skip": False}
    if blocked is not None:
        if "flash" in config._attn_implementation:
            raise NotImplementedError("replaying a decode-time KV selection needs per-query masks, which "
                                      "FlashAttention does not take: replay with attn_implementation='sdpa' or 'eager'")
        first = kv_len - blocked.shape[1]  # the first query row with a selection

        def unblocked(batch_idx, head_idx, q_idx, kv_idx):
            row = (q_idx - first).clamp(min=0)
            return (q_idx < first) | ~blocked[batch_idx, row, kv_idx]

        function, options = and_masks(function, unblocked), {"allow_is_causal_skip": False}
    return build(
        batch_size=mask.shape[0], q_length=q_len, kv_length=kv_len, q_offset=kv_len - q_len, kv_offset=0,
        mask_function=function, attention_mask=mask, dtype=dtype, device=mask.device, **options,
    )
