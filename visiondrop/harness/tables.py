"""Paper-style tables and plots from the result records, side by side with the paper's numbers.

A row is a method (with any options set by hand) at a resolved schedule, labelled with its nominal budget: a ratio
and a token budget that resolve to the same schedule are one row. Per cell the full evaluation wins over a partial one
(`limit`), then the newest; partial cells are flagged and every cell says how many questions it scored. Judged
open-ended scores (video QA) move with the judge: a table names its judge and refuses cells of different judges; a
cell whose judging stopped part-way has no score and is listed in the `judging incomplete` column.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml

from ..families import checkpoints
from ..methods import method_title

#: the paper's tables of scores per benchmark (Table 1 on images, the video table); "Mean" is a plain mean of the
#: benchmarks' scores (the video table's average), unlike our Avg relative to the full model
#: the paper's image columns in its order (configs/benchmarks/paper_image.yaml names them so); others follow
PAPER_COLUMNS = ("GQA", "MMB", "MMB-CN", "MME", "POPE", "SQA", "VQAv2", "TextVQA", "VizWiz")
MARKERS = "osD^vPX*h<>"
INCOMPLETE = "judging incomplete"  # the column naming a row's benchmarks judged part-way


def paper_name(model: str) -> str:
    """A model as the paper's tables name it (a registered checkpoint's `paper`), else its own name."""
    checkpoint = checkpoints().get(model)
    return checkpoint.paper if checkpoint and checkpoint.paper else model


def paper_scores(paper_csv: str | Path, model: str) -> pd.DataFrame:
    """The paper's Table 1 (or video table) cells for `model` as (method, budget, benchmark) -> value."""
    paper = pd.read_csv(paper_csv)
    paper = paper[paper.table.str.startswith(("Table1", "Video")) & (paper.model == paper_name(model))
                  ].copy()
    paper["method"] = paper.method.str.replace(r" \(.*\)", "", regex=True)
    paper["budget"] = pd.to_numeric(paper.tokens.where(paper.method != "Vanilla", other=pd.NA), errors="coerce")
    paper["value"] = pd.to_numeric(paper.value, errors="coerce")  # the file also holds claims ("stable")
    return paper[["method", "budget", "benchmark", "value"]]


def _nominal(budgets: pd.Series) -> float:
    """The row's label among the budgets its records were asked with: the roundest (64 before 63.94)."""
    values = pd.to_numeric(budgets, errors="coerce").dropna()
    return float("nan") if values.empty else min(values, key=lambda b: (abs(b - round(b)), b))


def select_cells(records: pd.DataFrame, model: str) -> pd.DataFrame:
    """The record shown per (Method, budget, benchmark): full before partial, then the newest."""
    ours = records[records.model == model].copy()
    if ours.empty:
        models = sorted(set(records.model.dropna()))
        raise ValueError(f"no records for model {model!r}; models with records: {', '.join(models) or 'none'}")
    variant = ours.variant.fillna("")
    ours["Method"] = ours.method.map(method_title) + variant.map(lambda v: f" ({v})" if v else "")
    ours["budget"] = ours.groupby(["Method", "schedule"], dropna=False).budget.transform(_nominal)
    ours["partial"] = ours.partial.fillna(False).astype(bool)
    ours = ours.sort_values(["partial", "created"], ascending=[True, False])
    return ours.drop_duplicates(["Method", "budget", "benchmark"])


