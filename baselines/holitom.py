"""HoliTom (NeurIPS 2025): holistic token merging for video LLMs: temporal windows of static tokens merged outside the
language model, then similar tokens merged inside it.

As the official code does it (github.com/cokeshao/HoliTom at e9b2972f, `holitom/llava_arch.py`:
`select_static_windows`, `get_static_dynamic_features`, `holitom`, `merge_tokens_by_attention_density`,
`merge_tokens_by_density`, `merge_tokens_by_clustering`, `cluster_dpc_knn`; `holitom/modeling_qwen2.py`; defaults of
`scripts/eval_ov-7b_holitom.sh` and the code: tau 0.8 (0.65 at RETAIN_RATIO 0.10), BETA 0.6, D 0, K 7,
MAX_WINDOW_SIZE 1024, HOLITOM_k 18, HOLITOM_r 0.5), on a video of F frames of N projected tokens:
Outer stage, before the language model (a cut before decoder layer 0):
1. s[t, l] = cos(x[t, l], x[t + 1, l]) of each place l between consecutive frames;
2. temporal windows by dynamic programming: a window [s, e] of W frames saves (W - 1) x |{l : s[t, l] > tau for every
   t in [s, e)}| tokens; dp[i] = max(dp[i - 1], max over w = 2.. of dp[i - w] + saved(i - w + 1, i)), a strictly
   better window only (`select_static_windows`), windows of at most MAX_WINDOW_SIZE frames;
3. r' = min(r / ((F N - saved) / F N), 1): the retention r over what the windows leave;
4. per window: the places static over the whole window are averaged over its frames (static tokens), the others are
   dynamic; a window of one frame has no static tokens;
5. dynamic tokens: each frame keeps its top ceil(n r') by the vision tower's attention (SigLIP's last retained layer on
   LLaVA-OneVision: the attention each token receives, mean over heads and queries, pooled 2x2 as the tokens are:
   `DecoderCut.tower_attention`), in place order;
6. static tokens: round(n r') DPC-kNN centres (k = min(K, centres)), in place order; every other static token joins its
   nearest centre; a centre with members becomes BETA x centre + (1 - BETA) x mean(members);
7. laid out per window: [static, dynamic frame by frame]; the sequence is shortened (contiguous positions).
Inner stage, prefill only: at the entry of layer 18 (HOLITOM_k, of OneVision-7B's 28-layer decoder; relative depth on
others, `ModelInfo.relative_layers`) the last prompt token's attention at layer 17, mean over heads, ranks the visual
tokens; the top round(n (1 - HOLITOM_r)) stay with their positions (gaps); every other token, in ascending order,
is averaged into the kept token most similar to it (cosine of the hidden states entering layer 18, computed once):
h_j <- (h_j + h_i) / 2, one member after the other (not a mean).

Where this differs from the official code:
- DPC-kNN adds `torch.rand(...) * 1e-6` to the densities to break ties; here no noise (deterministic, the same in a
  batch and alone): ties fall as torch's comparisons and topk break them. The parity fixture
  (`tests/parity/holitom/`) runs the official functions with `torch.rand` patched to zeros;
- the official inner merge runs layer 17 with `output_attentions=True` under SDPA, which transformers serves with
  eager attention, and the model-level causal mask is None under SDPA without padding: layer 17 then attends without
  a causal mask in the prefill (every prompt token sees the whole prompt; verified on the official forward,
  `tests/parity/holitom/`). By default layer 17 stays causal here (`causal_scoring_layer=True`): the official
  behaviour is an accident of its attention backend (its eager runs are causal), and a prefill layer that sees later
  tokens cannot be replayed without a KV cache (the prompt would see the generated tokens), so the contract's
  cache = replay would not hold. `causal_scoring_layer=False` reproduces it (`Policy.bidirectional_layers`; SDPA or
  eager attention); the scoring row (the last prompt token's) is the same either way;
- the official code runs at batch size 1; any batch here equals each video alone;
- only the official default D = 0 (every dynamic token ranked by attention; the contextual DPC-kNN branch of
  `merge_tokens_by_attention_density` for D > 0 is not offered).
Positions: the outer stage shortens the sequence (contiguous on Video-LLaVA and LLaVA-OneVision, as the official
LLaVA code); on Qwen2.5-VL every token keeps the M-RoPE position of a token it stands for (a static token: its centre
in the window's first frame). The inner stage keeps positions with gaps.

Budgets: `retain_ratio` (option; the official RETAIN_RATIO) sets the outer stage; with a budget (or `ratio=`) it is
solved so that the mean visual tokens over the decoder layers is that share of each video's own tokens, assuming
both stages keep their nominal shares (the counts depend on the video's windows and per-frame rounding:
`Method.exact_count` False). `inner=False` runs the outer stage only (the official "w/o M" runs). Images are refused.
The tower's attention is the feature layer's on every video family (`DecoderCut.tower_attention`): Video-LLaVA's CLIP
(CLS among the tokens and the queries), LLaVA-OneVision's SigLIP pooled 2x2, Qwen2.5-VL's last full-attention block
and Qwen3-VL's last block, per temporal grid, each token the mean of its 2x2 patches.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from visiondrop.core import Cut, ModelInfo
from visiondrop.engine import DecoderCut, Policy, Selection, unmarked
from visiondrop.methods import Method, Overhead, Unreachable
from visiondrop.methods.shared import retention, video_layout

TAU, BETA, NEIGHBOURS, MAX_WINDOW = 0.8, 0.6, 7, 1024  # T, BETA, K, MAX_WINDOW_SIZE (the official code's defaults)
INNER_LAYER, INNER_RATIO = 18, 0.5  # HOLITOM_k, HOLITOM_r of the official eval scripts
REFERENCE_LAYERS = 28  # LLaVA-OneVision-7B's Qwen2 decoder, where layer 18 is the official cut
TITLE = "HoliTom"


def frame_similarity(frames: Tensor) -> Tensor:
    """s[t, l] = cos(x[t, l], x[t + 1, l]) of a video's frames [F, N, D]: [F - 1, N] (on normalised tokens, as the
    official code computes it)."""
    normed = F.normalize(frames, p=2, dim=-1)
    return F.cosine_similarity(normed[:-1], normed[1:], dim=-1)


def static_windows(similarity: Tensor, tau: float = TAU, max_window: int = MAX_WINDOW) -> tuple[list[tuple[int, int]],
                                                                                                 int]:
    """The temporal windows (first frame, last frame) that save the most tokens, and the tokens they save
    (`select_static_windows`), from the frames' similarities [F - 1, N]."""
    frames = similarity.shape[0] + 1
    static = (similarity > tau).long()
    # still[s, j]: places static over frames s .. s + j + 1 (every step from s on), read once
    still = torch.stack([torch.cumprod(F.pad(static[start:], (0, 0, 0, start)), dim=0).sum(-1)
                         for start in range(frames - 1)]).tolist() if frames > 1 else []
    saved = [[0] * frames for _ in range(frames)]  # saved[s][e]: a window [s, e] merges its static places
    for start, counts in enumerate(still):
        for j, count in enumerate(counts[:frames - 1 - start]):
            saved[start][start + 1 + j] = count * (j + 1)
    best, first = [0] * frames, [0] * frames
    for i in range(frames):
        value, start = (best[i - 1] if i > 0 else 0), i
        for width in range(2, min(i + 1, max_window) + 1):
            j = i - width
            candidate = (best[j] if j >= 0 else 0) + saved[j + 1][i]
            if candidate > value:
                value, start = candidate, j + 1
        best[i], first[i] = value, start
    windows, i = [], frames - 1
    while i >= 0:
        windows.append((first[i], i))
        i = first[i] - 1
    return windows[::-1], best[-1]


