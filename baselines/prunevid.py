"""PruneVid (ACL 2025): merge static tokens across a video's segments and cluster the rest before the language model,
then keep the video tokens the question attends to most inside it.

As the official code does it (github.com/Visual-AI/PruneVid, PLLaVA-7B: `models/pllava/modeling_pllava.py::
merge_frames_dynamic`, `cluster_dpc_knn`, `refine_clusters`, `segment_lengths`, and `models/pllava/llama.py`; read at
a7fd7118; `scripts/eval.sh`: tau 0.8, temporal_segment_ratio 0.25, cluster_ratio 0.5, selected_layer 10, alpha 0.4),
on a video's projected tokens, F frames of N tokens:
Stage 1, before the language model (a cut before decoder layer 0):
1. temporal segments: the frames' mean tokens clustered by DPC-kNN (k = 7) into int(0.25 F) clusters, made
   contiguous (`refine_clusters`: each cluster keeps its longest run, other runs join the neighbour with the longer
   run, ties to the left; a cluster of single frames only is dissolved), then cut where the label changes;
2. per segment of W frames: a place is static where the mean cosine similarity of its tokens over the segment's
   frame pairs exceeds tau (W = 1: 0 / 0, so none is); the static tokens are averaged over the W frames and, if more
   than 14, clustered by DPC-kNN (k = 7) into half as many cluster means; each frame's dynamic tokens likewise, into
   int(0.5 n) when more than 14; laid out [static, dynamic frame by frame] per segment, cluster means in the order of
   their centres' DPC scores.
Stage 2, in the language model: the video tokens' scores are layer 10's attention (no RoPE, no causal mask, softmax
over every real token) from every token after the video, the maximum over heads and queries; per segment the top
int(alpha x n) of its static tokens and of each frame's dynamic tokens stay, in order, with their positions (gaps).
The layer-10 output is pruned: here a cut before layer 11 (relative depth on other decoders: `ModelInfo.
relative_layers`), scored on what entered layer 10.

Where this differs from the official code:
- the official DPC-kNN adds `torch.rand(...) * 1e-6` to the densities to break ties; here no noise (deterministic,
  the same in a batch and alone): ties fall as torch's comparisons and topk break them. The parity fixture
  (`tests/parity/prunevid/`) runs the official functions with `torch.rand` patched to zeros;
- the official stage 2 also prunes the KV caches of layers 0-10 to the kept tokens, so decode steps there see only
  them; here layers 0-10 keep every stage-1 token in their caches (decode steps see what the prefill saw, and a cached
  decode equals replaying the prefill's decisions);
- the official code runs at batch size 1 (it asserts it); any batch here equals each video alone.
Positions: stage 1 shortens the sequence (contiguous on Video-LLaVA, as in PLLaVA); on Qwen2.5-VL every stage-1 token
takes the M-RoPE position of a token it stands for (a static mean: its place in the segment's first frame; a cluster
mean: its centre). Stage 2 keeps positions with gaps.

Budgets: alpha (option `alpha`, official 0.4) sets stage 2; with a budget (or `ratio=`) alpha is solved per video from
its stage-1 count so that the mean visual tokens over the decoder layers is that share of the video's own tokens (at
most 1: a video that stage 1 already brings below the budget keeps all of them in stage 2; a budget below what the
layers before the cut see alone is refused at the cut, naming it). Videos need at least 7 frames (the official
temporal clustering takes 7 neighbours); images are refused.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from visiondrop.core import Cut, ModelInfo
from visiondrop.engine import DecoderCut, Policy, Selection
from visiondrop.engine.attention import decoder_attention
from visiondrop.methods import Method, Overhead, Unreachable
from visiondrop.methods.shared import retention, video_layout

TAU, SEGMENT_RATIO, CLUSTER_RATIO, ALPHA = 0.8, 0.25, 0.5, 0.4  # the official eval.sh
SELECTED_LAYER = 10  # of PLLaVA's 32-layer decoder
NEIGHBOURS = 7  # DPC-kNN's k, temporal and spatial
MIN_CLUSTERED = 14  # a group of more tokens than this is clustered


def dpc_knn(x: Tensor, clusters: int, k: int = NEIGHBOURS) -> tuple[Tensor, Tensor]:
    """DPC-kNN of tokens x [N, C]: (each token's cluster [N], the clusters' centres [clusters] by score), as the
    official `cluster_dpc_knn` without its tie-breaking noise."""
    dist = torch.cdist(x.float()[None], x.float()[None])[0] / x.shape[-1] ** 0.5
    nearest = dist.topk(k, dim=-1, largest=False).values
    density = (-(nearest ** 2).mean(-1)).exp()
    higher = (density[None, :] > density[:, None]).to(dist.dtype)
    delta = (dist * higher + dist.max() * (1 - higher)).min(-1).values
    centres = (delta * density).topk(clusters).indices
    assign = dist[centres].argmin(0)
    assign[centres] = torch.arange(clusters, device=x.device)
    return assign, centres


def cluster_means(x: Tensor, assign: Tensor, clusters: int) -> Tensor:
    """The mean of each cluster's tokens [clusters, C] (`compute_cluster_vectors`)."""
    onehot = F.one_hot(assign, clusters).to(x.dtype)
    return (onehot.T @ x) / onehot.sum(0).clamp(min=1).unsqueeze(-1)


