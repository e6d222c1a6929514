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

Side information (`side=`). The official code reads a_f and g_f from the vision tower. On LLaVA-OneVision
(`side="siglip_head"`, the default where the family names its tower's original checkpoint, `ModelInfo.tower_head`)
its `SigLipVisionAbstract` loads `SigLipVisionModel.from_pretrained(mm_vision_tower)`, the original
google/siglip-so400m-patch14-384, and runs its `post_layernorm` and pooling (MAP) head on the tower's output that
the model projects (the 26-layer tower's `hidden_states[-1]`, 729 patches a frame): g_f is the pooled output, a_f the
probe's `nn.MultiheadAttention` weights (mean over heads) bilinearly pooled 27x27 -> 14x14 (`get_attn_2dPool`). The HF
LLaVA-OneVision checkpoints have no head (`vision_use_head=False`), so here too it is loaded from `head=` (default
that checkpoint; a local folder offline), once per path (`load_siglip_head`), and run in the tower's dtype (the
official run: the tower's fp16) on the tower's output of the host's own call (`Family.tower_output`: which output
and how the host pools a frame are the family's; `Policy.read_tower`); parity with the official OV code at model level,
`tests/parity/fastvid/`. Elsewhere (`side="decoder"`, the default on the other families; Video-LLaVA's
LanguageBind tower has no SigLIP head, and the official Qwen2.5-VL code reads a pseudo-CLS row of its last ViT block,
which decoder cuts are not given) substitutes, the same on every family: g_f is the mean of the frame's tokens
entering the decoder (the official Qwen2.5-VL choice), and a_f the pseudo-CLS attention of that mean token over the
frame's tokens there, softmax(g_f . x / sqrt(D)) (the official Qwen2.5-VL rule, on the decoder's input instead of
the last ViT block's queries and keys). `prune_video` takes a_f and g_f as arguments, so the function-level parity
fixture feeds it the official inputs. The engine's `DecoderCut.tower_attention` (HoliTom's) is not used: it is the
mean over the queries of the feature layer's attention rows (and over a merge group's 2x2 patches), where the
official Qwen2.5-VL code takes one softmax of the mean query against each merge group's mean key.

Where this differs from the official code (none changes the official setting on 32-frame videos):
- its DPC-kNN adds `torch.rand(...) * 1e-6` to the densities to break ties; here none (deterministic, a batch equals
  each video alone), as the parity fixture (`tests/parity/fastvid/`) runs the official code with `torch.rand` zeroed;
- it raises on videos of fewer than c frames (a top-(c - 1) of F - 1 similarities), where an anchor frame's
  anchors outnumber its non-salient tokens (retention above about 0.45 at p = 4), where a frame keeps no context
  token (C = 0: the merge on no anchors) and on frames of fewer than 4 non-salient tokens (the density's 4
  nearest): here the cuts are at most F - 1, the anchors at most the frame's non-salient tokens, C = 0 merges
  nothing and the density takes at most the frame's tokens;
- it runs at batch size 1 (it indexes [0]); any batch here equals each video alone.
Host reads: one per forward, every video's segment cuts (their count of kept tokens hangs on them); the rest runs
on the device.
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

import copy
import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visiondrop.core import Cut, ModelInfo
from visiondrop.engine import DecoderCut, Policy, Selection
from visiondrop.methods import Method, Overhead
from visiondrop.methods.shared import density_peaks, nominal_video, quiet_loading, video_layout, video_share

RETENTION, SEGMENTS, TAU, CONTEXT_SHARE, ANCHOR_STRIDE, BETA = 0.10, 8, 0.9, 0.4, 4, 0.6  # the official eval.sh
RETENTION_QWEN, TAU_QWEN, IGNORE = 0.27, 0.84, 0.95  # its Qwen2.5-VL eval.sh (the rest as above)
SIDES = ("siglip_head", "decoder")  # where a_f and g_f come from (module docstring)
NEAREST = 4  # neighbours of the density, the token itself included
COUNT_SLACK = 1e-9  # int(N x retention) of a retention derived from a budget: float noise must not lose a token


