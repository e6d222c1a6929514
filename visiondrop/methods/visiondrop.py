"""VisionDrop's policy: visual-to-visual attention scores, progressive cuts, light contextual merging.

As the official code (github.com/Ruixxxx/VisionDrop f7a9444) does it:
- encoder stage on the vision layer LLaVA projects (CLIP layer 22): CLS is always kept, plus the patches with the
  highest head-summed CLS attention; the rest is merged into contextual tokens on that layer's head-averaged keys;
- decoder cuts before layers 8, 16, 24 (mapped to other depths by relative depth, `ModelInfo.relative_layers`:
  1, 2, 3 on a 4-layer decoder): each visual token is scored by the
  attention it receives from the visual tokens (visual queries, causal mask, mean over heads and over query
  rows, masked zeros included), using the next layer's own norm and q/k projections; the top tokens stay in
  order and the rest are merged on that layer's head-averaged post-RoPE keys; positions are renumbered.
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


def smallest_budget(info: ModelInfo) -> float:
    """One token per crop (a budget below rounds the encoder stage to no patch at all)."""
    return info.crops


def schedule_for_budget(budget: float, info: ModelInfo) -> Schedule:
    """The official 32-token schedule scaled by budget/32 (exact for 64/128/192 on LLaVA-1.5, methods.md 1(f)).

    Counts are per crop: on LLaVA-NeXT the encoder stage runs on every crop with budget/crops (640/320/160 ->
    168+24, 84+12, 42+6 per crop) and the decoder cuts scale with the sample's actual crops (see `VisionDrop`).
    The first decoder segment carries 1.5x the budget, so budgets above 2/3 of the visual tokens are out of reach.
    """
    scale = budget / info.crops / 32
    encoder = Stage(round(OFFICIAL_32.encoder.dominant * scale), round(OFFICIAL_32.encoder.contextual * scale))
    max_budget = int(info.n_visual * 32 / OFFICIAL_32.encoder.total)
    if encoder.dominant < 1 or encoder.total > info.per_crop + (not info.cls_kept):
        raise ValueError(f"VisionDrop cannot reach budget {budget}: budgets between {smallest_budget(info):g} and "
                         f"{max_budget} average visual tokens are reachable (or {info.n_visual} for the unpruned "
                         "model)")
    layers = info.relative_layers([layer for layer, _ in OFFICIAL_32.cuts], "VisionDrop decoder cuts")
    cuts = tuple((layer, Stage(round(s.dominant * scale), round(s.contextual * scale)))
                 for layer, (_, s) in zip(layers, OFFICIAL_32.cuts))
    return Schedule(encoder, cuts)


class VisionDrop(Policy):
    name = "visiondrop"

    def __init__(self, schedule: Schedule, info: ModelInfo):
        self.schedule, self.info = schedule, info
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
                "equivalent_tokens": sum(counts) / len(counts)}


def policy(info: ModelInfo, budget: float | None = None, schedule: dict | None = None,
           newlines: str = "drop") -> Policy:
    """VisionDrop from a budget (average visual tokens per decoder layer) or an explicit schedule.

    newlines (LLaVA-NeXT): "drop" the image-newline tokens and the unpadding, as the official code (default), or
    "keep" transformers' layout for the kept patches (`methods.shared.newline_choice`).
    """
    if (budget is None) == (schedule is None):
        raise ValueError("VisionDrop needs exactly one of budget= or schedule=")
    dropper = VisionDrop(Schedule.parse(schedule) if schedule is not None else schedule_for_budget(budget, info), info)
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
