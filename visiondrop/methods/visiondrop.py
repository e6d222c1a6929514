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
keeps 1.5x the budget on images and 3x on videos (methods.md 1(f)): `first_stage` defaults to 1.5, and to 3 on a
video model (`ModelInfo.video`: Video-LLaVA, whose budgets count 8 frames x 257 tokens, so `ratio=0.125` is 257
tokens: 84+12 a frame after the encoder stage, then the official decoder shape scaled to the budget).
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from ..engine import DecoderCut, EncoderView, Policy, Selection, complement, contextual_merge, topk_in_order
from ..engine.scoring import visual_to_visual
from ..core import Cut, Dims, ModelInfo, TokenCounts
from . import Method, Overhead
from .shared import encoder_selection, newline_choice


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
STAGES = ("both", "encoder", "decoder")
#: Tokens leaving the encoder stage as a multiple of the budget: 48 of 32 ("1.5x the final target" for images).
FIRST_STAGE = Fraction(OFFICIAL_32.encoder.total, 32)
VIDEO_FIRST_STAGE = Fraction(3)  # "3x the final target" on videos
#: The official decoder stages as shares of the first stage (35, 26, 19 of 48), and each stage's contextual share.
SHAPE = tuple(Fraction(stage.total, OFFICIAL_32.encoder.total) for _, stage in OFFICIAL_32.cuts)
CONTEXTUAL = tuple(Fraction(stage.contextual, stage.total)
                   for stage in (OFFICIAL_32.encoder, *(stage for _, stage in OFFICIAL_32.cuts)))
#: stages="decoder": the cuts of the text-guided baselines (FastV's K=2, PyramidDrop's recommended [2, 8, 16]). With
#: all the visual tokens entering the decoder, the first cut must come before layer n_layers x budget / n_visual
#: (3.6 on LLaVA-1.5 at 64 tokens) for the mean to reach the budget; these cuts reach down to 36 tokens, as they do.
DECODER_ONLY_LAYERS = (2, 8, 16)


def smallest_budget(info: ModelInfo) -> float:
    """One token per crop (a budget below rounds the encoder stage to no patch at all)."""
    return info.crops


def _split(size: Fraction, contextual_share: Fraction) -> Stage:
    """`size` tokens as (dominant, contextual); each part is rounded on its own, as the official schedule scales."""
    return Stage(round(size * (1 - contextual_share)), round(size * contextual_share))


def _later_sizes(first: Fraction, budget: Fraction, lengths: list[int]) -> list[Fraction]:
    """The stages after the first cut, sized so that the mean over the decoder layers is `budget`.

    lengths: decoder layers per segment (the first one carries `first` tokens, before rounding). The official
    shape (each later stage a fixed share of the first, 35, 26, 19 of 48) is kept where it hits the budget (the
    official first stage), scaled down by one factor where the budget needs fewer tokens, and flattened toward no
    reduction (linearly, shares 1 - t (1 - share)) where it needs more. The mean is continuous and monotone along
    that family, so the solution is unique and exact (fractions; the rounding is the caller's).
    """
    rest = (sum(lengths) * budget - lengths[0] * first) / first  # what the later segments carry, in first stages
    flat = sum(lengths[1:])  # every later stage the size of the first
    official = sum(n * share for n, share in zip(lengths[1:], SHAPE))
    if rest >= official:
        t = (flat - rest) / (flat - official)
        return [first * (1 - t * (1 - share)) for share in SHAPE]
    return [first * share * rest / official for share in SHAPE]


