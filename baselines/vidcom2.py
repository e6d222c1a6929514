"""VidCom2 (EMNLP 2025): per-frame budgets by frame uniqueness, keep each frame's most distinctive tokens.

As the official code does it (github.com/xuyang-liu16/VidCom2, `token_compressor/vidcom2/vidcom2.py::
vidcom2_compression`, last changed 38656989; read at d31b1560), on a video's projected tokens before the language
model (LLaVA-OneVision: after the projector and pooling; Qwen2.5-VL: the merged video embeddings; here the tokens
entering decoder layer 0, the same tensor), per video of F frames of N tokens, with base = the retention ratio:
1. the half of the channels with the lowest variance over all the video's tokens (population variance; `topk` of
   the lowest), each token L2-normalised on those channels;
2. against the video's mean token and against its frame's mean token, a multi-scale Gaussian similarity
   G(x, c) = sum over a in {1/8, 1/4, 1/2, 1, 2} of exp(-|x - c|^2 / 2a);
3. frame uniqueness u_f = -mean over the frame's tokens of G(x, video mean); p = softmax((u - max u) / 0.01) over
   frames; the frame keeps k_f = max(1, round(N x min(1, base x (1 + p_f - mean p)))) tokens (torch.round, half to
   even): unique frames keep more, the total stays near base x F x N;
4. per frame the k_f tokens with the lowest G(x, video mean) + G(x, frame mean) (the most distinctive), in their
   original order.
A "frame" is the model's own unit (`shared.VideoLayout`): Video-LLaVA's 257 tokens of a sampled frame (CLS
included), Qwen2.5-VL's and Qwen3-VL's temporal grid (h x w / 4 tokens), LLaVA-OneVision's 196 pooled tokens.
OneVision: as the official code (`flat[idx]`, then the newline appended), the newline after the video is kept after
the kept frame tokens, never scored or counted. Qwen3-VL: as the official port, the video tokens across the
timestamps (`video_mask` positions) are one video, and the DeepStack rows of the kept tokens go with them.
Positions: contiguous on Video-LLaVA and OneVision (the shortened sequence); on Qwen2.5-VL and Qwen3-VL the kept
tokens keep their M-RoPE positions and the text its unpruned ones, as the official Qwen port slices
`position_ids[:, :, keep]` with `rope_deltas` from the unpruned sequence.

Budgets: a budget (or `ratio=`) is base x the nominal visual tokens; option `base_scale` gives the official
`R_RATIO` directly. The count kept depends on the video (per-frame rounding and the clamp at 1), so `describe()`
states base x the nominal tokens and a video keeps within half a token a frame of it (`Method.exact_count`).
The official code compresses videos only (its LLaVA and Qwen entries skip images, and its Qwen port turns off at
batch sizes above one); here images are refused and any batch equals each video alone, computed for the batch at
once on the device (each frame's k_f lowest scores as a rank below k_f: no count read on the host). Deterministic
(its `topk(sorted=False)` is re-sorted; ties between equal scores fall as a stable sort breaks them).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from visiondrop.engine import Policy
from visiondrop.core import Cut, ModelInfo
from visiondrop.methods import Method, Overhead
from visiondrop.methods.shared import FrameSelection, VideoLayout, video_share

CHANNEL_SHARE = 0.5  # channels kept for scoring: the lowest-variance half
SCALES = [2.0 ** k for k in range(-3, 2)]  # the Gaussian kernels' a: 1/8 .. 2
TEMPERATURE = 0.01  # of the softmax over frame uniqueness


def gaussian(x: Tensor, centre: Tensor) -> Tensor:
    """Multi-scale Gaussian similarity of tokens x [..., D] to `centre` (broadcast): [...]."""
    distance = ((x - centre) ** 2).sum(-1)
    return sum(torch.exp(-distance / (2 * a)) for a in SCALES)


def frame_budgets(uniqueness: Tensor, base: float, per_frame: int) -> Tensor:
    """Tokens each frame keeps [..., F] from its uniqueness [..., F]: base x (1 + p_f - mean p), at most all, at
    least 1."""
    p = F.softmax((uniqueness - uniqueness.amax(-1, keepdim=True)) / TEMPERATURE, dim=-1)
    scales = (base * (1 + p - p.mean(-1, keepdim=True))).clamp(max=1.0)
    return (scales * per_frame).round().long().clamp(min=1)


def kept_mask(videos: Tensor, frames: int, base: float) -> Tensor:
    """The tokens VidCom2 keeps [G, F x N] of videos [G, F x N, D], all on the device: each frame's k_f lowest-scored
    (the official per-frame `topk(k_f, largest=False)`, as the rank of each score within its frame below k_f)."""
    variance = videos.var(dim=-2, unbiased=False)
    channels = torch.topk(variance, k=int(videos.shape[-1] * CHANNEL_SHARE), largest=False).indices
    x = videos.gather(-1, channels.unsqueeze(-2).expand(-1, videos.shape[-2], -1))
    x = F.normalize(x.unflatten(-2, (frames, -1)), dim=-1)  # [G, F, N, D / 2]
    per_video = gaussian(x, x.mean(dim=(1, 2), keepdim=True))
    per_frame = gaussian(x, x.mean(dim=2, keepdim=True))
    budgets = frame_budgets(-per_video.mean(-1), base, x.shape[2])
    rank = (per_video + per_frame).argsort(dim=-1, stable=True).argsort(dim=-1)
    return (rank < budgets.unsqueeze(-1)).flatten(1)


def retained(video: Tensor, frames: int, base: float) -> Tensor:
    """Indices (ascending) of the tokens VidCom2 keeps of one video [F x N, D], frame after frame."""
    return kept_mask(video[None], frames, base)[0].nonzero()[:, 0]


class VidCom2(FrameSelection):
    name, title, knob = "vidcom2", "VidCom2", "base_scale"

    def kept(self, frames: Tensor, layout: VideoLayout) -> Tensor:
        return kept_mask(frames, layout.frames, self.setting)

    def equivalent_tokens(self) -> int | None:
        return round(self.setting * self.info.n_visual)


def policy(info: ModelInfo, budget: float | None = None, base_scale: float | None = None) -> Policy:
    """VidCom2 keeping about `budget` of the nominal visual tokens (that share of each video), or at the official
    `base_scale` (R_RATIO)."""
    share = video_share(info, budget, base_scale, "base_scale", "VidCom2", smallest_budget(info),
                        "keeps at least one token a frame")
    base_scale = base_scale if share is None else share
    if not 0 < base_scale <= 1:
        raise ValueError(f"base_scale is the share of video tokens VidCom2 keeps, in (0, 1]; got {base_scale}")
    return VidCom2(info, base_scale)


def smallest_budget(info: ModelInfo) -> float:
    """A token a frame of the nominal sample (its crops: Video-LLaVA's 8 frames)."""
    return info.crops



def selection_macs(cut: Cut, width: int) -> int:
    """The channel variances, and each token's distance to the video's and its frame's mean on half the channels."""
    return 2 * cut.before * width


METHOD = Method("vidcom2", "VidCom2", policy, smallest_budget, replaces_budget=("base_scale",), video_only=True,
                exact_count=False, overhead=lambda **_: Overhead(selection=selection_macs),
                scoring=lambda **_: {"decoder": "uniqueness"})