def dynamic_segments_at(cuts: list[bool], frames: int) -> list[int]:
    """Frames per segment of `frames` frames cut after each frame t where cuts[t] (F - 1 flags)."""
    ends = [t for t, cut in enumerate(cuts) if cut] + [frames - 1]
    return [end - start for start, end in zip([-1] + ends[:-1], ends)]


def consecutive_cosine(frame_features: Tensor) -> Tensor:
    """The cosine of each frame's global feature with the next one's: [..., F - 1] of [..., F, G]."""
    g = frame_features / frame_features.norm(dim=-1, keepdim=True)
    return (g[..., :-1, :] * g[..., 1:, :]).sum(dim=-1)


def segment_cuts(frame_features: Tensor, segments: int = SEGMENTS, tau: float = TAU) -> Tensor:
    """DySeg on the device: whether a segment ends after each frame [..., F - 1] of frames' global features
    [..., F, G] (among the c - 1 smallest cosines to the next frame, or below tau)."""
    similarity = consecutive_cosine(frame_features)
    smallest = torch.topk(similarity, min(segments - 1, similarity.shape[-1]), dim=-1, largest=False).indices
    return (similarity < tau).scatter(-1, smallest, True)


def dynamic_segments(frame_features: Tensor, segments: int = SEGMENTS, tau: float = TAU) -> list[int]:
    """DySeg: frames per segment of a video from its frames' global features [F, G] (one read of its cuts)."""
    return dynamic_segments_at(segment_cuts(frame_features, segments, tau).tolist(), frame_features.shape[0])


def places_outside(taken: Tensor, count: int) -> Tensor:
    """The `count` places [..., count] where `taken` [..., n] is False, ascending, without reading the mask on the
    host (the caller knows how many there are)."""
    return torch.argsort(taken.to(torch.uint8), dim=-1, stable=True)[..., :count]


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
                stride: int = ANCHOR_STRIDE, beta: float = BETA,
                cuts: list[bool] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """FastVID on one video [F, N, D] with its frames' attention rows [F, N] and global features [F, G]:
    (kept indices [k] into the F x N tokens, ascending; their tokens [k, D], anchors merged; the merge's weights
    [k, F x N]: each kept token as a combination of the video's tokens). `cuts`: its `segment_cuts` read on the
    host already (they set how many tokens it keeps), computed here when None."""
    frames, per_frame, width = video.shape
    salient, context = per_frame_counts(per_frame, share, context_share)
    if cuts is None:
        cuts = segment_cuts(frame_features, segments, tau).tolist()
    sizes = dynamic_segments_at(cuts, frames)
    counts = anchor_counts(sizes, context, stride)
    tops = torch.topk(attention, salient, dim=1).indices
    salient_mask = torch.zeros(frames, per_frame, dtype=torch.bool, device=video.device).scatter(1, tops, True)
    others = places_outside(salient_mask, per_frame - salient)  # each frame's non-salient places, ascending
    pooled = torch.gather(video, 1, others[..., None].expand(-1, -1, width))
    scores = density_peaks(pooled, NEAREST)[1]
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
                     beta: float = BETA, cuts: list[bool] | None = None,
                     splits: list[bool] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """FastVID's Qwen2.5-VL variant on one video [F, N, D] (module docstring), as `prune_video` returns it; `cuts`
    and `splits` (each frame's cosine to the next below `ignore`) read on the host already, or computed here."""
    frames, per_frame, width = video.shape
    retained = int(per_frame * share + COUNT_SLACK)
    if cuts is None or splits is None:
        cuts, splits = torch.stack([segment_cuts(frame_features, segments, tau),
                                    consecutive_cosine(frame_features) < ignore]).tolist()
    flat = video.flatten(0, 1)
    kept, tokens, weights, start = [], [], [], 0
    for length in dynamic_segments_at(cuts, frames):
        sub_sizes = dynamic_segments_at(splits[start:start + length - 1], length)
        salients, contexts = qwen_counts(sub_sizes, retained, per_frame, context_share, stride)
        salient, anchor_sets = [], []
        for f, (s, c) in enumerate(zip(salients, contexts)):
            frame = start + f
            tops = torch.topk(attention[frame], s).indices if s else attention.new_zeros(0, dtype=torch.long)
            salient.append(tops + frame * per_frame)
            if c:
                taken = torch.zeros(per_frame, dtype=torch.bool, device=video.device).scatter(0, tops, True)
                others = places_outside(taken, per_frame - s)
                pick = torch.topk(density_peaks(video[frame, others], NEAREST)[1], c).indices.sort().values
                anchor_sets.append(others[pick] + frame * per_frame)
        salient = torch.cat(salient)
        kept.append(salient)
        tokens.append(flat[salient])
        weights.append(F.one_hot(salient, frames * per_frame).to(video.dtype))
        members = torch.arange(start * per_frame, (start + length) * per_frame, device=video.device)
        for anchors in anchor_sets:  # each frame's anchors absorb every other token of the segment kept by none
            pool = members[places_outside(torch.isin(members, torch.cat([salient, anchors])),
                                          members.numel() - salient.numel() - anchors.numel())]
            merged, (own, share_of) = merge_into(flat[anchors], flat[pool], beta)
            kept.append(anchors)
            tokens.append(merged)
            row = torch.zeros(anchors.numel(), frames * per_frame, dtype=video.dtype, device=video.device)
            row[:, pool] = share_of
            weights.append(row.scatter_add(1, anchors[:, None], own))
        start += length
    kept, order = torch.cat(kept).sort()
    return kept, torch.cat(tokens)[order], torch.cat(weights)[order]


