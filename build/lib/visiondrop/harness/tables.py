"""Paper-style tables and plots from the result records, side by side with the paper's numbers."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

# our method ids -> the names the paper's tables use
PAPER_NAMES = {"none": "Vanilla", "visiondrop": "VisionDrop", "fastv": "FastV", "pyramiddrop": "PDrop",
               "sparsevlm": "SparseVLM", "visionzip": "VisionZip", "random": "Random"}
PAPER_MODELS = {"llava-1.5-7b": "LLaVA-1.5-7B", "llava-next-7b": "LLaVA-NeXT-7B"}


def paper_scores(paper_csv: str | Path, model: str) -> pd.DataFrame:
    """The paper's Table 1 cells for `model` as (method, budget, benchmark) -> value."""
    paper = pd.read_csv(paper_csv)
    paper = paper[paper.table.str.startswith("Table1") & (paper.model == PAPER_MODELS.get(model, model))].copy()
    paper["method"] = paper.method.str.replace(r" \(.*\)", "", regex=True)
    paper["budget"] = paper.tokens.where(paper.method != "Vanilla", other=pd.NA)
    return paper[["method", "budget", "benchmark", "value"]]


def build_table(records: pd.DataFrame, paper_csv: str | Path | None, model: str) -> tuple[pd.DataFrame, str]:
    """Rows method x budget; per benchmark our score, the paper's, and the difference; Avg relative to our full row.

    Returns the table and a note naming each column's metric convention.
    """
    ours = records[records.model == model].copy()
    if ours.empty:
        raise ValueError(f"no records for model {model!r}")
    ours["Method"] = ours.method.map(PAPER_NAMES).fillna(ours.method)
    ours["budget"] = pd.to_numeric(ours.budget, errors="coerce")
    benchmarks = list(dict.fromkeys(ours.benchmark))
    wide = ours.groupby(["Method", "budget", "benchmark"], dropna=False).score.mean().unstack("benchmark")
    wide = wide.reindex(columns=benchmarks)
    tokens = ours.groupby(["Method", "budget"], dropna=False).measured_tokens.mean()

    full = wide[wide.index.get_level_values("budget").isna()]
    reference = full.iloc[0].where(full.iloc[0] != 0) if len(full) else wide.iloc[0] * float("nan")
    relative = wide.div(reference) * 100  # undefined (missing) where our full model scores 0
    table = pd.DataFrame(index=wide.index)
    table["measured tokens"] = tokens.reindex(wide.index)
    paper = paper_scores(paper_csv, model) if paper_csv else pd.DataFrame(columns=["method", "budget", "benchmark",
                                                                                   "value"])
    for bench in benchmarks + ["Avg"]:
        table[bench] = relative.mean(axis=1, skipna=False) if bench == "Avg" else wide[bench]
        cells = paper[paper.benchmark == bench].set_index(["method", "budget"]).value
        table[f"{bench} paper"] = [_lookup(cells, m, b) for m, b in table.index]
        table[f"{bench} diff"] = table[bench] - table[f"{bench} paper"]
    conventions = ours.drop_duplicates("benchmark").set_index("benchmark").get("convention")
    note = "; ".join(f"{b}: {conventions[b]}" for b in benchmarks if conventions is not None
                     and pd.notna(conventions.get(b)))
    note += "; Avg: mean of the columns relative to our own full-model row (%)"
    return table.sort_index(level=["Method", "budget"], ascending=[True, False]), note


def _lookup(cells: pd.Series, method: str, budget: float) -> float:
    """The paper's value for (method, budget); budget NaN is the full model."""
    for (m, b), value in cells.items():
        if m == method and ((pd.isna(b) and pd.isna(budget)) or b == budget):
            return value
    return float("nan")


def write_table(table: pd.DataFrame, note: str, out_dir: str | Path, name: str = "table1") -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    flat = table.reset_index().rename(columns={"budget": "# Tokens"})
    flat["# Tokens"] = flat["# Tokens"].map(lambda b: "full" if pd.isna(b) else f"{b:g}")
    csv, md = out_dir / f"{name}.csv", out_dir / f"{name}.md"
    flat.to_csv(csv, index=False)
    cells = flat.astype(object).where(flat.notna(), None)  # tabulate marks None, not NaN, as missing
    md.write_text(f"# {name}\n\n{cells.to_markdown(index=False, floatfmt='.2f', missingval='—')}\n\n"
                  f"Missing cells are marked —. Columns: {note}.\n")
    return md, csv


def plot_scores(table: pd.DataFrame, out_png: str | Path) -> Path:
    """Score versus budget, one line per method, one panel per benchmark (and Avg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [c for c in table.columns if not c.endswith((" paper", " diff")) and c != "measured tokens"]
    fig, axes = plt.subplots(1, len(columns), figsize=(4 * len(columns), 3.2), squeeze=False)
    pruned = table[table.index.get_level_values("budget").notna()]
    for ax, column in zip(axes[0], columns):
        for method, rows in pruned[column].groupby(level="Method"):
            series = rows.droplevel("Method").sort_index()
            ax.plot(series.index, series.values, marker="o", label=method)
        full = table[table.index.get_level_values("budget").isna()][column]
        if len(full):
            ax.axhline(full.iloc[0], color="gray", linestyle="--", label="full")
        ax.set(title=column, xlabel="visual tokens (avg per layer)")
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return Path(out_png)