def schedule_for_budget(budget: float, info: ModelInfo, first_stage: float | None = None,
                        contextual_fraction: float | None = None, stages: str = "both") -> Schedule:
    """The schedule whose mean visual tokens per decoder layer is `budget` (within one token), from three knobs.

    first_stage: tokens leaving the encoder stage, as a multiple of the budget (default 1.5, the official 48 of
    32; 3 on video models); the decoder stages then follow the official shape (`_later_sizes`), so the defaults give the official
    schedule scaled by budget/32 (methods.md 1(f): 84+12, 60+10, 44+8, 32+6 at 64). contextual_fraction: the share
    of merged contextual tokens in every stage (default: the official shares, 6/48, 5/35, 4/26, 3/19). stages:
    "both" (encoder stage, then cuts before layers 8/16/24), "encoder" (the encoder stage keeps the budget, no
    decoder cut) or "decoder" (all visual tokens through the encoder, cuts before layers 2/8/16,
    `DECODER_ONLY_LAYERS`). Layers are given for 32 layers and mapped by relative depth.

    Counts are per crop: on LLaVA-NeXT the encoder stage runs on every crop with budget/crops (640/320/160 ->
    168+24, 84+12, 42+6 per crop) and the decoder cuts scale with the sample's actual crops (see `VisionDrop`).
    Raises ValueError naming the reachable range for a combination that cannot reach the budget.
    """
    if stages not in STAGES:
        raise ValueError(f"VisionDrop stages must be one of {STAGES}, got {stages!r}")
    if contextual_fraction is not None and not 0 <= contextual_fraction < 1:
        raise ValueError(f"contextual_fraction is the share of merged tokens in each stage, in [0, 1); got "
                         f"{contextual_fraction}")
    shares = CONTEXTUAL if contextual_fraction is None else (Fraction(contextual_fraction),) * len(CONTEXTUAL)
    per_crop = Fraction(budget) / info.crops
    knobs = f" with stages={stages!r}" + ("" if first_stage is None else f", first_stage={first_stage:g}")
    unpruned = f" (or {info.n_visual} for the unpruned model)"
    if per_crop < 1 and stages != "decoder":  # below, stages of a few tokens per crop round away from the budget
        # (to none on video); without an encoder stage the first decoder segment bounds the budget (below)
        raise ValueError(f"VisionDrop cannot reach budget {budget}: it keeps at least one token per crop "
                         f"({info.crops} per image), so the smallest reachable budget is {smallest_budget(info):g}"
                         f"{unpruned}")
    if stages == "decoder":
        if first_stage is not None:
            raise ValueError("stages='decoder' keeps all the visual tokens through the encoder: first_stage does "
                             "not apply (leave it unset)")
        encoder, first, layers = None, Fraction(info.per_crop), DECODER_ONLY_LAYERS
    else:
        default = (VIDEO_FIRST_STAGE if info.video else FIRST_STAGE) if stages == "both" else Fraction(1)
        multiple = default if first_stage is None else Fraction(first_stage)
        if stages == "encoder" and multiple != 1:
            raise ValueError("stages='encoder' makes no decoder cut, so the encoder stage keeps the budget itself: "
                             f"first_stage is 1 there (leave it unset), got {first_stage}")
        first, capacity = multiple * per_crop, info.per_crop + (not info.cls_kept)  # the layer's patches and CLS
        encoder = _split(first, shares[0])
        if encoder.dominant < 1 or encoder.total > capacity:
            highest = capacity * info.crops / multiple
            raise ValueError(f"VisionDrop cannot reach budget {budget}{knobs}: budgets between "
                             f"{smallest_budget(info):g} and {int(highest)} average visual tokens are reachable"
                             f"{unpruned}")
        if stages == "encoder":
            return Schedule(encoder, ())
        layers = tuple(layer for layer, _ in OFFICIAL_32.cuts)
    layers = info.relative_layers(list(layers), "VisionDrop decoder cuts")
    bounds = (0, *layers, info.n_layers)
    lengths = [end - begin for begin, end in zip(bounds, bounds[1:])]
    # the first segment alone must stay under the budget, and the cuts can only remove tokens
    if not lengths[0] * first < info.n_layers * per_crop <= info.n_layers * first:
        if stages == "decoder":
            raise ValueError(f"VisionDrop cannot reach budget {budget}{knobs}: all {info.n_visual} visual tokens "
                             f"enter the {lengths[0]} decoder layers before the first cut (layer {layers[0]}), so "
                             f"budgets above {lengths[0] * info.n_visual / info.n_layers:g} are reachable{unpruned}")
        raise ValueError(f"VisionDrop cannot reach budget {budget}{knobs}: first_stage must be at least 1 (a cut "
                         f"never adds tokens) and below {info.n_layers / lengths[0]:g} (the {lengths[0]} decoder "
                         f"layers before the first cut, of {info.n_layers}, carry first_stage x budget)")
    sizes = _later_sizes(first, per_crop, lengths)
    return Schedule(encoder, tuple((layer, _split(size, share))
                                   for layer, size, share in zip(layers, sizes, shares[1:])))


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
        keep = topk_in_order(visual_to_visual(cut, cut.layer_idx, keys=keys), dominant)
        rest = complement(keep, cut.n_visual)
        metric = cut.visual_rows(keys.mean(1))
        return Selection(keep, *contextual_merge(cut.visual_rows(cut.hidden), metric, rest, contextual))

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
           first_stage: float | None = None, contextual_fraction: float | None = None, stages: str = "both",
           newlines: str = "drop") -> Policy:
    """VisionDrop from a budget (average visual tokens per decoder layer) and the schedule's knobs
    (`schedule_for_budget`: first_stage, contextual_fraction, stages), or from an explicit schedule.

    newlines (LLaVA-NeXT): "drop" the image-newline tokens and the unpadding, as the official code (default), or
    "keep" transformers' layout for the kept patches (`methods.shared.newline_choice`).
    """
    if (budget is None) == (schedule is None):
        raise ValueError("VisionDrop needs exactly one of budget= or schedule=")
    if schedule is not None:
        if (first_stage, contextual_fraction, stages) != (None, None, "both"):
            raise ValueError("an explicit schedule= fixes every count: first_stage, contextual_fraction and stages "
                             "shape a schedule from a budget only")
        chosen = Schedule.parse(schedule)
    else:
        chosen = schedule_for_budget(budget, info, first_stage, contextual_fraction, stages)
    dropper = VisionDrop(chosen, info)
    dropper.native_layout = newline_choice(newlines)
    return dropper


def nominal_counts(dims: Dims, budget: float) -> TokenCounts:
    """The FLOPs count's schedule on a multi-crop model (LLaVA-NeXT) at its nominal crops, per methods.md 1(f), the
    comparison the paper's numbers ask for: a per-crop encoder stage of the budget/crops schedule, then decoder
    segments of n0 x (35, 26, 19)/48 tokens (the ratio version of the official schedule)."""

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
                overhead=lambda **_: Overhead(rows="visual", merges=True),
                scoring=lambda **_: {"encoder": "vision_tower", "decoder": "visual"}, replaces_budget=("schedule",),
                nominal_counts=nominal_counts, second_example=(128, {"stages": "decoder"}))
