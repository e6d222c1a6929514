"""ToMe's policy: bipartite soft matching merges r tokens inside every vision-tower layer, as LightCompress runs it.

ToMe (github.com/facebookresearch/ToMe, `tome/merge.py`) targets ViTs; its LLaVA use is ModelTC/LightCompress's
(9701d035, `llmc/compression/token_reduction/tome.py`, `configs/sparsification/methods/ToMe/tome.yml`, `r: 16`),
whose settings this policy takes, because they are the only published ones for LLaVA:
- in every CLIP layer, between the attention (with its residual) and the MLP, the tokens are split into
  alternating sets a (even places) and b (odd places); each a scores its most cosine-similar b on the layer's keys
  averaged over the heads; the r a's with the highest scores (CLS never) are merged into their b's; the merged
  token is the plain mean of the b and the a's merged into it (LightCompress's `merge_wavg` with no size carried
  between layers, and no proportional attention: ToMe's own ViT patch does both); the new order is [the other a's
  in their order, then every b], so CLS stays first; at most (tokens - 1) // 2 merges a layer;
- LLaVA projects the output of CLIP layer 22 (`hidden_states[-2]`) without CLS, so the LLM sees 576 - sum of r
  over layers 0..22 tokens (r = 16: 208), the same in every decoder layer; LightCompress also merges in layer 23,
  whose output LLaVA does not use (here it is left alone). Merged tokens have no single origin: the trace reports
  every ToMe token as merged.
Budgets: T tokens means removing 576 - T over the 23 layers, evenly (r = (576 - T) // 23 a layer, one more in the
first (576 - T) % 23); `r=` (an int per layer, or one per layer) replaces the budget, as LightCompress's `r`.
LLaVA-NeXT and Video-LLaVA: per crop or frame (budget / crops), compact layout. Qwen2.5-VL's windowed tower groups
patches 2x2 for its merger, so merging inside it would break the groups: there the same schedule runs as
successive rounds at the tower's output on the last full-attention block's keys (the project's adaptation; neither
ToMe nor LightCompress covers Qwen2.5-VL). LLaVA-OneVision's SigLIP has no CLS to protect and pools its video frames
after the projector: the same rounds at the tower's output (images: per crop, counts scaled to its 729 patches;
videos: per frame among the 196 pooled, projected tokens on the pooled keys, merging in LLM space).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor

from visiondrop.engine import EncoderView, Policy, Selection
from visiondrop.families import ModelInfo
from visiondrop.methods import Method, Overhead

if TYPE_CHECKING:
    from visiondrop.core import Cut, Dims


def bipartite_merge(x: Tensor, metric: Tensor, r: int, protect_first: bool) -> Tensor:
    """One ToMe step on [N, T, D] tokens: merge up to r of the even-place tokens into their most similar odd-place
    token (plain mean), on `metric` [N, T, M]; `protect_first` keeps token 0 (CLS) unmerged. Returns
    [N, T - r', D], r' = min(r, (T - protect_first) // 2), ordered [unmerged even-place tokens, odd-place tokens]."""
    r = min(r, (x.shape[1] - int(protect_first)) // 2)
    if r <= 0:
        return x
    unit = metric / metric.norm(dim=-1, keepdim=True)
    scores = unit[:, ::2] @ unit[:, 1::2].transpose(-1, -2)
    if protect_first:
        scores[:, 0, :] = -torch.inf
    best, partner = scores.max(dim=-1)
    ranked = best.argsort(dim=-1, descending=True)[..., None]
    kept, merged = ranked[:, r:], ranked[:, :r]
    if protect_first:
        kept = kept.sort(dim=1).values  # CLS first
    into = partner[..., None].gather(1, merged)
    a, b = x[:, ::2], x[:, 1::2]
    n, width = x.shape[0], x.shape[-1]
    sums = b.scatter_reduce(1, into.expand(n, r, width), a.gather(1, merged.expand(n, r, width)), reduce="sum")
    counts = torch.ones_like(b[..., :1]).scatter_reduce(1, into, torch.ones_like(a[:, :r, :1]), reduce="sum")
    return torch.cat([a.gather(1, kept.expand(n, kept.shape[1], width)), sums / counts], dim=1)


def even_schedule(removed: int, layers: int) -> list[int]:
    """`removed` merges over `layers` layers, as even as whole numbers allow (the extra ones first)."""
    return [removed // layers + int(i < removed % layers) for i in range(layers)]


def remaining(tokens: int, schedule: Sequence[int], protected: int) -> list[int]:
    """Tokens entering each layer and leaving the last, under the per-layer cap of (tokens - protected) // 2."""
    counts = [tokens]
    for r in schedule:
        counts.append(counts[-1] - min(r, (counts[-1] - protected) // 2))
    return counts


class ToMe(Policy):
    name = "tome"
    merges_in_tower = True

    def __init__(self, schedule: list[int], info: ModelInfo, patches: int):
        self.schedule, self.crops, self.patches = schedule, info.crops, patches
        self.encoder_layer = info.vision_layer

    def merge_in_tower(self, layer: int, hidden: Tensor, metric: Tensor) -> Tensor:
        return bipartite_merge(hidden, metric, self.schedule[layer], protect_first=True)

    def select_encoder(self, view: EncoderView) -> Selection:
        first = int(view.has_cls)
        tokens, weights = view.hidden[:, first:], None
        if not view.merged_in_tower:  # a tower that cannot merge inside: the same rounds at its output
            keep = max(view.scaled(describe_tokens(self.schedule, self.patches)), 1)
            metric = view.keys.mean(1)[:, first:]
            n, width = tokens.shape[1], tokens.shape[-1]
            # where the view has side features (Qwen3-VL's DeepStack), the identity rides along: the plain means
            # turn it into the merges' weights (`Selection.weights`), by which the engine merges those features
            carried = [tokens, metric] + ([torch.eye(n, dtype=tokens.dtype, device=tokens.device).expand(
                tokens.shape[0], -1, -1)] if view.side is not None else [])
            x = torch.cat(carried, -1)
            for r in even_schedule(n - keep, len(self.schedule)):
                x = bipartite_merge(x, x[..., width:width + metric.shape[-1]], r, protect_first=False)
            tokens = x[..., :width]
            if view.side is not None:
                weights = torch.nn.functional.pad(x[..., width + metric.shape[-1]:], (first, 0))
        return Selection(tokens.new_zeros(tokens.shape[0], 0, dtype=torch.long), tokens, weights)

    def describe(self) -> dict:
        kept = remaining(self.patches + 1, self.schedule, 1)[-1] - 1
        return {"method": self.name, "encoder_layer": self.encoder_layer, "r": self.schedule,
                "equivalent_tokens": kept * self.crops}  # NeXT: nominal crops


def policy(info: ModelInfo, budget: float | None = None, r: int | list[int] | None = None) -> Policy:
    """ToMe removing (patches - budget / crops) tokens per crop evenly over the tower's layers up to the feature
    layer, or `r` merges a layer (an int for every layer, or a list, one per layer; LightCompress: 16)."""
    layers = info.vision_layer + 1
    patches = info.per_crop - int(info.cls_kept)
    if r is not None:
        schedule = [int(r)] * layers if isinstance(r, int) else [int(v) for v in r]
        if len(schedule) != layers or min(schedule) < 0:
            raise ValueError(f"r is one merge count >= 0 for every layer or a list of {layers} (layers 0..{layers - 1}"
                             f" up to the feature layer); got {r!r}")
        if budget is not None and budget != describe_tokens(schedule, patches) * info.crops:
            raise ValueError(f"budget={budget} disagrees with r={r!r}, which keeps "
                             f"{describe_tokens(schedule, patches) * info.crops}")
        return ToMe(schedule, info, patches)
    if budget is None:
        raise ValueError("ToMe needs budget= or r= (merges per layer)")
    keep = round(budget / info.crops)
    schedule = even_schedule(max(patches - keep, 0), layers)
    if describe_tokens(schedule, patches) != keep:
        raise ValueError(f"ToMe cannot reach budget {budget:g}: at most (tokens - 1) // 2 merges a layer, so the "
                         f"smallest reachable budget is {smallest_budget(info):g} (or {info.n_visual} for the "
                         "unpruned model)")
    return ToMe(schedule, info, patches)


def describe_tokens(schedule: list[int], patches: int) -> int:
    return remaining(patches + 1, schedule, 1)[-1] - 1


def smallest_budget(info: ModelInfo) -> float:
    """The smallest whole count per crop an even schedule reaches under the per-layer cap, times the crops."""
    layers, patches = info.vision_layer + 1, info.per_crop - int(info.cls_kept)
    keep = next(k for k in range(1, patches) if describe_tokens(even_schedule(patches - k, layers), patches) == k)
    return keep * info.crops


def tower(dims: Dims, cut: Cut) -> tuple[list[int], int]:
    """The tokens entering each tower layer and leaving the last, and the multiply-accumulates of ToMe's own work:
    the matching's a @ b.T on the head-averaged keys at every merging layer, and the engine's keys and CLS row of
    the feature layer's input (counted by the FLOPs count on `cut.before`, what leaves its merge). `cut.before` is
    the feature layer's output under the even schedule (CLS included); the layers after it merge nothing."""
    layers = dims.vision_layers - 1  # LLaVA projects the second-to-last layer
    counts = remaining(dims.vision_tokens, even_schedule(dims.vision_tokens - cut.before, layers), 1)
    dv, head_dim = dims.vision_hidden, dims.vision_hidden // dims.vision_heads
    matching = sum((t - t // 2) * (t // 2) * head_dim for t in counts[:-1])
    feature_input = (counts[-2] - counts[-1]) * (dv * dv + dv)
    return counts + [counts[-1]] * (dims.vision_layers - layers), matching + feature_input


def overhead(**_) -> Overhead:
    return Overhead(tower=tower)


METHOD = Method("tome", "ToMe", policy, smallest_budget, overhead=overhead, replaces_budget=("r",),
                example_budget=192, scoring=lambda **_: {"encoder": "similarity"}, second_example=(128, {}))