def contiguous(labels: list[int]) -> list[int]:
    """The official `refine_clusters` on one video's frame labels: each cluster keeps its longest run; its other runs,
    and clusters whose runs are all single frames, join the neighbouring run that is longer (left on ties)."""
    refined = list(labels)
    for label in sorted(set(labels)):
        runs, start = [], None
        for i, value in enumerate(labels + [None]):
            if value == label and start is None:
                start = i
            elif value != label and start is not None:
                runs.append((start, i - 1))
                start = None
        longest = max(end - start + 1 for start, end in runs)
        for start, end in runs:
            if longest == 1 or end - start + 1 != longest:
                refined[start:end + 1] = [-1] * (end - start + 1)
    i = 0
    while i < len(refined):
        if refined[i] != -1:
            i += 1
            continue
        start = i
        while i < len(refined) and refined[i] == -1:
            i += 1
        end = i - 1
        left = right = None
        left_length = right_length = 0
        if start > 0:
            left = refined[start - 1]
            j = start - 1
            while j >= 0 and refined[j] == left:
                j -= 1
            left_length = start - j - 1
        if end < len(refined) - 1:
            right = refined[end + 1]
            j = end + 1
            while j < len(refined) and refined[j] == right:
                j += 1
            right_length = j - end - 1
        if left_length > right_length:
            label = left
        elif right_length > left_length:
            label = right
        else:
            label = left if left is not None else right
        refined[start:end + 1] = [0 if label is None else label] * (end - start + 1)
    return refined


def segments(frames: Tensor) -> list[int]:
    """Frames per temporal segment of a video [F, N, C]."""
    labels, _ = dpc_knn(frames.mean(1), int(frames.shape[0] * SEGMENT_RATIO))
    labels = contiguous(labels.tolist())
    lengths, count = [], 1
    for previous, label in zip(labels, labels[1:]):
        if label == previous:
            count += 1
        else:
            lengths.append(count)
            count = 1
    return lengths + [count]


def spatial_merge(x: Tensor, places: Tensor, clusters: int) -> tuple[Tensor, Tensor]:
    """Tokens x [n, C] at `places` [n] (slots) clustered when more than 14: (tokens, the slot each stands for)."""
    if x.shape[0] <= MIN_CLUSTERED:
        return x, places
    assign, centres = dpc_knn(x, clusters)
    return cluster_means(x, assign, clusters), places[centres]


