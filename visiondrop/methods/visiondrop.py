"""VisionDrop's policy: visual-to-visual attention scores, progressive cuts, light contextual merging.

As the official code (github.com/Ruixxxx/VisionDrop f7a9444) does it:
- encoder stage on the vision layer LLaVA projects (CLIP layer 22): CLS is always kept, plus the patches with the
  highest head-summed CLS attention; the rest is merged into contextual tokens on that layer's head-averaged keys;
- decoder cuts before layers 8, 16, 24 (mapped to other depths by relative depth, `ModelInfo.relative_layers`:
  1, 2, 3 on a 4-layer decoder): each visual token is scored by the
  attention it receives from the visual tokens (visual queries, causal mask, mean over heads and over query
  rows, masked zeros included), using the next layer's own norm and q/k projections; the top tokens stay in
  order and the rest are merged on that layer's head-averaged post-RoPE keys; positions are renumbered.

The paper's "second stage" (the tokens leaving the encoder stage, which the first decoder segment processes)
keeps 1.5x the budget on images and 3x on videos (methods.md 1(f)). On images that is the official schedule,
scaled by budget/32. On a video model (`ModelInfo.video`: Video-LLaVA, whose budgets count 8 frames x 257 tokens,
so `ratio=0.125` is 257 tokens) 3x is the default: per frame the encoder stage keeps 3 x budget/frames tokens
(contextual share 6/48, as official) and the decoder segments decay geometrically by the factor that brings the
mean over the decoder layers back to the budget (contextual shares 5/35, 4/26, 3/19, as official; 1.5x gives
r = 0.734, the official schedule to within a token). Option `second_stage` sets the factor either way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..engine import DecoderCut, EncoderView, Policy, Selection, complement, contextual_merge, topk_in_order
from ..families import ModelInfo
from . import Method, Overhead
from .shared import encoder_selection, newline_choice

if TYPE_CHECKING:
    from ..efficiency.flops import Dims, TokenCounts


@dataclass(frozen=True)
class Stage:
    dominant: int
    contextual: int

    @property
    def total(self) -> int:
        return self.dominant + self.contextual


@dataclass(frozen=True)
class Schedule:
    """encoder: (dominant incl. CLS, contextual) per image, or None; cuts: (decoder layer, stage) pairs."""

    encoder: Stage | None
    cuts: tuple[tuple[int, Stage], ...]

    @classmethod
    def parse(cls, spec: dict) -> "Schedule":
        """From {"encoder": [42, 6], "layers": [8, 16, 24], "decoder": [[30, 5], [22, 4], [16, 3]]}."""
        try:
            encoder = Stage(*spec["encoder"]) if spec.get("encoder") else None
            layers, stages = list(spec.get("layers", [])), [Stage(*s) for s in spec.get("decoder", [])]
        except (TypeError, KeyError) as err:
            raise ValueError(f"malformed VisionDrop schedule {spec!r}: {err}") from None
        if len(layers) != len(stages) or layers != sorted(set(layers)):
            raise ValueError(f"schedule needs one [dominant, contextual] pair per increasing layer: {spec!r}")
        return cls(encoder, tuple(zip(layers, stages)))


# The official 32-token setting on LLaVA-1.5-7B (README and eval scripts): 48/35/26/19 tokens per 8-layer segment.
OFFICIAL_32 = Schedule(Stage(42, 6), ((8, Stage(30, 5)), (16, Stage(22, 4)), (24, Stage(16, 3))))


#: the tokens leaving the encoder stage as a multiple of the budget: the official images' setting, and videos'
IMAGE_SECOND_STAGE, VIDEO_SECOND_STAGE = 1.5, 3.0


def default_second_stage(info: ModelInfo) -> float:
    return VIDEO_SECOND_STAGE if info.video else IMAGE_SECOND_STAGE


def smallest_budget(info: ModelInfo) -> float:
    """One token per crop (a budget below rounds the encoder stage to no patch at all)."""
    return info.crops


def schedule_for_budget(budget: float, info: ModelInfo, second_stage: float | None = None) -> Schedule:
    """The official 32-token schedule scaled by budget/32 (exact for 64/128/192 on LLaVA-1.5, methods.md 1(f)), or,
    for another `second_stage` factor (default: `default_second_stage`, 3 on videos), its geometric form.

    Counts are per crop: on LLaVA-NeXT the encoder stage runs on every crop with budget/crops (640/320/160 ->
    168+24, 84+12, 42+6 per crop), on Video-LLaVA on every frame; the decoder cuts scale with the sample's actual
    crops (see `VisionDrop`). The first decoder segment carries `second_stage` x the budget, so budgets above
    1/second_stage of the visual tokens are out of reach.
    """
    factor = default_second_stage(info) if second_stage is None else second_stage
    layers = info.relative_layers([layer for layer, _ in OFFICIAL_32.cuts], "VisionDrop decoder cuts")
    if factor == IMAGE_SECOND_STAGE:  # the official schedule itself
        scale = budget / info.crops / 32
        encoder = Stage(round(OFFICIAL_32.encoder.dominant * scale), round(OFFICIAL_32.encoder.contextual * scale))
        cuts = tuple((layer, Stage(round(s.dominant * scale), round(s.contextual * scale)))
                     for layer, (_, s) in zip(layers, OFFICIAL_32.cuts))
    else:
        encoder, cuts = _geometric(budget / info.crops, factor, layers, info.n_layers)
    if encoder.dominant < 1 or encoder.total > info.per_crop + (not info.cls_kept):
        raise ValueError(f"VisionDrop cannot reach budget {budget}: with its second stage at {factor:g}x the budget, "
                         f"budgets between {smallest_budget(info):g} and {int(info.n_visual / factor)} average visual "
                         f"tokens are reachable (or {info.n_visual} for the unpruned model)")
    return Schedule(encoder, cuts)


def _geometric(per_crop: float, factor: float, layers: tuple[int, ...], n_layers: int,
               ) -> tuple[Stage, tuple[tuple[int, Stage], ...]]:
    """Per crop: the encoder stage keeps factor x `per_crop` tokens, segment s keeps r**s of them, r solved so that
    the mean over the decoder layers is `per_crop`; each stage split as the official one."""
    if factor < 1:
        raise ValueError(f"VisionDrop's second_stage must be at least 1 (x the budget), got {factor:g}")
    n0, bounds = factor * per_crop, (0, *layers, n_layers)
    lengths = [end - begin for begin, end in zip(bounds, bounds[1:])]
    mean = lambda r: sum(n * n0 * r**s for s, n in enumerate(lengths)) / n_layers  # noqa: E731
    if mean(0.0) > per_crop:
        raise ValueError(f"VisionDrop's second_stage {factor:g} x the budget in the first {lengths[0]} of "
                         f"{n_layers} decoder layers already exceeds the budget: at most {n_layers / lengths[0]:g}")
    low, high = 0.0, 1.0
    for _ in range(60):  # the mean increases with r
        mid = (low + high) / 2
        low, high = (mid, high) if mean(mid) < per_crop else (low, mid)

    def split(n: float, official: Stage) -> Stage:
        return Stage(max(1, round(n * official.dominant / official.total)), round(n * official.contextual / official.total))

    encoder = split(n0, OFFICIAL_32.encoder)
    return encoder, tuple((layer, split(n0 * low ** (s + 1), official))
                          for s, (layer, (_, official)) in enumerate(zip(layers, OFFICIAL_32.cuts)))


class VisionDrop(Policy):
    name = "visiondrop"

    def __init__(self, schedule: Schedule, info: ModelInfo, second_stage: float | None = None):
        self.schedule, self.info, self.second_stage = schedule, info, second_stage
        self.encoder_layer = info.vision_layer if schedule.encoder else None
        self.cut_layers = tuple(layer for layer, _ in schedule.cuts)
        self._stages = dict(schedule.cuts)
        # Decoder counts are given for one reference unit of decoder input: one crop's encoder output, or one
        # crop's patches without an encoder stage. A sample with more (NeXT grids) scales them: methods.md 1(f).
        self._unit = schedule.encoder.total if schedule.encoder else info.per_crop

    def select_encoder(self, view: EncoderView) -> Selection:
        return encoder_selection(view, self.schedule.encoder.dominant, self.schedule.encoder.contextual)

    def select_decoder(self, cut: DecoderCut) -> Selection:
        stage = self._stages[cut.layer_idx]
        dominant, contextual = cut.scaled(stage.dominant, self._unit), cut.scaled(stage.contextual, self._unit)
        keys = cut.keys(cut.layer_idx)
        probs = cut.attention(cut.layer_idx, cut.visual, keys=keys).mean(1)  # [G, n_queries, L]
        scores = probs.gather(2, cut.visual.unsqueeze(1).expand(-1, cut.n_visual, -1)).mean(1)  # [G, n]
        keep = topk_in_order(scores, dominant)
        rest = complement(keep, cut.n_visual)
        metric = cut.visual_rows(keys.mean(1))
        return Selection(keep, contextual_merge(cut.visual_rows(cut.hidden), metric, rest, contextual))

    def describe(self) -> dict:
        s = self.schedule
        counts, n = [], self._unit
        for layer in range(self.info.n_layers):
            n = self._stages[layer].total if layer in self._stages else n
            counts.append(n * self.info.crops)  # nominal: every crop of the largest grid
        return {"method": self.name, "encoder": None if s.encoder is None else [s.encoder.dominant, s.encoder.contextual],
                "layers": list(self.cut_layers), "decoder": [[st.dominant, st.contextual] for _, st in s.cuts],
                **({} if self.second_stage is None else {"second_stage": self.second_stage}),
                "equivalent_tokens": sum(counts) / len(counts)}


def policy(info: ModelInfo, budget: float | None = None, schedule: dict | None = None,
           newlines: str = "drop", second_stage: float | None = None) -> Policy:
    """VisionDrop from a budget (average visual tokens per decoder layer) or an explicit schedule.

    newlines (LLaVA-NeXT): "drop" the image-newline tokens and the unpadding, as the official code (default), or
    "keep" transformers' layout for the kept patches (`methods.shared.newline_choice`).
    second_stage: the tokens leaving the encoder stage as a multiple of the budget; default 1.5 (the official
    schedule), 3 on video models (see the module docstring).
    """
    if (budget is None) == (schedule is None):
        raise ValueError("VisionDrop needs exactly one of budget= or schedule=")
    if schedule is not None and second_stage is not None:
        raise ValueError("VisionDrop's second_stage shapes the schedule of a budget: give it or schedule=, not both")
    if schedule is not None:
        dropper = VisionDrop(Schedule.parse(schedule), info)
    else:
        factor = default_second_stage(info) if second_stage is None else second_stage
        dropper = VisionDrop(schedule_for_budget(budget, info, factor), info,
                             None if factor == IMAGE_SECOND_STAGE else factor)
    dropper.native_layout = newline_choice(newlines)
    return dropper


def nominal_counts(dims: Dims, budget: float) -> TokenCounts:
    """The FLOPs count's schedule on a multi-crop model (LLaVA-NeXT) at its nominal crops, per methods.md 1(f), the
    comparison the paper's numbers ask for: a per-crop encoder stage of the budget/crops schedule, then decoder
    segments of n0 x (35, 26, 19)/48 tokens (the ratio version of the official schedule)."""
    from ..efficiency.flops import Cut, TokenCounts

    info = ModelInfo(n_visual=dims.visual_per_crop, n_layers=dims.n_layers, vision_layer=dims.vision_layers - 2,
                     cls_kept=dims.visual_per_crop == dims.vision_tokens)  # one crop, LLaVA's layer -2
    try:
        enc = schedule_for_budget(budget / dims.crops, info).encoder
    except ValueError as err:
        raise ValueError(f"VisionDrop on {dims.crops} crops needs a per-crop budget it can reach: {err}") from None
    n0 = enc.total * dims.crops
    cuts = [Cut(None, dims.vision_tokens, enc.dominant, enc.contextual)] * dims.crops
    counts, n, first = [], n0, OFFICIAL_32.encoder.total
    layers = info.relative_layers([layer for layer, _ in OFFICIAL_32.cuts], "VisionDrop decoder cuts")
    stages = dict(zip(layers, (stage for _, stage in OFFICIAL_32.cuts)))
    for layer in range(dims.n_layers):
        if layer in stages:  # contextual share as in the official 32-token schedule
            after = round(n0 * stages[layer].total / first)
            merged = round(after * stages[layer].contextual / stages[layer].total)
            cuts.append(Cut(layer, n, after - merged, merged))
            n = after
        counts.append(n)
    return TokenCounts(tuple(counts), n0, tuple(cuts), dims.crops)


METHOD = Method("visiondrop", "VisionDrop", policy, smallest_budget,
                overhead=lambda **_: Overhead(rows="visual", merges=True), replaces_budget=("schedule",),
                nominal_counts=nominal_counts)
