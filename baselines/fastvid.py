"""FastVID (NeurIPS 2025): cut a video into segments of similar frames, keep each frame's salient tokens and merge
the rest into density-peak anchors of the segment, at their original positions.

As the official LLaVA-OneVision code does it (github.com/LunarShen/FastVID at a40a109c, `fastvid_llavaonevision/
LLaVA-NeXT/llava/model/language_model/modeling_qwen2.py::Qwen2Model.forward`, its parallel version; `scripts/eval.sh`:
retention 0.10, DySeg_c 8, DySeg_tau 0.9, STPrune_d 0.4, DTM_p 4, DTM_beta 0.6), on a video's F frames of N tokens
entering the first decoder layer (the pooled, projected tokens), with each frame's attention row a_f [N] and global
feature g_f:
1. DySeg: s_t = cos(g_t, g_t+1); a segment ends after frame t where s_t is among the c - 1 smallest or below tau;
2. per frame R = int(N x retention) tokens: S = R - int(R x d) salient, C = R - S context; a segment of L frames
   has ceil(L / p) anchor frames (every p-th counted from its end), each with (C x L) // ceil(L / p) anchors, and
   the other frames none;
3. ATS: each frame's top-S tokens by a_f are kept as they are;
4. density score of each frame's N - S other tokens (float32): d = cdist / sqrt(D), rho = exp(-mean of the 4
   smallest d^2, itself included), delta = the distance to the nearest denser token (the largest for the densest),
   score = rho x delta;
5. a frame with C anchors (a single-frame segment; at p = 1 every frame) takes its top-C tokens by score as anchors
   and merges its own other tokens into them; in a longer segment each anchor frame takes its own top tokens by
   score, and every non-salient token of the whole segment joins its most cosine-similar anchor of that frame
   (anchor frames independently: a token feeds one anchor of each);
   anchor <- w x anchor + (1 - w) x mean(its tokens, itself among them), w = max(1 / (count + 1), beta);
6. the kept tokens in their original order, each at its original position (gaps where tokens went).
A "frame" is the model's own unit: Video-LLaVA's 257 tokens (CLS included), LLaVA-OneVision's 196, Qwen2.5-VL's
temporal grid of two input frames (h x w / 4 tokens).

Side information. The official code reads a_f and g_f from the vision tower: on LLaVA-OneVision the attention of the
SigLIP pooling head's probe (pooled 27x27 -> 14x14) and its pooled output, from a separately loaded original
google/siglip-so400m-patch14-384 head; on Qwen2.5-VL a pseudo-CLS row of the last ViT block (the mean query of the
grid against the mean key of each 2x2 merge group) and the mean merged token. The HF LLaVA-OneVision checkpoints have
no pooling head, and decoder cuts are not given the tower's rows, so here (substitutes, the same on every family):
g_f is the mean of the frame's tokens entering the decoder (the official Qwen2.5-VL choice), and a_f the pseudo-CLS
attention of that mean token over the frame's tokens there, softmax(g_f . x / sqrt(D)) (the official Qwen2.5-VL
rule, on the decoder's input instead of the last ViT block's queries and keys). `prune_video` takes a_f and g_f as
arguments, so the parity fixture feeds it the official inputs.

Where this differs from the official code (none changes the official setting on 32-frame videos):
- its DPC-kNN adds `torch.rand(...) * 1e-6` to the densities to break ties; here none (deterministic, a batch equals
  each video alone), as the parity fixture (`tests/parity/fastvid/`) runs the official code with `torch.rand` zeroed;
- it raises on videos of fewer than c frames (a top-(c - 1) of F - 1 similarities), where an anchor frame's
  anchors outnumber its non-salient tokens (retention above about 0.45 at p = 4), where a frame keeps no context
  token (C = 0: the merge on no anchors) and on frames of fewer than 4 non-salient tokens (the density's 4
  nearest): here the cuts are at most F - 1, the anchors at most the frame's non-salient tokens, C = 0 merges
  nothing and the density takes at most the frame's tokens;
- it runs at batch size 1 (it indexes [0]); any batch here equals each video alone.
Option `variant="qwen2_5_vl"` follows the official Qwen2.5-VL code instead (`fastvid_qwen25vl/.../
modeling_qwen2_5_vl.py::Qwen2_5_VLForConditionalGeneration.forward`, L1888-2099; its eval.sh: retention 0.27,
tau 0.84, DySeg_ignore 0.95, `configs/method/fastvid_qwen.yaml` without the retention), on any family: a segment of
L frames keeps R x L tokens, C = max(int(R x L x d), 1) context and the rest salient; a segment of several frames is
cut again where consecutive frames' cosine is below `ignore`, and only the last frame of each sub-segment keeps
tokens: the salient ones split evenly over the sub-segments, the context ones over every p-th sub-segment from the
end, at most half a frame's tokens; each frame's anchors absorb every token of the segment that neither a salient
token nor one of these anchors is (the anchors not among their members). Its block raises where a segment keeps no
salient token (a `torch.cat` of nothing); here that segment keeps its anchors. Parity: its block lifted verbatim
(its file needs flash-attn), `tests/parity/fastvid/`. The default is the LLaVA-OneVision code.

Budgets: a budget (or `ratio=`) is the retention times the nominal visual tokens; option `retention` gives the
official ratio directly. The count kept depends on the segments (the anchors of a segment are floored), so
`describe()` states F x R of the nominal video (or retention x the nominal tokens where it is an image) and a video
keeps at most that. Tokens beside a video's frames (LLaVA-OneVision's newline after them, `VideoLayout.trailing`)
stay whole after the kept ones, as the official code treats the newline as text. Images are refused: FastVID
reduces videos.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from visiondrop.core import Cut, ModelInfo
from visiondrop.engine import DecoderCut, Policy, Selection
from visiondrop.methods import Method, Overhead
from visiondrop.methods.shared import nominal_video, video_layout, video_share

RETENTION, SEGMENTS, TAU, CONTEXT_SHARE, ANCHOR_STRIDE, BETA = 0.10, 8, 0.9, 0.4, 4, 0.6  # the official eval.sh
RETENTION_QWEN, TAU_QWEN, IGNORE = 0.27, 0.84, 0.95  # its Qwen2.5-VL eval.sh (the rest as above)
NEAREST = 4  # neighbours of the density, the token itself included
COUNT_SLACK = 1e-9  # int(N x retention) of a retention derived from a budget: float noise must not lose a token


def dynamic_segments_at(cuts: list[int], frames: int) -> list[int]:
    """Frames per segment of `frames` frames cut after each frame in `cuts` (ascending)."""
    ends = cuts + [frames - 1]
    return [end - start for start, end in zip([-1] + ends[:-1], ends)]


def dynamic_segments(frame_features: Tensor, segments: int = SEGMENTS, tau: float = TAU) -> list[int]:
    """DySeg: frames per segment of a video from its frames' global features [F, G]."""
    g = frame_features / frame_features.norm(dim=1, keepdim=True)
    similarity = (g[:-1] * g[1:]).sum(dim=1)
    smallest = torch.topk(similarity, min(segments - 1, similarity.numel()), largest=False).indices
    below = torch.nonzero(similarity < tau)[:, 0]
    return dynamic_segments_at(torch.unique(torch.cat([smallest, below])).tolist(), frame_features.shape[0])


