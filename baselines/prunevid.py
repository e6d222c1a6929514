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
relative_layers`), scored on what entered layer 10. The KV caches of layers 0-10 are pruned to the same tokens
(`models/pllava/elastic_cache.py::VTPWindowCache.prompt_prefill` slices them by the kept indices), so the decode
steps attend there to what layer 11 keeps, and the memory is freed. Here too (`prune_cache`, on by default), through
the engine's pruned caches (`Policy.pruned_cache_layers`): once the prefill is done, the caches of layers 0 to the
selected one keep the text and the kept tokens only (in a batch each row's cache is left-padded to the longest
row's count, the padding masked), and decode positions continue from the prompt's length as the language model
received it after stage 1 (the official `original_number`). `prune_cache=False`: those layers keep every stage-1 token in their caches, and the decode steps
there attend to them all.

Where this differs from the official code:
- the official DPC-kNN adds `torch.rand(...) * 1e-6` to the densities to break ties; here no noise (deterministic,
  the same in a batch and alone): ties fall as torch's comparisons and topk break them. The parity fixture
  (`tests/parity/prunevid/`) runs the official functions with `torch.rand` patched to zeros;
- the official code runs at batch size 1 (it asserts it); any batch here equals each video alone;
- the official code loops on the host over segments, frames and clusters; here both stages run on the device
  without reading a value on the host (`first_stage`: the segmentation, and every segment's and frame's clustering
  as masked groups at once, padded; stage 2's per-group top-k as ranks within the groups), with the same results
  (the parity fixture runs through `merge_video`, which unpads `first_stage`'s).
Positions: stage 1 shortens the sequence (contiguous on Video-LLaVA and OneVision, as in PLLaVA); on Qwen2.5-VL and
Qwen3-VL every stage-1 token takes the M-RoPE position of a token it stands for (a static mean: its place in the
segment's first frame; a cluster mean: its centre), and on Qwen3-VL lies in that frame's span (after its timestamp,
which is text and never cut), with its members' DeepStack rows by the weights that made it (`merge_video`). Stage 2
keeps positions with gaps.
OneVision's newline after the video (`shared.VideoLayout`): the released code is PLLaVA's, which has none;
LightCompress runs stage 1 where the LLaVA-NeXT code appends the newline after it (a hook on `get_2dPool`), so the
newline is kept after the stage-1 tokens (`Selection.trailing`), and stage 2 scores and prunes only those (the
newline stays, and is not counted in the video's share).

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
from visiondrop.methods.shared import density_peaks, retention, video_layout

TAU, SEGMENT_RATIO, CLUSTER_RATIO, ALPHA = 0.8, 0.25, 0.5, 0.4  # the official eval.sh
SELECTED_LAYER = 10  # of PLLaVA's 32-layer decoder
NEIGHBOURS = 7  # DPC-kNN's k, temporal and spatial
MIN_CLUSTERED = 14  # a group of more tokens than this is clustered


def dpc_knn(x: Tensor, clusters: int, k: int = NEIGHBOURS) -> tuple[Tensor, Tensor]:
    """DPC-kNN of tokens x [N, C]: (each token's cluster [N], the clusters' centres [clusters] by score), as the
    official `cluster_dpc_knn` without its tie-breaking noise."""
    dist, score = density_peaks(x, k)
    centres = score.topk(clusters).indices
    assign = dist[centres].argmin(0)
    assign[centres] = torch.arange(clusters, device=x.device)
    return assign, centres


def contiguous(labels: Tensor) -> Tensor:
    """The official `refine_clusters` on one video's frame labels [F], on the device: each cluster keeps its longest
    run(s) (a cluster of single frames only keeps none); every gap left joins the neighbouring run that is longer
    then, left on ties (the official left-to-right pass, whose earlier fills lengthen the runs on their left)."""
    frames = labels.shape[0]
    at = torch.arange(frames, device=labels.device)
    starts = torch.cat([labels.new_ones(1, dtype=torch.bool), labels[1:] != labels[:-1]])
    run = starts.long().cumsum(0) - 1
    run_length = torch.zeros(frames, dtype=torch.long, device=labels.device).index_add_(0, run, torch.ones_like(run))
    length = run_length[run]
    longest = torch.zeros(frames, dtype=torch.long, device=labels.device).scatter_reduce(0, labels, length, "amax")
    kept = (length == longest[labels]) & (longest[labels] > 1)
    refined = torch.where(kept, labels, -1)
    # each gap frame's right neighbour: the next kept frame's label and the length of its kept run
    ends = torch.cat([refined[1:] != refined[:-1], refined.new_ones(1, dtype=torch.bool)]) & kept
    suffix = torch.where(ends, at, frames).flip(0).cummin(0).values.flip(0)  # the end of the run at or after
    next_kept = torch.where(kept, at, frames).flip(0).cummin(0).values.flip(0)
    has_right = next_kept < frames
    right = torch.where(has_right, refined[next_kept.clamp(max=frames - 1)], -1)
    right_length = torch.where(has_right, suffix[next_kept.clamp(max=frames - 1)] - next_kept + 1, 0)
    out, label, run_so_far = refined.clone(), labels.new_full((), -1), labels.new_zeros(())
    fill = labels.new_full((), -1)
    for i in range(frames):  # the official pass, as device arithmetic (no value read on the host)
        gap_start = ~kept[i] & (kept[i - 1] if i else torch.ones((), dtype=torch.bool, device=labels.device))
        chosen = torch.where(run_so_far > right_length[i], label,
                             torch.where(right_length[i] > run_so_far, right[i],
                                         torch.where(label >= 0, label, torch.where(has_right[i], right[i], 0))))
        fill = torch.where(gap_start, chosen, fill)
        out[i] = torch.where(kept[i], refined[i], fill)
        run_so_far = torch.where(out[i] == label, run_so_far + 1, 1)
        label = out[i]
    return out


def dpc_knn_masked(x: Tensor, member: Tensor, clusters: Tensor, k: int = NEIGHBOURS) -> tuple[Tensor, Tensor]:
    """`dpc_knn` on the members of each of P groups at once: x [P, N, C], member [P, N], clusters [P] (on the
    device). Returns (each member's cluster [P, N], as the rank of its centre by score; the place of the centre of
    rank r [P, N], valid for r < clusters)."""
    dist, score = density_peaks(x, k, member)
    order = score.argsort(dim=-1, descending=True, stable=True)
    rank = order.argsort(dim=-1)
    centre = member & (rank < clusters[:, None])
    to_centre = dist.gather(1, order[:, :, None].expand_as(dist))  # [P, r, i]: from the centre of rank r to i
    ranks = torch.arange(x.shape[1], device=x.device)
    to_centre = to_centre.masked_fill(ranks[None, :, None] >= clusters[:, None, None], float("inf"))
    assign = torch.where(centre, rank, to_centre.argmin(1))
    return assign, order


def group_merge(x: Tensor, member: Tensor, clusters: Tensor,
                clustered: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Each of P groups' members [P, N] of tokens x [P, N, C]: where `clustered`, DPC-kNN into `clusters` cluster means
    in the order of their centres' scores (`compute_cluster_vectors`); else the members themselves, in order. Returns
    (tokens [P, N, C], how many are real [P] (the first), the place each stands for [P, N], the weights [P, N, N]
    over the places that make each)."""
    places = x.shape[1]
    assign, order = dpc_knn_masked(x, member & clustered[:, None], clusters)
    onehot = ((assign[:, None, :] == torch.arange(places, device=x.device)[None, :, None])
              & member[:, None, :]).to(x.dtype)
    means = onehot @ x / onehot.sum(-1, keepdim=True).clamp(min=1)
    in_order = (~member).long().argsort(dim=-1, stable=True)  # the members first, in place order
    tokens = torch.where(clustered[:, None, None], means, x.gather(1, in_order[:, :, None].expand_as(x)))
    count = torch.where(clustered, clusters, member.sum(-1))
    stands_for = torch.where(clustered[:, None], order, in_order)
    own = F.one_hot(in_order, places).to(x.dtype)
    weights = torch.where(clustered[:, None, None], onehot / onehot.sum(-1, keepdim=True).clamp(min=1), own)
    return tokens, count, stands_for, weights


def first_stage(video: Tensor, frames: int, tau: float = TAU, weights: bool = True
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """Stage 1 on one video [F x N, C], on the device: its tokens padded to [2F x N, C] with the real ones first
    (`valid` [2F x N]), in the official order (per segment its static tokens, then each frame's dynamic ones); the
    slot each stands for; the group of each (an id, equal within a group: stage 2 keeps a share of each group); and,
    with `weights`, the weights [2F x N, F x N] that make each of the video's tokens (side rows merge alike)."""
    x = video.view(frames, -1, video.shape[-1])
    per_frame, device = x.shape[1], video.device
    at = torch.arange(frames, device=device)
    labels, _ = dpc_knn(x.mean(1), int(frames * SEGMENT_RATIO))
    refined = contiguous(labels)
    segment = torch.cat([refined.new_zeros(1), (refined[1:] != refined[:-1]).long()]).cumsum(0)  # [F]
    members = (segment[None, :] == at[:, None]).to(x.dtype)  # [S, F], S <= F segments (the rest empty)
    width = members.sum(1)  # [S]
    normed = F.normalize(x, p=2, dim=-1)
    same = (segment[:, None] == segment[None, :]).to(x.dtype)  # frames of one segment
    pairs = torch.einsum("wlc,tlc->wtl", normed, normed) * same[:, :, None]
    similarity = (members @ (pairs.sum(dim=-2) - 1)) / (width * (width - 1))[:, None]  # [S, N]; 0 / 0 for W = 1
    static = similarity > tau
    means = torch.einsum("sf,fnc->snc", members, x) / width.clamp(min=1)[:, None, None]
    dynamic = ~static[segment]  # [F, N]
    n_static, n_dynamic = static.sum(-1), dynamic.sum(-1)
    group_x = torch.cat([means, x])
    member = torch.cat([static, dynamic])
    clusters = torch.cat([n_static // 2, (n_dynamic.double() * CLUSTER_RATIO).long()])
    clustered = torch.cat([n_static, n_dynamic]) > MIN_CLUSTERED
    tokens, count, stands_for, made_of = group_merge(group_x, member, clusters, clustered)
    first_frame = torch.where(width > 0, members.argmax(1), frames)  # an empty segment's: none (after all)
    group = torch.cat([2 * first_frame, 2 * at + 1])  # static before the segment's frames' dynamic ones
    frame_of = torch.cat([first_frame.clamp(max=frames - 1), at])
    slots = stands_for + (frame_of * per_frame)[:, None]
    real = torch.arange(per_frame, device=device)[None, :] < count[:, None]
    key = torch.where(real, group[:, None] * per_frame + torch.arange(per_frame, device=device), (2 * frames + 2) *
                      per_frame).flatten()
    order = key.argsort(stable=True)
    made = None
    if weights:  # over the video's tokens: a static group's places in each of its segment's frames, a frame's own
        over_frames = torch.cat([members / width.clamp(min=1)[:, None], torch.eye(frames, dtype=x.dtype,
                                                                                  device=device)])  # [2F, F]
        made = (over_frames[:, None, :, None] * made_of[:, :, None, :]).flatten(2).flatten(0, 1)[order]
    return (tokens.flatten(0, 1)[order].to(video.dtype), real.flatten()[order], slots.flatten()[order],
            group[:, None].expand(-1, per_frame).flatten()[order], made)


def merge_video(video: Tensor, frames: int, tau: float = TAU) -> tuple[Tensor, Tensor, list[list[int]], Tensor]:
    """Stage 1 on one video [F x N, C] as the official `merge_frames_dynamic` returns it (for the parity fixture;
    the policy keeps `first_stage`'s padded form on the device): (tokens [m, C], the slot each stands for [m], per
    segment the sizes of its groups [static, dynamic of each frame], the weights [m, F x N] that make each)."""
    tokens, real, slots, group, made = first_stage(video, frames, tau)
    labels = contiguous(dpc_knn(video.view(frames, -1, video.shape[-1]).mean(1), int(frames * SEGMENT_RATIO))[0])
    sizes = torch.zeros(2 * frames + 2, dtype=torch.long).index_add_(0, group[real].cpu(),
                                                                      torch.ones(int(real.sum()), dtype=torch.long))
    groups, start = [], 0
    for width in torch.unique_consecutive(labels, return_counts=True)[1].tolist():
        groups.append([int(sizes[2 * start])] + [int(sizes[2 * f + 1]) for f in range(start, start + width)])
        start += width
    return tokens[real], slots[real], groups, made[real]


def stage_two(scores: Tensor, group: Tensor, alpha: float, groups: int) -> Tensor:
    """Which stage-1 tokens [m] stay [m] (bool), by their scores [m] and groups [m] (ids below `groups`): the top
    int(alpha x n) of every group of n, on the device (each score's rank within its group, below the group's
    count)."""
    at = torch.arange(scores.shape[0], device=scores.device)
    by_score = scores.argsort(descending=True, stable=True)
    order = by_score[group[by_score].argsort(stable=True)]  # by group, then by score
    ordered = group[order]
    first = torch.cat([ordered.new_ones(1, dtype=torch.bool), ordered[1:] != ordered[:-1]])
    rank = at - torch.where(first, at, 0).cummax(0).values
    size = torch.zeros(groups, dtype=torch.long, device=scores.device).index_add_(0, group, torch.ones_like(group))
    kept = torch.zeros_like(first)
    kept[order] = rank < (size.double() * alpha).floor().long()[ordered]
    return kept


class PruneVid(Policy):
    name = "prunevid"

    def __init__(self, info: ModelInfo, share: float | None, alpha: float | None, tau: float, prune_cache: bool = True):
        self.info, self.share, self.alpha, self.tau, self.prune_cache = info, share, alpha, tau, prune_cache
        self.selected_layer = info.relative_layers([SELECTED_LAYER], "PruneVid's selected layer")[0]
        self.cut_layers = (0, self.selected_layer + 1)
        if prune_cache:  # the caches of the layers up to the selected one keep only what stage 2 kept
            self.pruned_cache_layers = tuple(range(self.selected_layer + 1))

    def renumbers_at(self, layer_idx: int) -> bool:
        return layer_idx == 0  # stage 1 shortens the sequence; stage 2 keeps positions with gaps

    def select_decoder(self, cut: DecoderCut) -> Selection:
        if cut.layer_idx == 0:
            return self._merge(cut)
        return self._prune(cut)

    def _merge(self, cut: DecoderCut) -> Selection:
        layout = video_layout(cut, "PruneVid")
        if layout.frames < NEIGHBOURS:
            raise ValueError(f"PruneVid clusters a video's frames with their {NEIGHBOURS} nearest: it needs at least "
                             f"{NEIGHBOURS} frames, this video has {layout.frames}")
        stages = [first_stage(video, layout.frames, self.tau, weights=cut.side_rows)
                  for video in layout.frame_rows(cut)]
        tokens, real, slots, groups, made = (list(part) for part in zip(*stages))
        for b, group in zip(cut.samples, groups):
            cut.scratch[b] = group
        trailing = layout.with_trailing(cut.visual.new_zeros(len(cut.samples), 0))  # kept after the merged tokens
        weights = None
        if cut.side_rows:  # over the current visual tokens: the frames' and the trailing ones (none)
            weights = torch.nn.functional.pad(torch.stack(made), (0, layout.trailing))
        return Selection(trailing, torch.stack(tokens), weights, slots=torch.cat([trailing, torch.stack(slots)], 1),
                         trailing=layout.trailing, merged_valid=torch.stack(real))

    def _prune(self, cut: DecoderCut) -> Selection:
        identity = lambda x, cos, sin: x  # noqa: E731  (scored without RoPE, as the official layer returns it)
        stage_one = cut.n_visual - cut.trailing  # the trailing tokens (a newline) are not the video's: kept after
        length = cut.hidden.shape[1]
        # the queries: every token after the video (its last visual token), among the last length - n_visual
        queries = torch.arange(cut.n_visual, length, device=cut.visual.device).expand(cut.hidden.shape[0], -1)
        rows = decoder_attention(cut.layers[self.selected_layer], cut.prev_hidden, cut.cos, cut.sin, cut.mask,
                                 queries, rotate=identity, causal=False)
        after = (queries > cut.visual[:, -1:]).to(rows.dtype)[:, None, :, None]
        scores = (rows * after).amax(dim=(1, 2)).gather(1, cut.visual[:, :stage_one])  # max over heads and queries
        alpha = self._alpha(cut)
        kept = torch.stack([stage_two(score, cut.scratch[b][:stage_one], alpha, 2 * cut.frames + 2)
                            for score, b in zip(scores, cut.samples)])
        return Selection(torch.cat([kept, kept.new_ones(kept.shape[0], cut.trailing)], 1))

    def _alpha(self, cut: DecoderCut) -> float:
        """The official alpha, or the one that brings the cut's videos' mean over the layers to their share (of their
        frame tokens: the trailing ones are beside them, kept in every layer)."""
        if self.alpha is not None:
            return self.alpha
        layers, before = self.info.n_layers, self.selected_layer + 1
        stage_one, frame_tokens = cut.n_visual - cut.trailing, cut.original_visual - cut.trailing
        target = self.share * frame_tokens * layers
        needed = (target - before * stage_one) / ((layers - before) * stage_one)
        if needed <= 0:
            reach = before * stage_one / layers / frame_tokens
            raise Unreachable(f"PruneVid's first stage keeps {stage_one} of this video's "
                              f"{frame_tokens} tokens through its first {before} layers: it cannot keep "
                              f"{self.share:.4g} of them on average, the least it keeps is {reach:.4g}")
        return min(needed, 1.0)

    def describe(self) -> dict:
        described = {"method": self.name, "layers": list(self.cut_layers), "tau": self.tau,
                     "prune_cache": self.prune_cache}
        if self.alpha is not None:
            return described | {"alpha": self.alpha}
        return described | {"share": self.share, "equivalent_tokens": round(self.share * self.info.n_visual)}


def policy(info: ModelInfo, budget: float | None = None, alpha: float | None = None, tau: float = TAU,
           prune_cache: bool = True) -> Policy:
    """PruneVid keeping about `budget` of the nominal visual tokens on average over the layers (that share of each
    video), or with the official `alpha` (0.4); `prune_cache=False` keeps every stage-1 token in the KV caches of
    the layers up to the selected one (decode steps there attend to them all)."""
    if (alpha is None) == (budget is None):
        raise ValueError(f"give PruneVid a budget (or ratio=) or alpha= (the official runs use {ALPHA}), one of them")
    if budget is not None and budget < smallest_budget(info):
        raise Unreachable(f"PruneVid keeps whole tokens: the smallest reachable budget is {smallest_budget(info):g} "
                          f"(or {info.n_visual} for the unpruned model)", smallest_budget(info))
    if alpha is not None and not 0 < alpha <= 1:
        raise ValueError(f"alpha is the share of stage-1 tokens PruneVid keeps in the LLM, in (0, 1]; got {alpha}")
    return PruneVid(info, None if budget is None else retention(budget, info), alpha, tau, prune_cache)


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
