"""The positional-bias experiment's figure and table, from the maps stored beside a run's records.

    python scripts/position_bias.py --model llava-1.5-7b --benchmark POPE --out results --name position_bias

The paper's claim (causal misalignment): after a shallow decoder cut, text-guided methods keep tokens that cluster at
the bottom of the image (the end of the visual sequence, closest to the text), whatever the content; visual-only
scoring does not. Each row of the table is one cut of one method with what scores it and its vertical bias (mean
kept row / its value under uniform selection: 1.0 none, above 1 bottom-heavy), beside the paper's expectation.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from .positions import PositionMaps
from .store import positions_path
from ..methods import method_title

log = logging.getLogger(__name__)

#: the paper's expectation of the vertical bias, by the kind of scoring (the first word of its label)
CLAIM = {"text-guided": "bottom-heavy (> 1) after a shallow cut", "visual-only": "no vertical bias (about 1)",
         "none": "no vertical bias (1 in expectation)"}


def scoring(method: str, options: dict, cut: str) -> str:
    """What decides the tokens kept at `cut` of `method`, as the method states it (`Method.scoring`)."""
    from ..engine.scoring import RULES
    from ..methods import METHODS, method as registered

    if method not in METHODS:
        return "unknown (method no longer registered)"
    rule = registered(method).scoring(**(options or {})).get("encoder" if cut == "encoder" else "decoder")
    return RULES.get(rule, "unknown")


def claim(kind: str) -> str:
    """The paper's claim for a scoring label; it makes none for other rules (diversity, duplication)."""
    return CLAIM.get(kind.split(" (")[0], "none made")


def collect(records: list[dict], model: str, benchmark: str) -> list[tuple[dict, PositionMaps]]:
    """The full (else the newest partial) record of each (method, options, budget) on `benchmark` that has maps,
    with its maps, in the registry's method order then budget descending."""
    found = {}
    for record in sorted(records, key=lambda r: (not r.get("partial"), r.get("created") or "")):
        path = positions_path(record["path"])
        if record.get("model") != model or record.get("benchmark") != benchmark or not path.exists():
            continue
        maps = read_maps(path)
        if maps is None:
            continue
        key = (record["method"], json.dumps(record.get("options"), sort_keys=True), record.get("budget"))
        found[key] = (record, maps)
    if not found:
        raise ValueError(f"no records of {model} on {benchmark} with positional-bias maps: run the experiment "
                         "first (scripts/run.py experiment=position_bias ...)")
    from ..methods import METHODS

    order = list(METHODS)
    return sorted((entry for entry in found.values() if entry[1].cuts),
                  key=lambda e: (order.index(e[0]["method"]) if e[0]["method"] in order else len(order),
                                 -(e[0].get("budget") or 0)))


def read_maps(path: Path) -> PositionMaps | None:
    """The maps stored at `path`; None, with a warning naming the file, if they are not readable (a truncated or
    invalid JSON file, as a full disk or a killed copy leaves it, or one without the maps' fields)."""
    try:
        return PositionMaps.from_dict(json.loads(path.read_text()))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:  # JSON errors too
        log.warning("%s: not readable positional-bias maps, ignored (%s: %s); the report leaves this run out",
                    path, type(err).__name__, err)
        return None


def _label(record: dict) -> str:
    budget = record.get("budget")
    return f"{method_title(record['method'])} @ {budget:g}" + (" (partial)" if record.get("partial") else "") \
        if budget is not None else method_title(record["method"])


def bias_table(entries: list[tuple[dict, PositionMaps]]) -> pd.DataFrame:
    """One row per (method, cut): its scoring, the kept tokens per sample, the bias and the paper's expectation."""
    rows = []
    for record, maps in entries:
        for cut, kept in maps.cuts.items():
            kind = scoring(record["method"], record.get("options"), cut)
            budget = record.get("budget")
            rows.append({"Method": method_title(record["method"]), "# Tokens": "full" if budget is None else
                         f"{budget:g}", "cut": cut,
                         "scoring": kind, "kept per sample": kept.kept_tokens / max(kept.samples, 1),
                         "samples": kept.samples, "vertical bias": kept.bias, "paper's claim": claim(kind),
                         "partial": bool(record.get("partial"))})
    return pd.DataFrame(rows)