def per_frame_counts(per_frame: int, share: float, context_share: float = CONTEXT_SHARE) -> tuple[int, int]:
    """(salient S, context C) tokens a frame keeps of its `per_frame` at retention `share`."""
    retained = int(per_frame * share + COUNT_SLACK)
    salient = retained - int(retained * context_share)
    return salient, retained - salient


def anchor_counts(sizes: list[int], context: int, stride: int = ANCHOR_STRIDE) -> list[int]:
    """Anchors of each frame: in a segment of L frames, (C x L) // ceil(L / p) on every p-th frame from its end."""
    counts = []
    for length in sizes:
        per_anchor = context * length // -(-length // stride)
        counts += [per_anchor if (length - 1 - j) % stride == 0 else 0 for j in range(length)]
    return counts


def density_scores(tokens: Tensor) -> Tensor:
    """DPC-kNN scores [..., n] of tokens [..., n, D] (float32), without the official tie-breaking noise."""
    dist = torch.cdist(tokens.float(), tokens.float()) / tokens.shape[-1] ** 0.5
    nearest = torch.topk(dist, k=min(NEAREST, dist.shape[-1]), dim=-1, largest=False).values
    density = (-(nearest ** 2).mean(dim=-1)).exp()
    denser = (density[..., None, :] > density[..., :, None]).to(dist.dtype)
    farthest = dist.flatten(-2).max(dim=-1).values[..., None, None]
    return (dist * denser + farthest * (1 - denser)).min(dim=-1).values * density