def dpc_knn_centres(x: Tensor, clusters: int, k: int) -> tuple[Tensor, Tensor]:
    """DPC-kNN centres of tokens x [n, D], ascending, and the tokens' distances [n, n] (`cluster_dpc_knn` without
    its tie-breaking noise, centres sorted as the official caller sorts them)."""
    dist = torch.cdist(x.float()[None], x.float()[None])[0] / x.shape[-1] ** 0.5
    nearest = dist.topk(k, dim=-1, largest=False).values
    density = (-(nearest ** 2).mean(-1)).exp()
    higher = (density[None, :] > density[:, None]).to(x.dtype)
    delta = (dist * higher + dist.max() * (1 - higher)).min(-1).values
    return (delta * density).topk(clusters).indices.sort().values, dist


def merge_static(x: Tensor, ratio: float, beta: float = BETA, k: int = NEIGHBOURS) -> tuple[Tensor, Tensor, Tensor]:
    """A window's static tokens x [n, D] merged into round(n ratio) (`merge_tokens_by_density`): (the merged tokens
    [c, D], their centres [c] among x, the merge's weights [c, n])."""
    clusters = round(x.shape[0] * ratio)
    if clusters == 0:
        return x[:0], torch.zeros(0, dtype=torch.long, device=x.device), x.new_zeros(0, x.shape[0])
    centres, dist = dpc_knn_centres(x, clusters, min(k, clusters))
    is_centre = torch.zeros(1, x.shape[0], dtype=torch.bool, device=x.device)
    is_centre[0, centres] = True
    others = unmarked(is_centre, x.shape[0] - clusters)[0]
    assign = dist[others][:, centres].argmin(-1)  # each other token's nearest centre
    onehot = x.new_zeros(clusters, others.numel()).scatter_(0, assign[None], 1.0)  # [c, others]
    count = onehot.sum(-1, keepdim=True)
    members = (onehot @ x[others]) / count.clamp(min=1)
    has = count > 0
    merged = torch.where(has, beta * x[centres] + (1 - beta) * members, x[centres])
    weights = x.new_zeros(clusters, x.shape[0])
    weights[torch.arange(clusters, device=x.device), centres] = torch.where(has[:, 0], beta, 1.0).to(x.dtype)
    weights[:, others] = torch.where(has, (1 - beta) * onehot / count.clamp(min=1), 0)
    return merged, centres, weights


