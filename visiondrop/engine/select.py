"""Selection primitives shared by every policy: order-preserving top-k and contextual merging."""
from __future__ import annotations

import torch
from torch import Tensor


def topk_in_order(scores: Tensor, k: int) -> Tensor:
    """Indices of the k highest scores per row, returned in ascending (sequence) order.

    The official codes gather kept tokens with a boolean mask or sort the top-k indices, so the kept
    tokens keep their relative order; this is that rule. scores: [B, N] -> [B, k].
    """
    k = min(k, scores.shape[-1])
    return scores.topk(k, dim=-1).indices.sort(dim=-1).values


def complement(index: Tensor, n: int) -> Tensor:
    """The indices in [0, n) not in `index`, ascending, per row. index: [B, k] -> [B, n - k]."""
    return unmarked(torch.zeros(index.shape[0], n, dtype=torch.bool, device=index.device).scatter_(1, index, True),
                    n - index.shape[1])


def unmarked(marked: Tensor, count: int) -> Tensor:
    """The indices of the `count` False entries of each row of `marked` [B, n], ascending: a stable sort puts them
    first in their order, on the device (`nonzero` would read the count back to the host)."""
    return marked.to(torch.uint8).argsort(dim=-1, stable=True)[:, :count]


def contextual_merge(hidden: Tensor, metric: Tensor, remaining: Tensor, n_contextual: int) -> tuple[Tensor, Tensor]:
    """Merge the remaining (non-dominant) tokens into `n_contextual` tokens (VisionZip / VisionDrop rule).

    Anchors are taken at a uniform stride over the remaining tokens (in their current order); every other
    remaining token joins the anchor with the highest cosine similarity of `metric`; a contextual token is
    its anchor's hidden vector plus the mean of its members (just the anchor when it has none).

    hidden: [B, N, D] vectors to merge; metric: [B, N, M] similarity features;
    remaining: [B, R] indices of the tokens to merge, ascending. Returns the merged tokens [B, C, D],
    C = min(n_contextual, R), and the merge's weights [B, C, N] (`Selection.weights`: merged = weights @ hidden,
    up to float rounding; the merged tokens themselves are computed as the official code does).
    """
    n_rem = remaining.shape[1]
    if n_contextual <= 0 or n_rem == 0:
        return hidden.new_zeros(hidden.shape[0], 0, hidden.shape[-1]), hidden.new_zeros(hidden.shape[0], 0,
                                                                                          hidden.shape[1])
    gather = lambda x, idx: x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # noqa: E731
    rem_hidden, rem_metric = gather(hidden, remaining), gather(metric, remaining)
    rem_metric = rem_metric / rem_metric.norm(dim=-1, keepdim=True)

    step = max(1, n_rem // n_contextual)
    anchor_pos = torch.arange(0, n_rem, step, device=hidden.device)[:n_contextual]
    is_anchor = torch.zeros(1, n_rem, dtype=torch.bool, device=hidden.device)
    is_anchor[:, anchor_pos] = True
    members = unmarked(is_anchor, n_rem - anchor_pos.shape[0])[0]  # the other positions, ascending

    similarity = rem_metric[:, members] @ rem_metric[:, anchor_pos].transpose(1, 2)  # [B, members, C]
    assign = torch.zeros_like(similarity).scatter_(2, similarity.argmax(dim=2, keepdim=True), 1.0)
    counts = assign.sum(dim=1).clamp(min=1).unsqueeze(-1)  # [B, C, 1]
    members_mean = assign.transpose(1, 2).to(rem_hidden.dtype) @ rem_hidden[:, members] / counts.to(rem_hidden.dtype)
    # the same combination as weights over all N tokens: 1 on the anchor, 1/count on each member
    local = (assign.transpose(1, 2) / counts).to(hidden.dtype)  # [B, C, members]
    weights = hidden.new_zeros(hidden.shape[0], anchor_pos.shape[0], hidden.shape[1])
    weights.scatter_(2, remaining[:, anchor_pos].unsqueeze(-1), 1.0)
    weights.scatter_add_(2, remaining[:, members].unsqueeze(1).expand(-1, anchor_pos.shape[0], -1), local)
    return rem_hidden[:, anchor_pos] + members_mean, weights
