"""DyCoke (CVPR 2025): temporal token merging across frames before the language model (TTM), then a dynamic KV
selection at decode time; each stage is an option (`temporal_merging`, `dycoke_p=None` turns the second off).

Stage 1, temporal merging (a cut before decoder layer 0):

As the official code does it (github.com/KD-TAO/DyCoke, `llava/model/llava_arch.py::dycole_ttm`, read at HEAD
dd74634; last change 35cc532 of 2025-03-01, which made each pair score with its own similarities, not the previous
pair's), on a video's projected tokens before the language model (LLaVA-OneVision: after the projector and pooling;
here the tokens entering decoder layer 0, the same tensor), per video of F frames of N tokens, with m = int((1 - K) x N)
tokens kept of a pruned frame (K = `dycoke_k`, 0.7 in its lmms-eval runs):
1. pairs (0, 1), (2, 3), ...: the second frame of a pair keeps the m tokens least similar (cosine, on L2-normalised
   tokens) to the token at the same place in a first frame, in ascending-similarity order (`topk(largest=False)`,
   sorted), not in spatial order;
2. (0, 2), (4, 6), ... for i in range(0, F - 4, 4): frame i + 2 keeps the m tokens least similar to frame i;
3. the other frames (0, 4, 8, ... and the last even ones) stay whole; frames in order. Pruning, not averaging.
On 32 frames at K = 0.7: 9 whole frames and 23 of 58 tokens (49.4%). A "frame" is the model's own unit
(`shared.VideoLayout`): Video-LLaVA's 257 tokens (CLS included), Qwen2.5-VL's and Qwen3-VL's temporal grid (on
Qwen3-VL each in its span after its timestamp, never cut), LLaVA-OneVision's 196 pooled tokens. OneVision: as the
official code (TTM on the pooled frames, then the one newline appended), the newline is kept after the frames'
tokens, never pruned or counted. Positions: contiguous on Video-LLaVA and OneVision (the shortened sequence, as the
official one); on Qwen2.5-VL and Qwen3-VL the kept tokens keep their M-RoPE positions (and DeepStack rows).

Official bugs, reproduced by default; `fix_bugs=True` corrects them:
- an odd frame count silently drops the last frame; fixed: it stays whole;
- F <= 4 fails (`torch.stack` of an empty list in step 2): refused here with a clear error; fixed: step 2 is skipped.
Stage 2's bugs are below.

Budgets: a budget (or `ratio=`) keeps that share of each video's own tokens: m is the count that brings the video's
whole and pruned frames nearest to it (at least one token a pruned frame; a video whose whole frames alone exceed
the share is refused, naming the share it can reach); option `dycoke_k` gives the official K instead, m = int((1 - K)
x N). Defaults follow the official eval script (`eval.sh` sets nothing: lmms-eval's dycoke_k = 0.7 when K is given).

Stage 2, dynamic KV pruning at decode time (the official `PrunableDynamicCache` in `llava/model/language_model/
modeling_qwen2.py` and its hook in `Qwen2Model.forward`, last changed at 2325b63, run since the fixes of 2025-04-08/10),
through the engine's decode-time KV selection (`Policy.decode_layers`): at every decode step, the head-averaged
attention of the new token at layer L - 1 (`dycoke_l` = 3, lmms-eval's default) to a video's cached tokens is
compared (cosine) with the previous step's; below 0.9 (hard-coded) the layers >= L attend, at this step only, to the
int(n x (1 - P)) tokens of highest attention (P = `dycoke_p`, 0.8 in the eval script's lmms-eval defaults) and to
every other token; the selection is made anew at each step and the cache keeps every token (no memory saved, as in
the official code). It changes no prefill count: a budget counts the prefill, and the FLOPs count charges the decode
step's attention over the keys attended and the layer-(L - 1) row (`visiondrop.efficiency.flops`). Official bugs,
reproduced by default, corrected by `fix_bugs=True`:
- the video's scored span is one token short (`image_token_length` is the TTM output's length minus one), so its
  last frame token is never scored and always attended; fixed: every frame token is scored;
- a step whose attention changed little (cosine >= 0.9) leaves `kv_cache` None (it is reset below layer L at every
  step), so that step attends to the whole cache, where the paper keeps the previous selection; fixed: the previous
  step's selection is kept.
Not reproduced: the official state (the previous step's attention) is never reset, so the first decode step of a video
compares with the last step of the video before it; here each generation starts afresh (a batch equals each video
alone). Tokens after a video's frames (LLaVA-OneVision's newline, `DecodeStep.trailing`) are never scored and always
attended, as officially. Parity: `tests/parity/dycoke/kv_fixture.pt`, the official cache driven on random attention
rows. Images are refused (the official code compresses videos only).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from visiondrop.engine import DecodeStep, DecoderCut, Policy
from visiondrop.core import Cut, ModelInfo
from visiondrop.methods import Method, Overhead, Unreachable
from visiondrop.methods.shared import FrameSelection, VideoLayout, nominal_video, retention, video_layout

MERGING_RATIO = 0.7  # K: lmms-eval's default dycoke_k, which the official eval.sh keeps
PRUNING_RATIO = 0.8  # P: lmms-eval's default dycoke_p, which the official eval.sh keeps
KV_LAYER = 3  # L: lmms-eval's default dycoke_l
SIMILARITY = 0.9  # the official code's hard-coded threshold on the change of the attention between steps


def pruned_frames(frames: int, fix_bugs: bool) -> tuple[list[tuple[int, int]], list[tuple[int, int]], bool]:
    """The official layout of F frames: step 1's (reference, pruned) pairs, step 2's, and whether the last frame is
    dropped (odd F, official)."""
    if frames <= 4 and not fix_bugs:
        raise ValueError(f"DyCoke's official code fails on videos of {frames} frames (4 or fewer: its second pass "
                         "stacks an empty list); pass fix_bugs=True to skip that pass on short videos")
    first = [(i, i + 1) for i in range(0, frames - 1, 2)]
    second = [(i, i + 2) for i in range(0, frames - 4, 4)]
    return first, second, frames % 2 == 1 and not fix_bugs


def kept_count(frames: int, per_frame: int, m: int, fix_bugs: bool) -> int:
    """Tokens a video keeps with m tokens a pruned frame."""
    first, second, dropped = pruned_frames(frames, fix_bugs)
    pruned = len(first) + len(second)
    return (frames - int(dropped) - pruned) * per_frame + pruned * m


def temporal_merge(video: Tensor, frames: int, m: int, fix_bugs: bool) -> Tensor:
    """Indices of the tokens DyCoke's TTM keeps of one video [F x N, D], in its output order."""
    x = video.view(frames, -1, video.shape[-1])
    per_frame = x.shape[1]
    first, second, dropped = pruned_frames(frames, fix_bugs)
    normed = F.normalize(x, p=2, dim=-1)
    similarity = [F.cosine_similarity(normed[a], normed[b], dim=1) for a, b in first]
    own = {b: torch.arange(per_frame, device=video.device) for b in range(frames - int(dropped))}
    for j, (_, b) in enumerate(first):
        own[b] = similarity[j].topk(m, largest=False).indices
    for a, b in second:
        own[b] = F.cosine_similarity(x[a], x[b], dim=1).topk(m, largest=False).indices
    return torch.cat([own[f] + f * per_frame for f in sorted(own)])