def outer_merge(frames: Tensor, attention: Tensor, ratio: float, tau: float = TAU, beta: float = BETA,
                k: int = NEIGHBOURS, max_window: int = MAX_WINDOW) -> tuple[Tensor, Tensor, Tensor, list]:
    """The outer stage on one video [F, N, D] with its tokens' tower attention [F, N]: (its tokens [m, D] in the
    official order, the slot each stands for [m] (its place, or its centre's in the window's first frame), the
    weights [m, F N] that make each of the current tokens, the windows)."""
    n_frames, per_frame, _ = frames.shape
    similarity = frame_similarity(frames)
    windows, saved = static_windows(similarity, tau, max_window)
    total = n_frames * per_frame
    ratio = min(ratio / ((total - saved) / total), 1)
    none = torch.zeros(per_frame, dtype=torch.bool, device=frames.device)
    static = torch.stack([(similarity[start:end] > tau).all(0) if end > start else none for start, end in windows])
    counts = static.sum(-1).tolist()  # static places per window, read once
    # each window's static places, then its dynamic ones, ascending (a stable sort of the mask)
    order = (~static).to(torch.uint8).argsort(dim=-1, stable=True)
    tokens, slots, weights = [], [], []
    for (start, end), n_static, places in zip(windows, counts, order):
        width = end - start + 1
        fixed, moving = places[:n_static].sort().values, places[n_static:]
        if n_static:
            merged, centres, w = merge_static(frames[start:end + 1, fixed].mean(0), ratio, beta, k)
            spread = frames.new_zeros(w.shape[0], n_frames, per_frame)
            spread[:, start:end + 1, fixed] = (w / width).unsqueeze(1)  # a static token: the mean of its frames
            tokens.append(merged)
            slots.append(start * per_frame + fixed[centres])
            weights.append(spread.flatten(1))
        keep = math.ceil(moving.numel() * ratio)
        for f in range(start, end + 1):
            chosen = moving[attention[f, moving].topk(keep).indices.sort().values] if keep else moving[:0]
            tokens.append(frames[f, chosen])
            slots.append(f * per_frame + chosen)
            weights.append(frames.new_zeros(keep, total).scatter_(1, slots[-1][:, None], 1.0))
    return torch.cat(tokens), torch.cat(slots), torch.cat(weights), windows


