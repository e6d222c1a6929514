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

import torch

from .engine import DecoderCut, EncoderView, Policy, Selection, complement, contextual_merge, topk_in_order
from .models import ModelInfo


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
        raise ValueError(f"VisionDrop cannot reach budget {budget}: budgets between 1 and {max_budget} average "
                         f"visual tokens are reachable (or {info.n_visual} for the unpruned model)")
    layers = info.relative_layers([layer for layer, _ in OFFICIAL_32.cuts], "VisionDrop decoder cuts")
    cuts = tuple((layer, Stage(round(s.dominant * scale), round(s.contextual * scale)))
                 for layer, (_, s) in zip(layers, OFFICIAL_32.cuts))
    return Schedule(encoder, cuts)


def encoder_selection(view: EncoderView, dominant: int, contextual: int) -> Selection:
    """CLS + the top (dominant - 1) patches by head-summed CLS attention, then `contextual` merged tokens.

    The encoder stage shared by VisionZip and VisionDrop. Kept order: [CLS, patches ascending]; the merged tokens
    come from the other tokens, on the layer's keys averaged over heads.
    """
    scores = view.cls_attention[:, :, 1:].sum(1)  # CLS query over the patch keys, summed over heads
    if view.valid is not None:
        scores = scores.masked_fill(~view.valid[:, 1:], float("-inf"))
    patches = topk_in_order(scores, dominant - 1) + 1
    keep = torch.cat([patches.new_zeros(patches.shape[0], 1), patches], dim=1)  # CLS first
    rest = complement(keep, view.hidden.shape[1])
    return Selection(keep, contextual_merge(view.hidden, view.keys.mean(1), rest, contextual))


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
