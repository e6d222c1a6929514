"""Pieces several methods share: the CLS-attention encoder cut (VisionDrop, VisionZip), its LLaVA-NeXT layout, the
whole token counts of the methods that keep exactly their budget, and the frame layout the video methods reduce."""
from __future__ import annotations

import torch

from ..engine import DecoderCut, EncoderView, Selection, complement, contextual_merge, topk_in_order
from ..core import ModelInfo


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


def video_layout(cut: DecoderCut, title: str) -> tuple[int, int]:
    """(frames, tokens per frame) of a decoder cut's videos, for video methods that cut before the first layer (on
    the projected tokens, as the official video methods do); images are refused with a clear error."""
    if not cut.frames:
        raise ValueError(f"{title} reduces videos (it uses the redundancy between frames), and this batch holds an "
                         "image: run images with an image method, or method='none'")
    if cut.n_visual != cut.original_visual:
        raise RuntimeError(f"{title} needs a video's own layout of equal frames, before any other cut")
    if cut.n_visual % cut.frames:
        raise NotImplementedError(f"{title} does not yet handle the {cut.n_visual % cut.frames} token(s) this family "
                                  "lays out beside a video's frames (LLaVA-OneVision's newline after the video)")
    return cut.frames, cut.n_visual // cut.frames


def retention(budget: float, info: ModelInfo) -> float:
    """The share of each video's own tokens a budget keeps (a budget counts against the model's nominal sample)."""
    return budget / info.n_visual


def nominal_video(info: ModelInfo) -> tuple[int, int] | None:
    """(frames, tokens per frame) of the model's nominal sample where it is a video (Video-LLaVA: 8 x 257), else None
    (the nominal sample is an image, as on Qwen2.5-VL: a video method's count then depends on each video)."""
    return (info.crops, info.per_crop) if info.video else None