def inner_merge(hidden: Tensor, scores: Tensor, ratio: float = INNER_RATIO) -> tuple[Tensor, Tensor]:
    """The inner stage on one sample's visual tokens [n, D] scored by [n]: (the kept tokens' indices, ascending [k],
    their merged states [k, D]). The top round(n (1 - ratio)) stay; every other, in ascending order, is averaged into
    the kept token most similar to it, one after the other."""
    n = hidden.shape[0]
    k = round(n * (1 - ratio))
    top = scores.topk(k).indices  # the official order of the kept tokens (similarity columns)
    is_kept = torch.zeros(1, n, dtype=torch.bool, device=hidden.device)
    is_kept[0, top] = True
    others = unmarked(is_kept, n - k)[0]
    kept, rest = hidden[top], hidden[others]
    similarity = (rest @ kept.T) / (rest.norm(dim=-1, keepdim=True) * kept.norm(dim=-1, keepdim=True).T)
    target = similarity.max(-1).indices
    # each member's turn among its target's members (ascending): its place in the stable sort by target, less the
    # place of its target's first member
    by_target = target.argsort(stable=True)
    ordered = target[by_target]
    turn = torch.empty_like(target)
    turn[by_target] = torch.arange(n - k, device=hidden.device) - torch.searchsorted(ordered, ordered)
    states = kept.clone()
    for step in range(int(turn.max()) + 1 if n > k else 0):  # the step-th member of every target at once
        now = (turn == step).to(hidden.dtype).unsqueeze(-1)
        arriving = states.new_zeros(states.shape).index_add_(0, target, rest * now)
        hit = states.new_zeros(k, 1).index_add_(0, target, now)
        states = torch.where(hit > 0, (states + arriving) / 2, states)
    order = top.argsort()
    return top[order], states[order]


class HoliTom(Policy):
    name = "holitom"
    tower_attention = True

    def __init__(self, info: ModelInfo, share: float | None, retain_ratio: float | None, tau: float, beta: float,
                 inner: bool, inner_ratio: float, causal_scoring_layer: bool):
        self.info, self.share, self.tau, self.beta = info, share, tau, beta
        self.inner, self.inner_ratio = inner, inner_ratio
        self.inner_layer = info.relative_layers([INNER_LAYER], "HoliTom's inner layer",
                                                reference_layers=REFERENCE_LAYERS)[0]
        self.cut_layers = (0, self.inner_layer) if inner else (0,)
        self.bidirectional_layers = () if causal_scoring_layer or not inner else (self.inner_layer - 1,)
        self.retain_ratio = self._solved() if retain_ratio is None else retain_ratio

    def _solved(self) -> float:
        """The outer retention whose nominal mean over the layers is the budget's share (at most 1)."""
        layers = self.info.n_layers
        after = (layers - self.inner_layer) * (1 - self.inner_ratio) if self.inner else layers - self.inner_layer
        return min(self.share * layers / (self.inner_layer + after), 1.0)

    def renumbers_at(self, layer_idx: int) -> bool:
        return layer_idx == 0  # the outer stage shortens the sequence; the inner keeps positions with gaps

    def select_decoder(self, cut: DecoderCut) -> Selection:
        if cut.layer_idx == 0:
            return self._outer(cut)
        return self._inner(cut)

    def _outer(self, cut: DecoderCut) -> Selection:
        layout = video_layout(cut, TITLE)
        if cut.tower_attention is None:
            raise NotImplementedError(f"{TITLE} ranks a frame's dynamic tokens by the vision tower's attention, which "
                                      "this family's adapter does not show for videos (`Family.tower_functions`)")
        shape = (layout.frames, layout.per_frame)
        trailing = layout.with_trailing(cut.visual.new_zeros(len(cut.samples), 0))  # kept after the video's tokens
        merged, slots, weights = [], [], []
        for video, attention, kept in zip(layout.frame_rows(cut), cut.tower_attention[:, :layout.frame_tokens],
                                          trailing):
            tokens, where, w, _ = outer_merge(video.view(*shape, -1), attention.view(shape), self.retain_ratio,
                                              self.tau, self.beta)
            merged.append(tokens)
            slots.append(torch.cat([kept, where]))
            weights.append(F.pad(w, (0, layout.trailing)))  # over every current visual token
        return Selection(trailing, merged, weights, slots=slots, trailing=layout.trailing)

    def _inner(self, cut: DecoderCut) -> Selection:
        rows = cut.attention(self.inner_layer - 1, cut.last_token(), hidden=cut.prev_hidden)  # [G, H, 1, L]
        scores = rows.mean(1)[:, 0].gather(1, cut.visual)
        keep, states = zip(*(inner_merge(h, s, self.inner_ratio)
                             for h, s in zip(cut.visual_rows(cut.hidden), scores)))
        return Selection(list(keep), features=list(states))  # the kept tokens, in place, with what they absorbed

    def describe(self) -> dict:
        described = {"method": self.name, "layers": list(self.cut_layers), "retain_ratio": self.retain_ratio,
                     "tau": self.tau, "beta": self.beta, "inner_ratio": self.inner_ratio if self.inner else None,
                     "bidirectional_layers": list(self.bidirectional_layers)}
        if self.share is None:
            return described
        return described | {"share": self.share, "equivalent_tokens": round(self.share * self.info.n_visual)}