@dataclass(frozen=True)
class SiglipHead:
    """A SigLIP checkpoint's `post_layernorm` and pooling (MAP) head, as FastVID's official OV code runs them on the
    tower's output (its `SigLipVisionAbstract.forward` and `SigLipMultiheadAttentionPoolingHead.forward`)."""

    post_layernorm: nn.Module
    head: nn.Module  # transformers' SiglipMultiheadAttentionPoolingHead: probe, attention, layernorm, mlp
    copies: dict = field(default_factory=dict, compare=False)  # (device, dtype) -> the two modules there

    def __call__(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """Of the tower's output for N frames [N, T, D]: each frame's pooled output g_f [N, D] and the probe's
        attention over its tokens, mean over heads, a_f [N, T]; in the features' dtype."""
        key = (features.device, features.dtype)
        if key not in self.copies:
            self.copies[key] = copy.deepcopy((self.post_layernorm, self.head))
            for module in self.copies[key]:
                module.to(*key)
        post_layernorm, head = self.copies[key]
        tokens = post_layernorm(features)
        pooled, attention = head.attention(head.probe.repeat(tokens.shape[0], 1, 1), tokens, tokens)
        pooled = pooled + head.mlp(head.layernorm(pooled))
        return pooled[:, 0], attention[:, 0]


@functools.cache
def load_siglip_head(path: str) -> SiglipHead:
    """The post-layernorm and pooling head of the SigLIP checkpoint `path` (a folder or hub id), once."""
    from transformers import SiglipVisionModel

    try:
        with quiet_loading():  # a whole SiglipModel checkpoint holds a text tower too
            model = SiglipVisionModel.from_pretrained(path, dtype=torch.float32)
        vision = getattr(model, "vision_model", model)  # transformers 4 wraps the transformer, 5 does not
    except (OSError, ValueError) as error:
        raise OSError(
            f"FastVID could not load its SigLIP pooling head head={path!r} ({error}). Its official LLaVA-OneVision "
            "code runs the head of the vision tower's original checkpoint (google/siglip-so400m-patch14-384 for "
            "LLaVA-OneVision): download it and pass head=<local folder>, or use side='decoder'") from error
    if getattr(vision, "head", None) is None:
        raise ValueError(f"FastVID's head={path!r} is a SigLIP checkpoint without a pooling head (vision_use_head is "
                         "False, as in the LLaVA-OneVision checkpoints): pass the tower's original checkpoint")
    # frozen, as the official `SigLipVisionAbstract` (nn.MultiheadAttention takes another kernel with trainable weights)
    return SiglipHead(vision.post_layernorm.eval().requires_grad_(False), vision.head.eval().requires_grad_(False))


def frame_side_information(video: Tensor) -> tuple[Tensor, Tensor]:
    """The substitutes for the tower's side information of videos [..., F, N, D] (module docstring): each frame's
    pseudo-CLS attention row a_f [..., F, N] and global feature g_f [..., F, D]."""
    mean = video.mean(dim=-2)
    attention = torch.softmax((video @ mean[..., None])[..., 0] / video.shape[-1] ** 0.5, dim=-1)
    return attention, mean


class FastVID(Policy):
    name = "fastvid"
    cut_layers = (0,)
    renumber_positions = False  # the kept tokens keep their original positions, with gaps

    def __init__(self, info: ModelInfo, retention: float, variant: str, side: str, head: str | None, segments: int,
                 tau: float, ignore: float, context_share: float, anchor_stride: int, beta: float):
        self.info, self.retention, self.variant, self.side, self.head = info, retention, variant, side, head
        self.reads_tower = ("video",) if side == "siglip_head" else ()
        self.options = dict(segments=segments, tau=tau, context_share=context_share, stride=anchor_stride, beta=beta)
        if variant == "qwen2_5_vl":
            self.options["ignore"] = ignore

    def read_tower(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """a_f over each frame's tower tokens (the engine pools it as the host pools the frame) and g_f."""
        pooled, attention = load_siglip_head(self.head)(features)
        return attention, pooled

    def select_decoder(self, cut: DecoderCut) -> Selection:
        layout = video_layout(cut, "FastVID")
        videos = layout.frame_rows(cut).unflatten(1, (layout.frames, layout.per_frame))
        if self.reads_tower:
            attention = cut.tower_rows[:, :layout.frame_tokens].unflatten(1, (layout.frames, layout.per_frame))
            features = cut.tower_crops
        else:
            attention, features = frame_side_information(videos)
        segmentation = [segment_cuts(features, self.options["segments"], self.options["tau"])]
        if self.variant == "qwen2_5_vl":
            segmentation.append(consecutive_cosine(features) < self.options["ignore"])
        # the one host read, once per forward: the segments set how many tokens each video keeps (a shape)
        segmentation = torch.stack(segmentation, dim=1).tolist()
        prune = prune_video_qwen if self.variant == "qwen2_5_vl" else prune_video
        keep, kept_features, weights = [], [], []
        for rows, video, a, g, (cuts, *splits) in zip(cut.visual_rows(cut.hidden), videos, attention, features,
                                                     segmentation):
            read = dict(cuts=cuts, splits=splits[0]) if splits else dict(cuts=cuts)
            kept, tokens, combined = prune(video, a, g, self.retention, **self.options, **read)
            keep.append(layout.with_trailing(kept))  # the trailing tokens (OneVision's newline) stay, after them
            kept_features.append(torch.cat([tokens, rows[layout.frame_tokens:]]))
            trailing = torch.arange(layout.frame_tokens, cut.n_visual, device=combined.device)
            own = F.one_hot(trailing, cut.n_visual).to(combined.dtype)
            weights.append(torch.cat([F.pad(combined, (0, layout.trailing)), own]))
        return Selection(keep, weights=weights, features=kept_features)

    def describe(self) -> dict:
        described = {"method": self.name, "retention": self.retention, "variant": self.variant, "side": self.side,
                     **({"head": self.head} if self.reads_tower else {}), "layers": list(self.cut_layers),
                     **self.options}
        video = nominal_video(self.info)
        if video is not None:
            return described | {"equivalent_tokens": video[0] * sum(per_frame_counts(video[1], self.retention,
                                                                                     self.options["context_share"]))}
        return described | {"equivalent_tokens": round(self.retention * self.info.n_visual)}


def policy(info: ModelInfo, budget: float | None = None, retention: float | None = None, variant: str = "onevision",
           side: str | None = None, head: str | None = None, segments: int = SEGMENTS, tau: float = TAU,
           ignore: float = IGNORE, context_share: float = CONTEXT_SHARE, anchor_stride: int = ANCHOR_STRIDE,
           beta: float = BETA) -> Policy:
    """FastVID keeping about `budget` of the nominal visual tokens (that share of each video), or the official
    `retention` (0.10); the official code's `variant` ("onevision", or "qwen2_5_vl" with `ignore`, DySeg_ignore);
    `side`: where a_f and g_f come from, "siglip_head" (the official OV code: the pooling head of the SigLIP
    checkpoint `head`, default the tower's original one, `ModelInfo.tower_head`; the default on the onevision
    variant where the family names one) or "decoder" (the substitutes; module docstring); `segments` (DySeg_c),
    `tau` (DySeg_tau), `context_share` (STPrune_d), `anchor_stride` (DTM_p) and `beta` (DTM_beta) as the official
    LLaVA-OneVision eval script sets them (its Qwen2.5-VL script: tau 0.84, retention 0.27;
    `configs/method/fastvid_qwen.yaml`)."""
    if variant not in ("onevision", "qwen2_5_vl"):
        raise ValueError(f"variant is the official code FastVID follows, 'onevision' or 'qwen2_5_vl'; got {variant!r}")
    side = side or ("siglip_head" if info.tower_head and variant == "onevision" else "decoder")
    if side not in SIDES:
        raise ValueError(f"FastVID side is where its frames' attention and features come from, one of {SIDES}; "
                         f"got {side!r}")
    head = head or info.tower_head
    if side == "siglip_head" and head is None:
        raise ValueError("FastVID side='siglip_head' needs the SigLIP checkpoint whose pooling head it runs: this "
                         "model names none (its tower is no SigLIP with a head); pass head=<checkpoint> or use "
                         "side='decoder'")
    share = video_share(info, budget, retention, "retention", "FastVID", smallest_budget(info),
                        "keeps at least one token a frame")
    retention = retention if share is None else share
    if not 0 < retention <= 1:
        raise ValueError(f"retention is the share of video tokens FastVID keeps, in (0, 1]; got {retention}")
    if segments < 1 or anchor_stride < 1 or not 0 <= context_share <= 1 or not 0 <= beta <= 1:
        raise ValueError("FastVID needs segments >= 1, anchor_stride >= 1, context_share and beta in [0, 1]")
    return FastVID(info, retention, variant, side, str(head) if side == "siglip_head" else None, segments, tau, ignore,
                   context_share, anchor_stride, beta)


def smallest_budget(info: ModelInfo) -> float:
    """A token a frame of the nominal sample (its crops: Video-LLaVA's 8 frames)."""
    return info.crops


def selection_macs(cut: Cut, width: int) -> int:
    """Beside the densities' pairwise distances (`Overhead.frame_pairs`): each frame's mean token and its attention
    row (two products a token: the substitutes, `side="decoder"`; charged on every side, small beside the SigLIP
    head's `Overhead.tower_head`); the cosines to a segment's anchors (about p x C a token) are not charged."""
    return 2 * cut.before * width


def example_options(config) -> dict:
    """Where the family names its tower's original SigLIP checkpoint (LLaVA-OneVision): a tiny one with a pooling
    head as wide as the model's tower (tests, the FLOPs count's proxy, the latency benchmark)."""
    from visiondrop.families import family_for
    from visiondrop.testing.tiny import tiny_siglip_head

    if family_for(config).tower_head is None:
        return {}
    return {"head": str(tiny_siglip_head(config.vision_config))}


METHOD = Method("fastvid", "FastVID", policy, smallest_budget, replaces_budget=("retention",), video_only=True,
                exact_count=False, scoring=lambda **_: {"decoder": "density"}, example_options=example_options,
                overhead=lambda side=None, **_: Overhead(frame_pairs=True, selection=selection_macs,
                                                         tower_head=side != "decoder"))