def write_bias_table(table: pd.DataFrame, out_dir: str | Path, name: str, model: str, benchmark: str,
                     ) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv, md = out_dir / f"{name}.csv", out_dir / f"{name}.md"
    table.to_csv(csv, index=False)
    md.write_text(
        f"# {name}: where the kept visual tokens come from ({model}, {benchmark})\n\n"
        f"{table.to_markdown(index=False, floatfmt='.3f')}\n\n"
        "vertical bias: the mean image row of the kept tokens (0 = top) divided by its value had each sample kept "
        "as many of its patches uniformly at random; 1.0 = no vertical bias, above 1 = bottom-heavy (2.0: all in "
        "the bottom row), below 1 = top-heavy. Rows are rows of each crop's own patch grid. kept per sample counts "
        "original patches only (merged contextual tokens are not from one place). The paper's claim: text-guided "
        "scoring is bottom-heavy after a shallow decoder cut (the end of the visual sequence lies next to the "
        f"text); visual-only scoring is not. Figure: {name}.png.\n")
    return md, csv


def plot_bias_maps(entries: list[tuple[dict, PositionMaps]], out_png: str | Path, title: str) -> Path:
    """A grid of heatmaps, one row per method and one column per cut (in the order it cuts), each the share of
    samples keeping each patch, its bias in the panel title; on multi-crop models a panel's crops side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = max(len(maps.cuts) for _, maps in entries)
    crops_shown = max(sum(bool(m.present[c].any()) for c in range(m.present.shape[0]))
                      for _, maps in entries for m in maps.cuts.values())
    fig, axes = plt.subplots(len(entries), columns, squeeze=False, layout="constrained",
                             figsize=((2.2 + 1.1 * crops_shown) * columns + 1.2, 3.1 * len(entries) + 0.8))
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
    image, absent = None, False
    for row, (record, maps) in enumerate(entries):
        for col in range(columns):
            ax = axes[row, col]
            if col >= len(maps.cuts):
                ax.axis("off")
                continue
            cut, kept = list(maps.cuts.items())[col]
            crops, side = maps.grid
            frequency = kept.frequency  # [crops, side, side]
            used = [c for c in range(crops) if kept.present[c].any()]
            panel = np.concatenate([frequency[c] for c in used], axis=1)  # crops side by side
            absent |= bool(np.isnan(panel).any())
            image = ax.imshow(panel, vmin=0, vmax=1, cmap=cmap, interpolation="nearest")
            for boundary in range(1, len(used)):
                ax.axvline(boundary * side - 0.5, color="white", linewidth=2)
            kind = scoring(record["method"], record.get("options"), cut).split(" (")[0]
            ax.set_title(f"{_label(record)}\n{cut} ({kind}): bias {kept.bias:.2f}", fontsize=9)
            ax.set_ylabel(f"{'frame' if maps.modality == 'video' else 'image'} row (0 = top)", fontsize=8)
            if maps.modality == "video":  # a video's crops are its frames
                ax.set_xticks([i * side + (side - 1) / 2 for i in range(len(used))], [str(c + 1) for c in used])
                ax.set_xlabel("frame (in time order), each its own patch grid", fontsize=8)
            elif len(used) > 1:  # name the crops instead of numbering the columns
                ax.set_xticks([i * side + (side - 1) / 2 for i in range(len(used))],
                              ["base" if c == 0 else f"crop {c}" for c in used])
                ax.set_xlabel("image column, per crop (the anyres grid's crops in raster order)", fontsize=8)
            else:
                ax.set_xlabel("image column (0 = left)", fontsize=8)
            ax.tick_params(labelsize=7)
    fig.suptitle(title + ("\ngrey: patches no sample's image has (cut away by unpadding)" if absent else ""),
                 fontsize=10)
    fig.colorbar(image, ax=axes, shrink=0.6, label="share of samples keeping the patch")
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)