def policy(info: ModelInfo, budget: float | None = None, retain_ratio: float | None = None, tau: float = TAU,
           beta: float = BETA, inner: bool = True, inner_ratio: float = INNER_RATIO,
           causal_scoring_layer: bool = True) -> Policy:
    """HoliTom keeping about `budget` of the nominal visual tokens on average over the layers (that share of each
    video), or with the official outer `retain_ratio` (RETAIN_RATIO: 0.10 with tau 0.65; 0.15-0.25 with tau 0.8)."""
    if (retain_ratio is None) == (budget is None):
        raise ValueError("give HoliTom a budget (or ratio=) or retain_ratio= (the official RETAIN_RATIO), one of them")
    if budget is not None and budget < smallest_budget(info):
        raise Unreachable(f"HoliTom keeps whole tokens: the smallest reachable budget is {smallest_budget(info):g} "
                          f"(or {info.n_visual} for the unpruned model)", smallest_budget(info))
    if retain_ratio is not None and not 0 < retain_ratio <= 1:
        raise ValueError(f"retain_ratio is the share of video tokens HoliTom's outer stage keeps, in (0, 1]; got "
                         f"{retain_ratio}")
    if not 0 <= inner_ratio < 1:
        raise ValueError(f"inner_ratio is the share of tokens the inner stage merges away, in [0, 1); got "
                         f"{inner_ratio}")
    return HoliTom(info, None if budget is None else retention(budget, info), retain_ratio, tau, beta, inner,
                   inner_ratio, causal_scoring_layer)


def smallest_budget(info: ModelInfo) -> float:
    """A token: what a video keeps depends on its windows."""
    return 1


def selection_macs(cut: Cut, width: int) -> int:
    """Outer stage: the frames' cosine similarities and the static tokens' DPC-kNN distances (at most one token's
    width per pair of the tokens it keeps, about two per token); inner stage: each merged-away token's cosine with
    every kept one. The tower's attention rows are charged by `Overhead.tower_rows`."""
    if cut.layer == 0:
        return 2 * cut.before * width
    return (cut.before - cut.merged) * cut.merged * width


METHOD = Method("holitom", TITLE, policy, smallest_budget, replaces_budget=("retain_ratio",), video_only=True,
                exact_count=False,
                overhead=lambda **_: Overhead(rows="text", selection=selection_macs, tower_rows=True),
                scoring=lambda **_: {"decoder": "temporal"})
