"""VisionZip's policy: keep the tokens CLS attends to most in one vision layer, merge the rest, leave the LLM alone.

As the official code (github.com/dvlab-research/VisionZip 3151f6d, `visionzip(model, dominant, contextual)`) does
it on LLaVA-1.5:
- one cut, on the vision layer LLaVA projects (CLIP layer 22, `hidden_states[-2]`); no decoder cut, so every
  decoder layer sees the same D + C visual tokens and the budget ("# Tokens") is simply D + C;
- dominant tokens: CLS always, plus the D - 1 patches with the highest CLS-row attention of that layer, summed over
  heads (`dominant` counts CLS); they enter the LLM as [CLS, patches in raster order];
- contextual tokens: the remaining tokens are merged into C tokens on that layer's head-averaged keys
  (`engine.select.contextual_merge`: uniform-stride anchors, argmax cosine assignment, anchor + mean of members)
  and appended after the dominant ones;
- CLS is projected and kept even though llava-hf's "default" feature strategy drops it (the official code keeps it).
The selection depends on the image only: the same image gives the same tokens for every question.

Budgets (methods.md 5(f)): 192 -> 162+30, 128 -> 108+20, 64 -> 54+10 (the official LLaVA-1.5 splits), 32 -> 27+5;
any other budget T (the nearest whole count, `split_budget`) splits the same way, dominant = round(T * 54/64),
contextual = T - dominant.

Options (keywords of `visiondrop.apply` beside `budget`):
- `dominant`, `contextual`: an explicit split, as the official `visionzip(model, dominant=54, contextual=10)` call.
  They replace the budget's split; `budget` may be left out, and must equal their sum if given. The official
  function's own defaults (191 + 30) are not a paper setting and are not used.
Quirks of the official code that do not arise here: it needs every CLIP layer's attention maps (`output_attentions`,
eager attention) where the engine recomputes layer 22's CLS row alone; its list-of-images path silently skips
compression.
On LLaVA-NeXT the split runs on every crop (`split_budget`), crops laid out as the official code does
(`families.llava_next.arrange_anyres`, option `newlines`).
"""
from __future__ import annotations

from visiondrop.engine import EncoderView, Policy, Selection
from visiondrop.methods import Method, Overhead
from visiondrop.methods.shared import encoder_selection, newline_choice, whole_count
from visiondrop.core import ModelInfo

#: The official LLaVA-1.5 splits keep 54 of every 64 tokens as dominant (54+10, 108+20, 162+30).
DOMINANT_SHARE = 54 / 64
MIN_BUDGET = 2  # CLS plus one patch


def smallest_budget(info: ModelInfo) -> float:
    return MIN_BUDGET * info.crops


def split_budget(budget: float, info: ModelInfo) -> tuple[int, int]:
    """(dominant incl. CLS, contextual) per crop: no decoder cut, so the budget is the token count itself.

    LLaVA-NeXT runs the split on every crop with budget / crops (640/320/160 -> 108+20, 54+10, 27+5 per crop),
    Video-LLaVA on every frame; a budget between whole per-crop counts (a retention ratio: 12.5% of 8 x 257 is
    32.125 a frame) takes the nearest one (`methods.shared.whole_count`), and `describe()` states the tokens kept.
    """
    per_crop = whole_count(budget, info, "VisionZip", parts=info.crops, smallest=MIN_BUDGET)
    dominant = round(per_crop * DOMINANT_SHARE)
    return dominant, per_crop - dominant


class VisionZip(Policy):
    name = "visionzip"

    def __init__(self, dominant: int, contextual: int, info: ModelInfo):
        # The merged tokens must fit the image's placeholder slots (576 on llava-hf 1.5, which drops CLS).
        if dominant < 1 or contextual < 0 or dominant + contextual > info.per_crop:
            raise ValueError(f"VisionZip needs dominant >= 1 (CLS included), contextual >= 0 and dominant + "
                             f"contextual <= {info.per_crop}; got dominant={dominant}, contextual={contextual}")
        self.dominant, self.contextual, self.crops = dominant, contextual, info.crops
        self.encoder_layer = info.vision_layer

    def select_encoder(self, view: EncoderView) -> Selection:
        return encoder_selection(view, self.dominant, self.contextual)

    def describe(self) -> dict:
        return {"method": self.name, "encoder_layer": self.encoder_layer, "dominant": self.dominant,
                "contextual": self.contextual,
                "equivalent_tokens": (self.dominant + self.contextual) * self.crops}  # NeXT: nominal crops


def policy(info: ModelInfo, budget: float | None = None, dominant: int | None = None,
           contextual: int | None = None, newlines: str = "drop") -> Policy:
    """VisionZip from a budget (average visual tokens per decoder layer) or an explicit dominant/contextual split.

    newlines (LLaVA-NeXT): "drop" (official layout) or "keep" (`methods.shared.newline_choice`).
    """
    native_layout = newline_choice(newlines)
    if dominant is None and contextual is None:
        if budget is None:
            raise ValueError("VisionZip needs budget= or dominant= and contextual=")
        dominant, contextual = split_budget(budget, info)
    elif dominant is None or contextual is None:
        raise ValueError("VisionZip needs both dominant= and contextual= (or budget= alone)")
    elif budget is not None and budget != (dominant + contextual) * info.crops:
        raise ValueError(f"budget={budget} disagrees with (dominant + contextual) x crops = "
                         f"{(dominant + contextual) * info.crops}")
    zipper = VisionZip(dominant, contextual, info)
    zipper.native_layout = native_layout
    return zipper


METHOD = Method("visionzip", "VisionZip", policy, smallest_budget, replaces_budget=("dominant", "contextual"),
                overhead=lambda **_: Overhead(merges=True), scoring=lambda **_: {"encoder": "vision_tower"},
                second_example=(128, {"newlines": "keep"}))
