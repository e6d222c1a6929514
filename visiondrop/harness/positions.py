"""Positional-bias maps: where in the image the kept visual tokens come from, per cut, over a run's samples.

For each cut of a method's trace (each encoder and decoder cut) a map counts, per patch-grid cell
(LLaVA-1.5: one 24x24 crop; LLaVA-NeXT: the base crop and each grid crop), how often the cell's token was kept
and how often it was there to keep; their quotient is the keep frequency drawn in the heatmaps. The family says
which cell each original visual index is (`Family.patch_cells`), so nothing here knows a layout.

One number per map, the vertical bias: the mean row of the kept tokens (0 = top) divided by its expectation had
each sample kept as many tokens uniformly at random among its patches. 1.0 is no vertical bias, above 1 bottom-heavy
(2.0 on a square grid: every kept token in the bottom row), below 1 top-heavy. Rows are rows of each crop's own grid.

Videos (Video-LLaVA): a video's frames are its crops, so a video run has one map per frame in time order; its
vertical bias pools the rows of every frame, and the per-frame maps show the temporal side (whether cuts keep the
later frames, nearer the text). One run's maps hold one modality: an image and a video frame are different
things to pool, so a run mixing them is refused (evaluate images and videos as separate tasks).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from torch import Tensor


@dataclass
class KeptMap:
    """One cut's counts over the samples seen: kept and present are [crops, side, side]."""

    kept: np.ndarray
    present: np.ndarray
    samples: int = 0
    kept_tokens: int = 0
    kept_row_sum: float = 0.0
    uniform_row_sum: float = 0.0  # sum over samples of (tokens kept) x (mean row of the sample's patches)

    @classmethod
    def empty(cls, grid: tuple[int, int]) -> "KeptMap":
        crops, side = grid
        return cls(np.zeros((crops, side, side), np.int64), np.zeros((crops, side, side), np.int64))

    def add(self, present: np.ndarray, mean_row: float, kept_cells: np.ndarray) -> None:
        """One sample: its present-cell counts, the mean row of its patches, and the (crop, row, col) it kept."""
        self.present += present
        np.add.at(self.kept, tuple(kept_cells.T), 1)
        self.samples += 1
        self.kept_tokens += len(kept_cells)
        self.kept_row_sum += float(kept_cells[:, 1].sum())
        self.uniform_row_sum += len(kept_cells) * mean_row

    @property
    def frequency(self) -> np.ndarray:
        """Per cell, the share of the samples having it that kept it (NaN where no sample had it)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.present > 0, self.kept / np.maximum(self.present, 1), np.nan)

    @property
    def bias(self) -> float:
        """Mean kept row / its value under uniform selection (NaN when nothing was kept)."""
        return self.kept_row_sum / self.uniform_row_sum if self.uniform_row_sum > 0 else float("nan")

    def to_dict(self) -> dict:
        return {"kept": self.kept.tolist(), "present": self.present.tolist(), "samples": self.samples,
                "kept_tokens": self.kept_tokens, "kept_row_sum": self.kept_row_sum,
                "uniform_row_sum": self.uniform_row_sum, "bias": self.bias}

    @classmethod
    def from_dict(cls, data: dict) -> "KeptMap":
        return cls(np.asarray(data["kept"], np.int64), np.asarray(data["present"], np.int64), data["samples"],
                   data["kept_tokens"], data["kept_row_sum"], data["uniform_row_sum"])


@dataclass
class PositionMaps:
    """The maps of one run, one per cut name in the order the cuts first appeared."""

    grid: tuple[int, int]  # (crops, side) of the model's patch grids (a video's: frames, side)
    cuts: dict[str, KeptMap] = field(default_factory=dict)
    modality: str | None = None  # of the samples added ("image", "video"); None before the first

    def add_sample(self, cells: Tensor, cuts: list[str], kept: list[Tensor], modality: str = "image") -> None:
        """One sample's trace: `kept[i]` the original visual indices kept at cut `cuts[i]`, `cells` the family's
        (crop, row, col) of each original index of its image or video (`Family.patch_cells`)."""
        if self.modality not in (None, modality):
            raise ValueError(f"positional-bias maps of {self.modality}s cannot take a {modality}: one run's maps "
                             "hold one modality (evaluate images and videos as separate tasks)")
        self.modality = modality
        cells = cells.cpu().numpy()
        patches = cells[cells[:, 0] >= 0]
        present = np.zeros((self.grid[0], self.grid[1], self.grid[1]), np.int64)
        np.add.at(present, tuple(patches.T), 1)
        mean_row = float(patches[:, 1].mean())
        for name, indices in zip(cuts, kept):
            indices = indices.cpu().numpy()
            if indices.size and indices.max() >= len(cells):
                raise ValueError(f"cut {name!r} kept original index {indices.max()}, but the image has "
                                 f"{len(cells)} visual tokens: the cells do not belong to this sample")
            chosen = cells[indices]
            self.cuts.setdefault(name, KeptMap.empty(self.grid)).add(present, mean_row, chosen[chosen[:, 0] >= 0])

    def to_dict(self) -> dict:
        return {"grid": list(self.grid), "modality": self.modality,
                "cuts": {name: m.to_dict() for name, m in self.cuts.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> "PositionMaps":
        cuts = {name: KeptMap.from_dict(m) for name, m in data["cuts"].items()}
        return cls(tuple(data["grid"]), cuts, data.get("modality", "image" if cuts else None))  # older: images

    def bias(self) -> dict[str, float]:
        return {name: m.bias for name, m in self.cuts.items()}
