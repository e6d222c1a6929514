"""Pieces several methods share: the CLS-attention encoder cut (VisionDrop, VisionZip), its LLaVA-NeXT layout, the
whole token counts of the methods that keep exactly their budget, and the video methods' frame layout
(`VideoLayout`, declared by each family), their common cut before the first decoder layer (`FrameSelection`) and
their DPC-kNN clustering scores (`density_peaks`: PruneVid, FastVID, HoliTom)."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from ..engine import DecoderCut, EncoderView, Policy, Selection, complement, contextual_merge, topk_in_order
from ..core import ModelInfo
from . import Unreachable


def encoder_selection(view: EncoderView, dominant: int, contextual: int) -> Selection:
    """CLS + the top (dominant - 1) patches by head-summed importance (the CLS attention), then `contextual`
    merged tokens; on a tower without CLS, the top `dominant` tokens by the attention they receive.

    Kept order: [CLS, patches ascending]; the merged tokens come from the other tokens, on the layer's keys
    averaged over heads. Both counts are the nominal image's, scaled to the view's images (`EncoderView.scaled`;
    at least one dominant token).
    """
    dominant, contextual = max(view.scaled(dominant), 1), view.scaled(contextual)
    first = int(view.has_cls)  # CLS is always kept, and not ranked
    scores = view.importance[:, :, first:].sum(1)  # summed over heads
    if view.valid is not None:
        scores = scores.masked_fill(~view.valid[:, first:], float("-inf"))
    keep = topk_in_order(scores, dominant - first) + first
    if view.has_cls:
        keep = torch.cat([keep.new_zeros(keep.shape[0], 1), keep], dim=1)  # CLS first
    rest = complement(keep, view.hidden.shape[1])
    return Selection(keep, *contextual_merge(view.hidden, view.keys.mean(1), rest, contextual))


def newline_choice(newlines: str) -> bool:
    """The `newlines` option of the encoder-side methods on LLaVA-NeXT: True to keep them.

    "drop": the image-newline tokens and the unpadding go, as the official VisionDrop and VisionZip code do (default);
    "keep": transformers' layout for the kept patches (see `families.llava_next.arrange_anyres`).
    """
    if newlines not in ("drop", "keep"):
        raise ValueError(f"newlines must be 'drop' (official layout) or 'keep', got {newlines!r}")
    return newlines == "keep"


def whole_count(budget: float, info: ModelInfo, title: str, parts: int = 1, smallest: int = 1) -> int:
    """The tokens a method that keeps exactly its budget keeps of each of `parts` equal parts of the nominal sample
    (crops or frames that each keep their share; 1: the sample's whole visual block).

    A budget between whole counts, as a retention ratio gives (12.5% of 2,056 is 257, of a 257-token frame
    32.125), keeps the nearest whole count, and `describe()` states the tokens kept; a budget below `smallest`
    per part is refused, naming the smallest reachable budget.
    """
    if budget < smallest * parts:
        per = f" per part ({parts} crops or frames)" if parts > 1 else ""
        raise ValueError(f"{title} cannot reach budget {budget:g}: it keeps whole tokens, at least {smallest}{per}, "
                         f"so the smallest reachable budget is {smallest * parts:g} (or {info.n_visual} for the "
                         "unpruned model)")
    # a budget just below all the tokens may round up to all of them: it still prunes one
    return min(round(budget / parts), info.n_visual // parts - 1)


@dataclass(frozen=True)
class VideoLayout:
    """A decoder cut's videos as the video methods reduce them: `frames` frames of `per_frame` tokens, frame after
    frame, then `trailing` tokens that belong to no frame (the family's `Family.video_trailing`: LLaVA-OneVision's
    one newline after the whole video), which stay whole after what a method keeps or makes of the frames, as the
    official LLaVA-NeXT-based code of the video methods appends the newline after compressing the frames.

    The frames' tokens may lie in several spans separated by text (Qwen3-VL: each temporal patch after its
    timestamp): `frame_rows` are the visual tokens only, so the timestamps are never among what a method scores,
    and every kept token stays in its own frame's span (`engine.decoder`).
    """

    frames: int
    per_frame: int
    trailing: int

    @property
    def frame_tokens(self) -> int:
        """The tokens of all the frames (what a video's budget counts: `ModelInfo.n_visual`)."""
        return self.frames * self.per_frame

    def frame_rows(self, cut: DecoderCut) -> Tensor:
        """The frames' tokens [G, frames x per_frame, D] of the cut's videos, frame after frame."""
        return cut.visual_rows(cut.hidden)[:, :self.frame_tokens]

    def with_trailing(self, keep: Tensor) -> Tensor:
        """Indices [..., k] into the frames' tokens, then the trailing tokens' own [..., k + trailing]."""
        after = torch.arange(self.frame_tokens, self.frame_tokens + self.trailing, device=keep.device)
        return torch.cat([keep, after.expand(*keep.shape[:-1], self.trailing)], -1)

    def mask_with_trailing(self, keep: Tensor) -> Tensor:
        """A boolean mask [G, frames x per_frame] of kept frame tokens, the trailing tokens kept after them."""
        return torch.cat([keep, keep.new_ones(keep.shape[0], self.trailing)], -1)


def video_layout(cut: DecoderCut, title: str) -> VideoLayout:
    """The layout of a decoder cut's videos, for video methods that cut before the first layer (on the projected
    tokens, as the official video methods do); images are refused with a clear error."""
    if not cut.frames:
        raise ValueError(f"{title} reduces videos (it uses the redundancy between frames), and this batch holds an "
                         "image: run images with an image method, or method='none'")
    if cut.n_visual != cut.original_visual:
        raise RuntimeError(f"{title} needs a video's own layout of equal frames, before any other cut")
    frame_tokens = cut.n_visual - cut.trailing
    if frame_tokens % cut.frames:
        raise RuntimeError(f"{title}: {frame_tokens} frame tokens do not split into {cut.frames} equal frames")
    return VideoLayout(cut.frames, frame_tokens // cut.frames, cut.trailing)


class FrameSelection(Policy):
    """A video method that keeps, before the first decoder layer, a subset of each video's frame tokens and drops the
    rest (EVS, VidCom2, DyCoke's temporal merging): `kept` picks them from the frames' tokens of the cut's videos;
    the trailing tokens stay after them (`VideoLayout`). Positions follow the family (contiguous, or M-RoPE kept)."""

    cut_layers = (0,)
    title = "?"
    knob = "?"  # the name of the method's own setting, which a budget replaces (EVS: pruning_rate)

    def __init__(self, info: ModelInfo, setting: float):
        self.info, self.setting = info, setting

    def kept(self, frames: Tensor, layout: VideoLayout) -> Tensor:
        """The tokens kept of the frames' tokens [G, F x N, D]: a boolean mask [G, F x N], or indices [G, k] in the
        order they will appear."""
        raise NotImplementedError

    def equivalent_tokens(self) -> int | None:
        """The tokens kept of the nominal sample, where they follow from the setting alone."""
        return None

    def describe(self) -> dict:
        described = {"method": self.name, self.knob: self.setting, "layers": list(self.cut_layers)}
        tokens = self.equivalent_tokens()
        return described if tokens is None else described | {"equivalent_tokens": tokens}

    def select_decoder(self, cut: DecoderCut) -> Selection:
        layout = video_layout(cut, self.title)
        keep = self.kept(layout.frame_rows(cut), layout)
        if keep.dtype == torch.bool:
            return Selection(layout.mask_with_trailing(keep))
        return Selection(layout.with_trailing(keep))


def video_share(info: ModelInfo, budget: float | None, setting: float | None, name: str, title: str,
                smallest: float, why: str) -> float | None:
    """The share of each video's own frame tokens a video method keeps at `budget` (`retention`), or None where its
    own setting `name` is given instead; refuses neither or both, and a budget below `smallest` (`why` it is)."""
    if setting is not None:
        if budget is not None:
            raise ValueError(f"give {title} a budget (or ratio=) or {name}=, not both")
        return None
    if budget is None:
        raise ValueError(f"{title} needs a budget (or ratio=) or {name}=")
    if budget < smallest:
        raise Unreachable(f"{title} {why}: the smallest reachable budget is {smallest:g} (or {info.n_visual} for the "
                          "unpruned model)", smallest)
    return retention(budget, info)


def retention(budget: float, info: ModelInfo) -> float:
    """The share of each video's own tokens a budget keeps (a budget counts against the model's nominal sample)."""
    return budget / info.n_visual


def nominal_video(info: ModelInfo) -> tuple[int, int] | None:
    """(frames, tokens per frame) of the model's nominal sample where it is a video (Video-LLaVA: 8 x 257), else None
    (the nominal sample is an image, as on Qwen2.5-VL: a video method's count then depends on each video)."""
    return (info.crops, info.per_crop) if info.video else None


def density_peaks(x: Tensor, k: int, member: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """DPC-kNN (density peaks of k nearest neighbours) of tokens x [..., n, D] in float32, as the official
    `cluster_dpc_knn` of PruneVid, FastVID and HoliTom computes it without its tie-breaking noise: (the distances
    [..., n, n], cdist / sqrt(D); each token's score [..., n], its density exp(-mean of the squared distances to its
    k nearest, itself included) times its distance to the nearest denser token, the largest distance for the
    densest). With `member` [..., n] only members count, and the others score -inf."""
    dist = torch.cdist(x.float(), x.float()) / x.shape[-1] ** 0.5
    pair = None if member is None else member[..., :, None] & member[..., None, :]
    near = dist if pair is None else dist.masked_fill(~pair, float("inf"))
    density = (-(near.topk(min(k, x.shape[-2]), dim=-1, largest=False).values ** 2).mean(-1)).exp()
    higher = density[..., None, :] > density[..., :, None]
    farthest = (dist if pair is None else dist.masked_fill(~pair, float("-inf"))).flatten(-2).amax(-1)
    if pair is None:
        delta = torch.where(higher, dist, farthest[..., None, None])
        return dist, delta.min(-1).values * density
    delta = torch.where(higher & pair, dist, farthest[..., None, None]).masked_fill(~pair, float("inf"))
    return dist, (delta.min(-1).values * density).masked_fill(~member, float("-inf"))


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """transformers' loading reports silenced (errors only) while a method loads a checkpoint of its own (a whole
    checkpoint holds weights the method does not take: not worth a report); the caller's verbosity restored after."""
    from transformers.utils import logging

    before = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(before)