def kv_selection(attention: Tensor, previous: Tensor | None, kept_before: Tensor | None, dycoke_p: float,
                 fix_bugs: bool) -> tuple[Tensor | None, Tensor]:
    """One decode step of DyCoke's dynamic KV pruning (the official `PrunableDynamicCache.dycoke_pruning` and
    `update_cache`), on `attention` [n]: the head-averaged attention of the decode query to a video's n cached frame
    tokens at layer L - 1. `previous`: the scored row of the previous step (None at the first); `kept_before`: the
    previous step's selection (used with `fix_bugs` only). Returns (which of the n tokens layers >= L attend to, a
    bool [n], or None for all of them; the scored row to remember)."""
    scored = attention if fix_bugs else attention[:-1]  # official: image_token_length is one short
    similarity = 0 if previous is None else float(F.cosine_similarity(scored, previous, dim=0))
    if similarity >= SIMILARITY:  # little change: official, the whole cache; fixed: the previous step's selection
        return (kept_before if fix_bugs else None), scored
    kept = torch.zeros_like(attention, dtype=torch.bool)
    kept[scored.topk(int(scored.shape[0] * (1 - dycoke_p)), sorted=False).indices] = True
    kept[scored.shape[0]:] = True  # official: the token it does not score stays
    return kept, scored