def merge_into(anchors: Tensor, pool: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """Every token of `pool` [n, D] joins its most cosine-similar anchor [a, D]: (the anchors updated, and their
    weights [a, n] over the pool besides the anchor's own share `w` [a, 1], returned as (tokens, (w, weights)))."""
    similarity = F.normalize(pool, dim=-1) @ F.normalize(anchors, dim=-1).T
    assign = torch.zeros(pool.shape[0], anchors.shape[0], dtype=pool.dtype, device=pool.device)
    assign.scatter_(1, similarity.argmax(dim=1, keepdim=True), 1)
    members = assign.sum(dim=0).unsqueeze(-1)
    own = (1 / (members + 1)).clamp(min=beta)
    mean = assign.T / members.clamp(min=1)
    return own * anchors + (1 - own) * (mean @ pool), (own, (1 - own) * mean)


def prune_video(video: Tensor, attention: Tensor, frame_features: Tensor, share: float = RETENTION,
                segments: int = SEGMENTS, tau: float = TAU, context_share: float = CONTEXT_SHARE,
                stride: int = ANCHOR_STRIDE, beta: float = BETA) -> tuple[Tensor, Tensor, Tensor]:
    """FastVID on one video [F, N, D] with its frames' attention rows [F, N] and global features [F, G]:
    (kept indices [k] into the F x N tokens, ascending; their tokens [k, D], anchors merged; the merge's weights
    [k, F x N]: each kept token as a combination of the video's tokens)."""
    frames, per_frame, width = video.shape
    salient, context = per_frame_counts(per_frame, share, context_share)
    sizes = dynamic_segments(frame_features, segments, tau)
    counts = anchor_counts(sizes, context, stride)
    tops = torch.topk(attention, salient, dim=1).indices
    place = torch.arange(per_frame, device=video.device).expand(frames, -1)
    rest = torch.ones(frames, per_frame, dtype=torch.bool, device=video.device).scatter(1, tops, False)
    others = place[rest].view(frames, per_frame - salient)  # each frame's non-salient places, ascending
    pooled = torch.gather(video, 1, others[..., None].expand(-1, -1, width))
    scores = density_scores(pooled)
    offsets = torch.arange(frames, device=video.device)[:, None] * per_frame
    kept = [(tops + offsets).flatten()]
    tokens = [torch.gather(video, 1, tops[..., None].expand(-1, -1, width)).flatten(0, 1)]
    weights = [F.one_hot(kept[0], frames * per_frame).to(video.dtype)]
    start = 0
    for length in sizes:
        members = range(start, start + length)
        pool = pooled[start:start + length].flatten(0, 1)  # a single frame's own, or the segment's
        sources = (others[start:start + length] + offsets[start:start + length]).flatten()
        for f in members:
            n = min(counts[f], per_frame - salient)
            if n == 0:
                continue
            pick = torch.topk(scores[f], n).indices
            alone = counts[f] == context  # the single-frame rule (also every frame of a segment at p = 1)
            frame_pool = pooled[f] if alone else pool
            frame_sources = others[f] + offsets[f] if alone else sources
            merged, (own, share_of) = merge_into(pooled[f, pick], frame_pool, beta)
            anchor = others[f, pick] + offsets[f]
            kept.append(anchor)
            tokens.append(merged)
            row = torch.zeros(n, frames * per_frame, dtype=video.dtype, device=video.device)
            row[:, frame_sources] = share_of
            weights.append(row.scatter_add(1, anchor[:, None], own))
        start += length
    kept, order = torch.cat(kept).sort()
    return kept, torch.cat(tokens)[order], torch.cat(weights)[order]


def even_split(total: int, parts: int) -> list[int]:
    """`total` in `parts` nearly equal parts, the first ones larger by one where it does not divide."""
    return [total // parts + (i < total % parts) for i in range(parts)]


def qwen_counts(sub_sizes: list[int], retained: int, per_frame: int, context_share: float,
                stride: int) -> tuple[list[int], list[int]]:
    """The Qwen2.5-VL variant's (salient, context) tokens of each frame of a segment made of sub-segments of
    `sub_sizes` frames: only a sub-segment's last frame keeps any, the segment's salient tokens split evenly over the
    sub-segments (the first ones larger), its context tokens over every p-th sub-segment from the end (the last
    ones larger), at most half a frame's tokens each."""
    length = sum(sub_sizes)
    context = max(int(retained * length * context_share), 1)
    salient = retained * length - context
    if length == 1:
        return [salient], [context]
    parts, shares = len(sub_sizes), even_split(context, -(-len(sub_sizes) // stride))
    anchors = [min(shares[i // stride], per_frame // 2) if i % stride == 0 else 0 for i in range(parts)][::-1]
    salients, contexts = [], []
    for size, s, c in zip(sub_sizes, even_split(salient, parts), anchors):
        salients += [0] * (size - 1) + [min(s, per_frame - c)]
        contexts += [0] * (size - 1) + [c]
    return salients, contexts


def prune_video_qwen(video: Tensor, attention: Tensor, frame_features: Tensor, share: float = RETENTION_QWEN,
                     segments: int = SEGMENTS, tau: float = TAU_QWEN, ignore: float = IGNORE,
                     context_share: float = CONTEXT_SHARE, stride: int = ANCHOR_STRIDE,
                     beta: float = BETA) -> tuple[Tensor, Tensor, Tensor]:
    """FastVID's Qwen2.5-VL variant on one video [F, N, D] (module docstring), as `prune_video` returns it."""
    frames, per_frame, width = video.shape
    retained = int(per_frame * share + COUNT_SLACK)
    g = frame_features / frame_features.norm(dim=1, keepdim=True)
    flat = video.flatten(0, 1)
    kept, tokens, weights, start = [], [], [], 0
    for length in dynamic_segments(frame_features, segments, tau):
        within = (g[start:start + length - 1] * g[start + 1:start + length]).sum(dim=1)
        sub_sizes = dynamic_segments_at((within < ignore).nonzero()[:, 0].tolist(), length)
        salients, contexts = qwen_counts(sub_sizes, retained, per_frame, context_share, stride)
        salient, anchor_sets = [], []
        for f, (s, c) in enumerate(zip(salients, contexts)):
            frame = start + f
            tops = torch.topk(attention[frame], s).indices if s else attention.new_zeros(0, dtype=torch.long)
            salient.append(tops + frame * per_frame)
            if c:
                rest = ~torch.isin(torch.arange(per_frame, device=video.device), tops)
                others = rest.nonzero()[:, 0]
                pick = torch.topk(density_scores(video[frame, others]), c).indices.sort().values
                anchor_sets.append(others[pick] + frame * per_frame)
        salient = torch.cat(salient)
        kept.append(salient)
        tokens.append(flat[salient])
        weights.append(F.one_hot(salient, frames * per_frame).to(video.dtype))
        members = torch.arange(start * per_frame, (start + length) * per_frame, device=video.device)
        for anchors in anchor_sets:  # each frame's anchors absorb every other token of the segment kept by none
            pool = members[~torch.isin(members, torch.cat([salient, anchors]))]
            merged, (own, share_of) = merge_into(flat[anchors], flat[pool], beta)
            kept.append(anchors)
            tokens.append(merged)
            row = torch.zeros(anchors.numel(), frames * per_frame, dtype=video.dtype, device=video.device)
            row[:, pool] = share_of
            weights.append(row.scatter_add(1, anchors[:, None], own))
        start += length
    kept, order = torch.cat(kept).sort()
    return kept, torch.cat(tokens)[order], torch.cat(weights)[order]


def frame_side_information(video: Tensor) -> tuple[Tensor, Tensor]:
    """The substitutes for the tower's side information of a video [F, N, D] (module docstring): each frame's
    pseudo-CLS attention row a_f [F, N] and global feature g_f [F, D]."""
    mean = video.mean(dim=1)
    attention = torch.softmax((video @ mean[..., None])[..., 0] / video.shape[-1] ** 0.5, dim=-1)
    return attention, mean


class FastVID(Policy):
    name = "fastvid"
    cut_layers = (0,)
    renumber_positions = False  # the kept tokens keep their original positions, with gaps

    def __init__(self, info: ModelInfo, retention: float, variant: str, segments: int, tau: float, ignore: float,
                 context_share: float, anchor_stride: int, beta: float):
        self.info, self.retention, self.variant = info, retention, variant
        self.options = dict(segments=segments, tau=tau, context_share=context_share, stride=anchor_stride, beta=beta)
        if variant == "qwen2_5_vl":
            self.options["ignore"] = ignore

    def select_decoder(self, cut: DecoderCut) -> Selection:
        layout = video_layout(cut, "FastVID")
        keep, features, weights = [], [], []
        for rows, video in zip(cut.visual_rows(cut.hidden), layout.frame_rows(cut)):
            video = video.view(layout.frames, layout.per_frame, -1)
            prune = prune_video_qwen if self.variant == "qwen2_5_vl" else prune_video
            kept, tokens, combined = prune(video, *frame_side_information(video), self.retention, **self.options)
            keep.append(layout.with_trailing(kept))  # the trailing tokens (OneVision's newline) stay, after them
            features.append(torch.cat([tokens, rows[layout.frame_tokens:]]))
            trailing = torch.arange(layout.frame_tokens, cut.n_visual, device=combined.device)
            own = F.one_hot(trailing, cut.n_visual).to(combined.dtype)
            weights.append(torch.cat([F.pad(combined, (0, layout.trailing)), own]))
        return Selection(keep, weights=weights, features=features)

    def describe(self) -> dict:
        described = {"method": self.name, "retention": self.retention, "variant": self.variant,
                     "layers": list(self.cut_layers), **self.options}
        video = nominal_video(self.info)
        if video is not None:
            return described | {"equivalent_tokens": video[0] * sum(per_frame_counts(video[1], self.retention,
                                                                                     self.options["context_share"]))}
        return described | {"equivalent_tokens": round(self.retention * self.info.n_visual)}


def policy(info: ModelInfo, budget: float | None = None, retention: float | None = None, variant: str = "onevision",
           segments: int = SEGMENTS, tau: float = TAU, ignore: float = IGNORE, context_share: float = CONTEXT_SHARE,
           anchor_stride: int = ANCHOR_STRIDE, beta: float = BETA) -> Policy:
    """FastVID keeping about `budget` of the nominal visual tokens (that share of each video), or the official
    `retention` (0.10); the official code's `variant` ("onevision", or "qwen2_5_vl" with `ignore`, DySeg_ignore);
    `segments` (DySeg_c), `tau` (DySeg_tau), `context_share` (STPrune_d), `anchor_stride` (DTM_p) and `beta`
    (DTM_beta) as the official LLaVA-OneVision eval script sets them (its Qwen2.5-VL script: tau 0.84, retention
    0.27; `configs/method/fastvid_qwen.yaml`)."""
    if variant not in ("onevision", "qwen2_5_vl"):
        raise ValueError(f"variant is the official code FastVID follows, 'onevision' or 'qwen2_5_vl'; got {variant!r}")
    share = video_share(info, budget, retention, "retention", "FastVID", smallest_budget(info),
                        "keeps at least one token a frame")
    retention = retention if share is None else share
    if not 0 < retention <= 1:
        raise ValueError(f"retention is the share of video tokens FastVID keeps, in (0, 1]; got {retention}")
    if segments < 1 or anchor_stride < 1 or not 0 <= context_share <= 1 or not 0 <= beta <= 1:
        raise ValueError("FastVID needs segments >= 1, anchor_stride >= 1, context_share and beta in [0, 1]")
    return FastVID(info, retention, variant, segments, tau, ignore, context_share, anchor_stride, beta)


def smallest_budget(info: ModelInfo) -> float:
    """A token a frame of the nominal sample (its crops: Video-LLaVA's 8 frames)."""
    return info.crops


def selection_macs(cut: Cut, width: int) -> int:
    """Beside the densities' pairwise distances (`Overhead.frame_pairs`): each frame's mean token and its attention
    row (two products a token); the cosines to a segment's anchors (about p x C a token) are not charged."""
    return 2 * cut.before * width


METHOD = Method("fastvid", "FastVID", policy, smallest_budget, replaces_budget=("retention",), video_only=True,
                exact_count=False, overhead=lambda **_: Overhead(frame_pairs=True, selection=selection_macs),
                scoring=lambda **_: {"decoder": "density"})
