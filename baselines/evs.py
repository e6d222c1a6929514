"""EVS (NVIDIA's Efficient Video Sampling, arXiv 2510.14624): drop the video tokens that repeat the previous frame.

As vLLM ships it (`vllm/multimodal/evs.py`, `compute_retention_mask`, read at 926c71f6; `--video-pruning-rate q`),
on a video's projected tokens before the language model (vLLM: the merged video embeddings after the ViT and
merger; here the tokens entering decoder layer 0, the same tensor), per video:
- each token's dissimilarity to the token at the same place in the previous frame, 1 - cosine similarity; every
  token of the first frame gets 255, so the whole first frame is always kept;
- the tokens are ranked by dissimilarity, descending, with a stable sort (ties keep the earlier token), and the
  first max(tokens per frame, int(frames x tokens per frame x (1 - q))) are kept, in their original order.
A "frame" is the model's own unit (`shared.VideoLayout`): Video-LLaVA's 257 tokens of a sampled frame (CLS
included), Qwen2.5-VL's and Qwen3-VL's temporal grid of two input frames (h x w / 4 tokens; on Qwen3-VL each in its
own span after its timestamp, which is text and never cut), LLaVA-OneVision's 196 pooled tokens. OneVision's newline
after the video: vLLM has no OneVision path; it is kept after the kept frame tokens, never ranked or counted, as
the official LLaVA-NeXT-based code of the other video methods appends it after compressing the frames.

Budgets: a budget (or `ratio=`) keeps that share of each video's own tokens, q = 1 - budget / the model's nominal
visual tokens; option `pruning_rate` gives vLLM's q directly instead. A video keeps at least its first frame, so on
a model whose nominal sample is a video (Video-LLaVA: 8 frames) a budget below one frame is refused; a shorter
video than the nominal keeps its first frame whatever the rate, as in vLLM.

Positions: the kept tokens keep their M-RoPE positions on Qwen2.5-VL and Qwen3-VL, with their DeepStack rows
(vLLM's `compute_mrope_for_media`); the text after the video keeps transformers' unpruned positions, which start
max(h, w) / 2 after the video's first position, where vLLM's `recompute_mrope_positions` starts them w / 2 after it:
the same unless the video is taller than wide. On Video-LLaVA and OneVision (1-D RoPE) the shortened sequence is
numbered contiguously, as a model served with the pruned placeholder count is.
EVS is deterministic (stable sort) and per video, so a batch equals each video alone. Images are refused: vLLM
applies EVS to videos only. Parity: `tests/parity/evs/` holds vLLM's own function's masks on random embeddings.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from visiondrop.engine import Policy
from visiondrop.core import Cut, ModelInfo
from visiondrop.methods import Method, Overhead
from visiondrop.methods.shared import FrameSelection, VideoLayout, nominal_video, video_share

FIRST_FRAME = 255.0  # vLLM's sentinel dissimilarity of the first frame's tokens: above any 1 - cosine (at most 2)


def retained_count(per_frame: int, frames: int, pruning_rate: float) -> int:
    """Tokens a video keeps: the rate's share, but at least its first frame."""
    return max(per_frame, int(per_frame * frames * (1 - pruning_rate)))


def retained(video: Tensor, frames: int, pruning_rate: float) -> Tensor:
    """Indices (ascending) [..., k] of the tokens EVS keeps of videos [..., frames x per_frame, D], frame after
    frame."""
    x = video.unflatten(-2, (frames, -1))
    dissimilarity = 1 - F.cosine_similarity(x[..., 1:, :, :], x[..., :-1, :, :], dim=-1)
    first = dissimilarity.new_full((*x.shape[:-3], 1, x.shape[-2]), FIRST_FRAME)
    order = torch.cat([first, dissimilarity], -2).flatten(-2).argsort(dim=-1, descending=True, stable=True)
    return order[..., :retained_count(x.shape[-2], frames, pruning_rate)].sort(dim=-1).values


class EVS(FrameSelection):
    name, title, knob = "evs", "EVS", "pruning_rate"

    def kept(self, frames: Tensor, layout: VideoLayout) -> Tensor:
        return retained(frames, layout.frames, self.setting)

    def equivalent_tokens(self) -> int | None:
        video = nominal_video(self.info)
        return None if video is None else retained_count(video[1], video[0], self.setting)


def policy(info: ModelInfo, budget: float | None = None, pruning_rate: float | None = None) -> Policy:
    """EVS keeping `budget` of the nominal visual tokens (that share of each video), or at vLLM's `pruning_rate`."""
    share = video_share(info, budget, pruning_rate, "pruning_rate", "EVS", smallest_budget(info),
                        "keeps every video's first frame")
    pruning_rate = pruning_rate if share is None else 1 - share
    if not 0 <= pruning_rate < 1:
        raise ValueError(f"pruning_rate is the share of video tokens EVS drops, in [0, 1); got {pruning_rate}")
    return EVS(info, pruning_rate)


def smallest_budget(info: ModelInfo) -> float:
    """One frame of the nominal video; where the nominal sample is an image, any budget (each video keeps its
    first frame at least)."""
    video = nominal_video(info)
    return video[1] if video is not None else 1



def selection_macs(cut: Cut, width: int) -> int:
    """Each token's cosine similarity to the token at its place in the previous frame."""
    return cut.before * width


METHOD = Method("evs", "EVS", policy, smallest_budget, replaces_budget=("pruning_rate",), example_budget=144,
                video_only=True, overhead=lambda **_: Overhead(selection=selection_macs),
                scoring=lambda **_: {"decoder": "temporal"})