class DyCoke(FrameSelection):
    name, title = "dycoke", "DyCoke"

    def __init__(self, info: ModelInfo, share: float | None, dycoke_k: float | None, fix_bugs: bool,
                 temporal_merging: bool = True, dycoke_p: float | None = PRUNING_RATIO, dycoke_l: int = KV_LAYER):
        self.info, self.share, self.dycoke_k, self.fix_bugs = info, share, dycoke_k, fix_bugs
        self.temporal_merging, self.dycoke_p, self.dycoke_l = temporal_merging, dycoke_p, dycoke_l
        self.cut_layers = (0,) if temporal_merging else ()
        self.decode_scoring_layer = None if dycoke_p is None else dycoke_l - 1

    @property
    def decode_layers(self) -> tuple[int, ...]:
        """The decode-time stage's layers: L and every later one."""
        return () if self.dycoke_p is None else tuple(range(self.dycoke_l, self.info.n_layers))

    def prepare(self, cut: DecoderCut) -> None:
        if not self.temporal_merging:  # the first stage refuses images otherwise
            video_layout(cut, self.title)

    def select_cached(self, step: DecodeStep) -> list[Tensor | None]:
        """Each video's selection for this decode step, from the last new token's layer L - 1 attention to its frame
        tokens (the tokens after its frames, `DecodeStep.trailing`, always attended)."""
        selection = []
        for b, (visual, trailing, state) in enumerate(zip(step.visual, step.trailing, step.state)):
            if not len(visual):
                selection.append(None)
                continue
            frames = visual[:len(visual) - trailing]
            row = step.attention[b].mean(0)[-1][frames]  # the mean over heads, the last query
            kept, state["previous"] = kv_selection(row, state.get("previous"), state.get("kept"), self.dycoke_p,
                                                   self.fix_bugs)
            state["kept"] = kept
            selection.append(None if kept is None else torch.cat([kept, kept.new_ones(trailing)]))
        return selection

    def pruned_tokens(self, frames: int, per_frame: int) -> int:
        """m: tokens a pruned frame keeps in a video of `frames` x `per_frame`."""
        first, second, _ = pruned_frames(frames, self.fix_bugs)  # refuses what the official code fails on
        if self.dycoke_k is not None:
            return int((1 - self.dycoke_k) * per_frame)
        whole = kept_count(frames, per_frame, 0, self.fix_bugs)
        if not first and not second:
            raise Unreachable(f"DyCoke prunes nothing of a {frames}-frame video: it cannot keep {self.share:.4g} of it")
        m = round((self.share * frames * per_frame - whole) / (len(first) + len(second)))
        if m < 1:
            reach = kept_count(frames, per_frame, 1, self.fix_bugs) / (frames * per_frame)
            raise Unreachable(f"DyCoke keeps some of a {frames}-frame video's frames whole: it cannot keep "
                              f"{self.share:.4g} of it, the smallest share it keeps is {reach:.4g}")
        return min(m, per_frame)

    def kept(self, frames: Tensor, layout: VideoLayout) -> Tensor:
        m = self.pruned_tokens(layout.frames, layout.per_frame)
        return torch.stack([temporal_merge(video, layout.frames, m, self.fix_bugs) for video in frames])

    def describe(self) -> dict:
        described = {"method": self.name, "layers": list(self.cut_layers), "fix_bugs": self.fix_bugs}
        if self.dycoke_p is not None:
            described |= {"kv_selection": {"dycoke_l": self.dycoke_l, "dycoke_p": self.dycoke_p}}
        if not self.temporal_merging:
            return described
        described |= {"dycoke_k": self.dycoke_k} if self.dycoke_k is not None else {"share": self.share}
        video = nominal_video(self.info)
        if video is not None:
            m = self.pruned_tokens(*video)
            described |= {"pruned_frame_tokens": m, "equivalent_tokens": kept_count(*video, m, self.fix_bugs)}
        return described


