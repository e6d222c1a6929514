"""DyCoke (CVPR 2025): temporal token merging across frames before the language model (TTM).

As the official code does it (github.com/KD-TAO/DyCoke, `llava/model/llava_arch.py::dycole_ttm`, read at 26dc6f4;
last code change 8df42969), on a video's projected tokens before the language model (LLaVA-OneVision: after the
projector and pooling; here the tokens entering decoder layer 0, the same tensor), per video of F frames of N tokens,
with m = int((1 - K) x N) tokens kept of a pruned frame (K = `dycoke_k`, 0.7 in its lmms-eval runs):
1. pairs (0, 1), (2, 3), ...: the second frame of a pair keeps the m tokens least similar (cosine, on L2-normalised
   tokens) to the token at the same place in a first frame, in ascending-similarity order (`topk(largest=False)`,
   sorted), not in spatial order;
2. (0, 2), (4, 6), ... for i in range(0, F - 4, 4): frame i + 2 keeps the m tokens least similar to frame i;
3. the other frames (0, 4, 8, ... and the last even ones) stay whole; frames in order. Pruning, not averaging.
On 32 frames at K = 0.7: 9 whole frames and 23 of 58 tokens (49.4%). A "frame" is the model's own unit:
Video-LLaVA's 257 tokens (CLS included), Qwen2.5-VL's temporal grid. Positions: contiguous on Video-LLaVA (the
shortened sequence, as the official one); on Qwen2.5-VL the kept tokens keep their M-RoPE positions.

Official bugs, reproduced by default; `fix_bugs=True` corrects them:
- step 1 scores pair (i, i + 1) with the similarities of the previous pair (`similarities[(i - 2) // 2]`: the first
  pair with the last pair's), so the tokens a frame keeps follow another frame's change; fixed: its own pair's;
- an odd frame count silently drops the last frame; fixed: it stays whole;
- F <= 4 fails (`torch.stack` of an empty list in step 2): refused here with a clear error; fixed: step 2 is skipped.
Its state not being reset between samples concerns the decode-time stage, not implemented here (below).

Budgets: a budget (or `ratio=`) keeps that share of each video's own tokens: m is the count that brings the video's
whole and pruned frames nearest to it (at least one token a pruned frame; a video whose whole frames alone exceed
the share is refused, naming the share it can reach); option `dycoke_k` gives the official K instead, m = int((1 - K)
x N). Defaults follow the official eval script (`eval.sh` sets nothing: lmms-eval's dycoke_k = 0.7 when K is given).

Not implemented: the second stage, decode-time KV selection (each decode step at layers >= 3 attends to the visual
tokens with the top (1 - P) of the layer-2 attention, P = 0.8, unless it changed little since the previous step);
it changes no prefill count and saves no memory in the official code (the cache is never shrunk). Images are
refused (the official code compresses videos only).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from visiondrop.engine import Policy
from visiondrop.core import Cut, ModelInfo
from visiondrop.methods import Method, Overhead, Unreachable
from visiondrop.methods.shared import FrameSelection, VideoLayout, nominal_video, retention

MERGING_RATIO = 0.7  # K: lmms-eval's default dycoke_k, which the official eval.sh keeps


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
        scores = similarity[j] if fix_bugs else similarity[(2 * j - 2) // 2]  # official: similarities[(i - 2) // 2]
        own[b] = scores.topk(m, largest=False).indices
    for a, b in second:
        own[b] = F.cosine_similarity(x[a], x[b], dim=1).topk(m, largest=False).indices
    return torch.cat([own[f] + f * per_frame for f in sorted(own)])


class DyCoke(FrameSelection):
    name, title = "dycoke", "DyCoke"

    def __init__(self, info: ModelInfo, share: float | None, dycoke_k: float | None, fix_bugs: bool):
        self.info, self.share, self.dycoke_k, self.fix_bugs = info, share, dycoke_k, fix_bugs

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
        described |= {"dycoke_k": self.dycoke_k} if self.dycoke_k is not None else {"share": self.share}
        video = nominal_video(self.info)
        if video is not None:
            m = self.pruned_tokens(*video)
            described |= {"pruned_frame_tokens": m, "equivalent_tokens": kept_count(*video, m, self.fix_bugs)}
        return described


def policy(info: ModelInfo, budget: float | None = None, dycoke_k: float | None = None,
           fix_bugs: bool = False) -> Policy:
    """DyCoke's temporal merging keeping about `budget` of the nominal visual tokens (that share of each video), or
    with the official merging ratio `dycoke_k`; `fix_bugs` corrects the official code's bugs (module docstring)."""
    if dycoke_k is None and budget is None:
        raise ValueError(f"DyCoke needs a budget (or ratio=) or dycoke_k= (the official runs use {MERGING_RATIO})")
    if dycoke_k is not None and budget is not None:
        raise ValueError("give DyCoke a budget (or ratio=) or dycoke_k=, not both")
    if dycoke_k is not None and not 0 <= dycoke_k < 1:
        raise ValueError(f"dycoke_k is the share of a pruned frame's tokens DyCoke drops, in [0, 1); got {dycoke_k}")
    dycoke = DyCoke(info, None if budget is None else retention(budget, info), dycoke_k, fix_bugs)
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