def merge_video(video: Tensor, frames: int, tau: float = TAU) -> tuple[Tensor, Tensor, list[list[int]]]:
    """Stage 1 on one video [F x N, C]: (tokens [m, C], the slot each stands for [m], per segment the sizes of its
    groups [static, dynamic of each frame])."""
    x = video.view(frames, -1, video.shape[-1])
    per_frame = x.shape[1]
    tokens, slots, groups = [], [], []
    start = 0
    for width in segments(x):
        window = x[start:start + width]
        normed = F.normalize(window, p=2, dim=-1)
        similarity = torch.einsum("wlc,tlc->wtl", normed, normed)
        similarity = (similarity.sum(dim=-2) - 1).sum(dim=-2) / (width * (width - 1))
        static = similarity > tau
        place = torch.arange(per_frame, device=video.device)
        merged, where = spatial_merge(window[:, static].mean(0), start * per_frame + place[static],
                                      int(static.sum()) // 2)
        sizes = [merged.shape[0]]
        tokens.append(merged)
        slots.append(where)
        for f in range(width):
            merged, where = spatial_merge(window[f, ~static], (start + f) * per_frame + place[~static],
                                          int(int((~static).sum()) * CLUSTER_RATIO))
            sizes.append(merged.shape[0])
            tokens.append(merged)
            slots.append(where)
        groups.append(sizes)
        start += width
    return torch.cat(tokens).to(video.dtype), torch.cat(slots), groups


def stage_two(scores: Tensor, groups: list[list[int]], alpha: float) -> Tensor:
    """Kept indices (ascending) among the stage-1 tokens, by their scores [m]: the top int(alpha x n) of every group."""
    keep, offset = [], 0
    for sizes in groups:
        for n in sizes:
            k = int(n * alpha)
            if k:
                keep.append(scores[offset:offset + n].topk(k).indices + offset)
            offset += n
    return torch.cat(keep).sort().values if keep else scores.new_zeros(0, dtype=torch.long)


class PruneVid(Policy):
    name = "prunevid"

    def __init__(self, info: ModelInfo, share: float | None, alpha: float | None, tau: float):
        self.info, self.share, self.alpha, self.tau = info, share, alpha, tau
        self.selected_layer = info.relative_layers([SELECTED_LAYER], "PruneVid's selected layer")[0]
        self.cut_layers = (0, self.selected_layer + 1)

    def renumbers_at(self, layer_idx: int) -> bool:
        return layer_idx == 0  # stage 1 shortens the sequence; stage 2 keeps positions with gaps

    def select_decoder(self, cut: DecoderCut) -> Selection:
        if cut.layer_idx == 0:
            return self._merge(cut)
        return self._prune(cut)

    def _merge(self, cut: DecoderCut) -> Selection:
        frames = video_layout(cut, "PruneVid").frames
        if frames < NEIGHBOURS:
            raise ValueError(f"PruneVid clusters a video's frames with their {NEIGHBOURS} nearest: it needs at least "
                             f"{NEIGHBOURS} frames, this video has {frames}")
        merged, slots = [], []
        for b, video in zip(cut.samples, cut.visual_rows(cut.hidden)):
            tokens, where, groups = merge_video(video, frames, self.tau)
            cut.scratch[b] = groups
            merged.append(tokens)
            slots.append(where)
        empty = [cut.visual.new_zeros(0) for _ in cut.samples]
        return Selection(empty, merged, slots)

    def _prune(self, cut: DecoderCut) -> Selection:
        identity = lambda x, cos, sin: x  # noqa: E731  (scored without RoPE, as the official layer returns it)
        keep = []
        for g, b in enumerate(cut.samples):
            end = int(cut.visual[g, -1]) + 1
            after = torch.arange(end, cut.hidden.shape[1], device=cut.visual.device)[None]  # every token after it
            rows = decoder_attention(cut.layers[self.selected_layer], cut.prev_hidden[g:g + 1], cut.cos[g:g + 1],
                                     cut.sin[g:g + 1], cut.mask[g:g + 1], after, rotate=identity, causal=False)
            scores = rows[0].amax(dim=(0, 1))[cut.visual[g]]  # the maximum over heads and queries
            keep.append(stage_two(scores, cut.scratch[b], self._alpha(cut, g)))
        return Selection(keep)

    def _alpha(self, cut: DecoderCut, g: int) -> float:
        """The official alpha, or the one that brings this video's mean over the layers to its share."""
        if self.alpha is not None:
            return self.alpha
        layers, before = self.info.n_layers, self.selected_layer + 1
        target = self.share * cut.original_visual * layers
        needed = (target - before * cut.n_visual) / ((layers - before) * cut.n_visual)
        if needed <= 0:
            reach = before * cut.n_visual / layers / cut.original_visual
            raise Unreachable(f"PruneVid's first stage keeps {cut.n_visual} of this video's "
                              f"{cut.original_visual} tokens through its first {before} layers: it cannot keep "
                              f"{self.share:.4g} of them on average, the least it keeps is {reach:.4g}")
        return min(needed, 1.0)

    def describe(self) -> dict:
        described = {"method": self.name, "layers": list(self.cut_layers), "tau": self.tau}
        if self.alpha is not None:
            return described | {"alpha": self.alpha}
        return described | {"share": self.share, "equivalent_tokens": round(self.share * self.info.n_visual)}


def policy(info: ModelInfo, budget: float | None = None, alpha: float | None = None, tau: float = TAU) -> Policy:
    """PruneVid keeping about `budget` of the nominal visual tokens on average over the layers (that share of each
    video), or with the official `alpha` (0.4)."""
    if (alpha is None) == (budget is None):
        raise ValueError(f"give PruneVid a budget (or ratio=) or alpha= (the official runs use {ALPHA}), one of them")
    if budget is not None and budget < smallest_budget(info):
        raise Unreachable(f"PruneVid keeps whole tokens: the smallest reachable budget is {smallest_budget(info):g} "
                          f"(or {info.n_visual} for the unpruned model)", smallest_budget(info))
    if alpha is not None and not 0 < alpha <= 1:
        raise ValueError(f"alpha is the share of stage-1 tokens PruneVid keeps in the LLM, in (0, 1]; got {alpha}")
    return PruneVid(info, None if budget is None else retention(budget, info), alpha, tau)


def selection_macs(cut: Cut, width: int) -> int:
    """Stage 1: the pairwise distances of the DPC-kNN clustering and the frames' cosines (about n^2 / F + n per
    token); stage 2's attention rows are charged by `Overhead.rows`."""
    return cut.before * width * 2 if cut.layer == 0 else 0


def smallest_budget(info: ModelInfo) -> float:
    """A token: what a video reaches depends on what its first stage keeps (refused at the cut where it is too much)."""
    return 1


METHOD = Method("prunevid", "PruneVid", policy, smallest_budget, replaces_budget=("alpha",),
                video_only=True, exact_count=False,
                overhead=lambda **_: Overhead(rows="question", selection=selection_macs),
                scoring=lambda **_: {"decoder": "question"})