def policy(info: ModelInfo, budget: float | None = None, dycoke_k: float | None = None, fix_bugs: bool = False,
           temporal_merging: bool = True, dycoke_p: float | None = PRUNING_RATIO, dycoke_l: int = KV_LAYER) -> Policy:
    """DyCoke's temporal merging keeping about `budget` of the nominal visual tokens (that share of each video), or
    with the official merging ratio `dycoke_k`, then its decode-time KV selection dropping the share `dycoke_p` of a
    video's cached tokens from layer `dycoke_l` on (None: no decode-time stage); `temporal_merging=False`: the
    decode-time stage alone; `fix_bugs` corrects the official code's bugs (module docstring)."""
    if dycoke_p is not None and not 0 <= dycoke_p < 1:
        raise ValueError(f"dycoke_p is the share of a video's cached tokens DyCoke's decode steps drop, in [0, 1) (or "
                         f"None: no decode-time stage); got {dycoke_p}")
    if dycoke_p is not None and not 1 <= dycoke_l < info.n_layers:
        raise ValueError(f"dycoke_l is the first decoder layer whose decode steps DyCoke prunes (scored at the layer "
                         f"before), from 1 to {info.n_layers - 1} on this model; got {dycoke_l}")
    if not temporal_merging:
        if dycoke_p is None:
            raise ValueError("DyCoke with both stages off is the unpruned model: use method='none'")
        if budget is not None or dycoke_k is not None:
            raise ValueError("DyCoke without temporal merging keeps every visual token in the prefill: give no budget "
                             "(or ratio=) nor dycoke_k (its decode-time stage is set by dycoke_p)")
        return DyCoke(info, None, None, fix_bugs, False, dycoke_p, dycoke_l)
    if dycoke_k is None and budget is None:
        raise ValueError(f"DyCoke needs a budget (or ratio=) or dycoke_k= (the official runs use {MERGING_RATIO})")
    if dycoke_k is not None and budget is not None:
        raise ValueError("give DyCoke a budget (or ratio=) or dycoke_k=, not both")
    if dycoke_k is not None and not 0 <= dycoke_k < 1:
        raise ValueError(f"dycoke_k is the share of a pruned frame's tokens DyCoke drops, in [0, 1); got {dycoke_k}")
    dycoke = DyCoke(info, None if budget is None else retention(budget, info), dycoke_k, fix_bugs, True, dycoke_p,
                    dycoke_l)
    if budget is not None and budget < smallest_budget(info):
        raise Unreachable(f"DyCoke keeps some frames whole: the smallest reachable budget is {smallest_budget(info):g} "
                          f"(or {info.n_visual} for the unpruned model)", smallest_budget(info))
    dycoke.describe()  # refuses a budget the nominal video cannot reach
    return dycoke


def smallest_budget(info: ModelInfo) -> float:
    """The nominal video's whole frames and one token of each pruned frame (Video-LLaVA's 8 frames: 3 x 257 + 5);
    where the nominal sample is an image, any budget (each video is checked against its own frames)."""
    video = nominal_video(info)
    return kept_count(*video, 1, False) if video is not None else 1



def selection_macs(cut: Cut, width: int) -> int:
    """Each pruned frame's tokens' cosine similarity to their reference frame's (at most one per token)."""
    return cut.before * width


METHOD = Method("dycoke", "DyCoke", policy, smallest_budget, replaces_budget=("dycoke_k",), example_budget=288,
                video_only=True, overhead=lambda **_: Overhead(selection=selection_macs),
                scoring=lambda **_: {"decoder": "temporal"})