def build_table(records: pd.DataFrame, paper_csv: str | Path | None, model: str) -> tuple[pd.DataFrame, str]:
    """Rows method x budget; per benchmark our score, the questions it scored (n), the paper's and the difference;
    Avg relative to our full row; the benchmarks evaluated partially. Returns the table and a note on the columns.
    """
    cells = select_cells(records, model)
    judges = _one_judge(cells)
    seen = list(dict.fromkeys(cells.benchmark))
    benchmarks = sorted(seen, key=lambda b: (PAPER_COLUMNS.index(b) if b in PAPER_COLUMNS else len(PAPER_COLUMNS),
                                             seen.index(b)))
    by_row = cells.set_index(["Method", "budget", "benchmark"])
    wide = by_row.score.unstack("benchmark").reindex(columns=benchmarks)
    counts = by_row.docs.unstack("benchmark").reindex(index=wide.index, columns=benchmarks)
    table = pd.DataFrame(index=wide.index)
    table["measured tokens"] = cells.groupby(["Method", "budget"], dropna=False).measured_tokens.mean()

    full = wide[wide.index.get_level_values("budget").isna() & (wide.index.get_level_values("Method") == "Vanilla")]
    reference = full.iloc[0].where(full.iloc[0] != 0) if len(full) else wide.iloc[0] * float("nan")
    relative = wide.div(reference) * 100  # undefined (missing) where our full model scores 0
    paper = paper_scores(paper_csv, model) if paper_csv else pd.DataFrame(columns=["method", "budget", "benchmark",
                                                                                   "value"])
    means = ["Mean"] if (paper.benchmark == "Mean").any() else []
    for bench in benchmarks + ["Avg"] + means:
        table[bench] = {"Avg": relative.mean(axis=1, skipna=False), "Mean": wide.mean(axis=1, skipna=False)
                        }.get(bench, wide.get(bench))
        if bench not in ("Avg", "Mean"):
            table[f"{bench} n"] = counts[bench]
        if len(paper):  # the paper's columns only where it has numbers for this model
            values = paper[paper.benchmark == bench].set_index(["method", "budget"]).value
            table[f"{bench} paper"] = [_lookup(values, m, b) for m, b in table.index]
            table[f"{bench} diff"] = table[bench] - table[f"{bench} paper"]
    partial = cells[cells.partial].groupby(["Method", "budget"], dropna=False).benchmark.agg(", ".join)
    table["partial"] = partial.reindex(table.index).fillna("")
    incomplete = cells[cells.get("judging", pd.Series(index=cells.index, dtype=object)) == "incomplete"]
    if len(incomplete):  # judged part-way: never shown as a score
        names = incomplete.groupby(["Method", "budget"], dropna=False).benchmark.agg(", ".join)
        table[INCOMPLETE] = names.reindex(table.index).fillna("")

    first = cells.drop_duplicates("benchmark").set_index("benchmark")
    conventions = first.get("convention")
    note = "; ".join(f"{b}: {conventions[b]}" for b in benchmarks if conventions is not None
                     and pd.notna(conventions.get(b)))
    units = first.get("unit", pd.Series(dtype=object))
    table.attrs["units"] = {b: units[b] if pd.notna(units.get(b)) else "%" for b in benchmarks}  # plot axes
    note += ("; n: questions scored; partial: benchmarks evaluated on a subset (limit=), not comparable with full "
             "runs; Avg: mean of the columns relative to our own full-model row (%)"
             + ("; Mean: plain mean of the columns, as the paper's video average" if means else ""))
    note += judges
    if not len(full):
        note += (f". Avg is empty: there is no full-model record for {model}; run "
                 f"`python scripts/run.py {_model_override(model)} method=none` on the same benchmarks")
    return table.iloc[sorted(range(len(table)), key=lambda i: _row_order(*table.index[i]))], note


def _one_judge(cells: pd.DataFrame) -> str:
    """The note's words on the judge of the judged cells (video QA); a ValueError where cells of several judges
    would mix in one table (the judge moves these scores by points)."""
    judged_by = cells.get("judged_by", pd.Series(index=cells.index, dtype=object))
    judges = list(dict.fromkeys(judged_by.dropna()))
    if len(judges) > 1:
        listing = "; ".join(f"{judge}: " + ", ".join(
            f"{row.Method} {'full' if pd.isna(row.budget) else f'{row.budget:g}'} on {row.benchmark}"
            for row in cells[judged_by == judge].itertuples()) for judge in judges)
        raise ValueError(f"these records were scored by {len(judges)} judges, which one table must not mix "
                         f"({listing}): judge the stored answers again with one judge (`python scripts/judge.py "
                         "--rejudge --model ... --base-url ...`, or the job again with judge.model=...: the answers "
                         "are not generated again)")
    protocol = cells.get("protocol", pd.Series(index=cells.index, dtype=object))
    unjudged = int(((protocol == "video-chatgpt") & judged_by.isna()).sum())
    incomplete = int((cells.get("judging", pd.Series(index=cells.index, dtype=object)) == "incomplete").sum())
    return ((f"; judged by {judges[0]} (Video-ChatGPT protocol)" if judges else "")
            + (f"; {unjudged} cell(s) unjudged, their answers stored without a judge (python scripts/judge.py "
               "judges them)" if unjudged else "")
            + (f"; {incomplete} cell(s) judging incomplete, no score until the rest is judged (the job again, or "
               "python scripts/judge.py, judges only the missing answers)" if incomplete else ""))


def _row_order(method: str, budget: float) -> tuple:
    """The full model first, then each method from its largest budget down."""
    return method != "Vanilla", method, -budget if pd.notna(budget) else -float("inf")


def _model_override(model: str) -> str:
    """`model=<config>` for the config in ./configs/model that has this name, else `model.name=<name>`."""
    for path in sorted(Path("configs/model").glob("*.yaml")):
        if (yaml.safe_load(path.read_text()) or {}).get("name") == model:
            return f"model={path.stem}"
    return f"model.name={model}"


def _lookup(cells: pd.Series, method: str, budget: float) -> float:
    """The paper's value for (method, budget); budget NaN is the full model."""
    for (m, b), value in cells.items():
        if m == method and ((pd.isna(b) and pd.isna(budget)) or b == budget):
            return value
    return float("nan")


def flat_table(table: pd.DataFrame) -> pd.DataFrame:
    """The table with Method and "# Tokens" (the nominal budget, "full") as columns, as written and logged."""
    flat = table.reset_index().rename(columns={"budget": "# Tokens"})
    flat["# Tokens"] = flat["# Tokens"].map(lambda b: "full" if pd.isna(b) else f"{b:g}")
    return flat


def write_table(table: pd.DataFrame, note: str, out_dir: str | Path, name: str = "table1") -> tuple[Path, Path]:
    return write_flat(flat_table(table), note, out_dir, name)


def write_flat(flat: pd.DataFrame, note: str, out_dir: str | Path, name: str) -> tuple[Path, Path]:
    """A table with plain columns as `<name>.csv` and `<name>.md` (missing cells marked, then the note)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv, md = out_dir / f"{name}.csv", out_dir / f"{name}.md"
    flat.to_csv(csv, index=False)
    cells = flat.astype(object).where(flat.notna(), None)  # tabulate marks None, not NaN, as missing
    md.write_text(f"# {name}\n\n{cells.to_markdown(index=False, floatfmt='.2f', missingval='—')}\n\n"
                  f"Missing cells are marked —. Columns: {note}.\n")
    return md, csv


def score_columns(table: pd.DataFrame) -> list[str]:
    """The benchmark columns and Avg (not n, paper, diff, tokens or partial)."""
    return [c for c in table.columns if not c.endswith((" paper", " diff", " n"))
            and c not in ("measured tokens", "partial", INCOMPLETE)]


def curve_points(table: pd.DataFrame, column: str) -> list[tuple[str, pd.DataFrame]]:
    """Per method of the pruned rows: x (measured tokens, else the nominal budget), y, label (the nominal budget) and
    whether the cell is partial, sorted by x."""
    pruned = table[table.index.get_level_values("budget").notna()]
    budgets = pd.Series(pruned.index.get_level_values("budget"), index=pruned.index)
    partial = pruned.partial.map(bool if column == "Avg" else lambda p: column in p.split(", "))
    points = pd.DataFrame({"x": pruned["measured tokens"].fillna(budgets), "y": pruned[column],
                           "label": budgets.map("{:g}".format), "partial": partial}).dropna(subset="y")
    return [(method, rows.droplevel("Method").sort_values("x")) for method, rows in points.groupby(level="Method")]


def plot_scores(table: pd.DataFrame, out_png: str | Path) -> Path:
    """Score versus measured visual tokens, one line per method, one panel per benchmark (and Avg); each point
    labelled with its nominal budget, hollow where partial; the full model as a dashed line. Markers differ in shape
    and size (smaller on top) and hollow ones are see-through, so points at the same place stay visible."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    columns = score_columns(table)
    fig, axes = plt.subplots(1, len(columns), figsize=(4.5 * len(columns), 4), squeeze=False, layout="constrained")
    methods = sorted(set(table.index.get_level_values("Method")) - {"Vanilla"})
    style = {m: dict(color=f"C{i}", marker=MARKERS[i % len(MARKERS)], markersize=11 - 2 * (i % 4), zorder=2 + i)
             for i, m in enumerate(methods)}
    for ax, column in zip(axes[0], columns):
        for method, rows in curve_points(table, column):
            ax.plot(rows.x, rows.y, color=style[method]["color"], alpha=0.6, zorder=1)
            for partial, points in rows.groupby("partial"):
                ax.plot(points.x, points.y, linestyle="none", markeredgewidth=1.5,
                        markerfacecolor="none" if partial else style[method]["color"], **style[method])
            for x, y, label in zip(rows.x, rows.y, rows.label):
                lift = 5 + 8 * (methods.index(method) % 3)  # labels of nearby points of other methods apart
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, lift), fontsize=7,
                            color=style[method]["color"])
        full = table[table.index.get_level_values("budget").isna()][column].dropna()
        if len(full):
            ax.axhline(full.iloc[0], color="gray", linestyle="--")
        unit = table.attrs.get("units", {}).get(column, "%")
        ax.set(title=column, xlabel="measured visual tokens (mean per decoder layer)",
               ylabel="% of the full model's score" if column == "Avg" else f"score ({unit})")
    handles = [Line2D([], [], label=m, **{k: v for k, v in style[m].items() if k != "zorder"}) for m in methods]
    handles += [Line2D([], [], color="gray", linestyle="--", label="full model"),
                Line2D([], [], color="gray", marker="o", markerfacecolor="none", linestyle="none",
                       label="partial (limit)")]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 5), fontsize="small")
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return Path(out_png)
