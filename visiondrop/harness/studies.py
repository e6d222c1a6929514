"""The paper's argument as tables: the controlled study (PyramidDrop's scoring swapped under its own schedule) and
VisionDrop's ablations, from the result records, beside the paper's claims (`results/paper/paper_tables.csv`).

Cells are chosen as in the paper tables (full before partial, then the newest); rows are told apart by the
method's resolved options in each record, so a run with an option left at its default and one that names the
default are the same row. The files are written as the paper tables are (`tables.write_flat`).
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

#: VisionDrop's schedule knobs at their defaults (`methods.visiondrop.schedule_for_budget`)
KNOBS = {"first_stage": None, "contextual_fraction": None, "stages": "both"}
ABLATIONS = {"first_stage": "encoder-stage retention ratio", "contextual_fraction": "dominant-to-contextual ratio",
             "stages": "progressive vs single-stage"}


def paper_claims(paper_csv: str | Path | None, table: str) -> dict[str, tuple[str, str]]:
    """The paper's claims of one table of the CSV ("ControlledStudy", "Ablation"): what -> (claim, its source)."""
    if paper_csv is None:
        return {}
    paper = pd.read_csv(paper_csv)
    rows = paper[paper.table == table]
    return {row.benchmark: (row.value if row.unit == "claim" else f"{row.value} {row.unit}", row.source_note)
            for row in rows.itertuples()}


def _claims_note(claims: dict[str, tuple[str, str]]) -> str:
    return "; ".join(f"{what}: {claim} ({source})" for what, (claim, source) in claims.items())


def _cells(records: pd.DataFrame, model: str, method: str, studied: tuple[str, ...]) -> pd.DataFrame:
    """The records of `method` on `model` whose options other than the `studied` ones are the defaults, one per
    (resolved options, budget, benchmark): full before partial, then the newest, as in the paper tables."""
    from ..methods import method as registered

    defaults = json.loads(json.dumps(registered(method).resolved_options({}), default=str))  # as records store them
    cells = records[(records.model == model) & (records.method == method)].copy()
    cells["options"] = cells.options.map(lambda o: o if isinstance(o, dict) else {})
    cells = cells[cells.options.map(lambda o: all(o.get(k, v) == v for k, v in defaults.items() if k not in studied))]
    if cells.empty:
        raise ValueError(f"no {method} records for model {model!r} with default options besides "
                         f"{', '.join(studied)}: run the experiment first")
    cells["setting"] = cells.options.map(lambda o: json.dumps(o, sort_keys=True))
    cells["partial"] = cells.partial.fillna(False).astype(bool)
    return cells.sort_values(["partial", "created"], ascending=[True, False]).drop_duplicates(
        ["setting", "budget", "benchmark"])


def controlled_study(records: pd.DataFrame, paper_csv: str | Path | None, model: str) -> tuple[pd.DataFrame, str]:
    """Per budget and benchmark: PyramidDrop's score with text-guided and with visual scoring, the difference, and
    the measured tokens of each (equal by construction); the paper's claim in the note."""
    cells = _cells(records, model, "pyramiddrop", ("scoring",))
    cells["scoring"] = cells.options.map(lambda o: o.get("scoring", "text"))
    wide = cells.pivot_table(index="budget", columns=["benchmark", "scoring"], values="score", aggfunc="first")
    tokens = cells.pivot_table(index="budget", columns="scoring", values="measured_tokens", aggfunc="mean")
    counts = cells.pivot_table(index="budget", columns="benchmark", values="docs", aggfunc="min")
    table = pd.DataFrame(index=wide.index.rename("# Tokens"))
    for scoring in ("text", "visual"):
        table[f"measured tokens ({scoring})"] = tokens.get(scoring)
    for bench in dict.fromkeys(cells.benchmark):
        text, visual = (wide.get((bench, s)) for s in ("text", "visual"))
        table[f"{bench} text"], table[f"{bench} visual"] = text, visual
        table[f"{bench} visual - text"] = visual - text if text is not None and visual is not None else None
        table[f"{bench} n"] = counts[bench]
    table["partial"] = cells[cells.partial].groupby("budget").benchmark.agg(lambda b: ", ".join(sorted(set(b))))
    table["partial"] = table.partial.fillna("")
    claims = paper_claims(paper_csv, "ControlledStudy")
    table["paper's claim"] = "; ".join(claim for claim, _ in claims.values()) or None
    note = ("PyramidDrop's default schedule (cuts and counts unchanged) scored by the last instruction token (text) "
            "or by the attention visual tokens receive from visual tokens (visual); n: questions scored (least of "
            "the two runs); partial: evaluated on a subset (limit=)")
    if claims:
        note += ". The paper's claim: " + _claims_note(claims)
    return table.sort_index(ascending=False).reset_index(), note


def _ablation(options: dict) -> str:
    """Which ablation a run belongs to: the one knob it moves away from the defaults (or "official")."""
    moved = [knob for knob, default in KNOBS.items() if options.get(knob, default) != default]
    return ABLATIONS[moved[0]] if len(moved) == 1 else "official" if not moved else "combined: " + ", ".join(moved)


def _schedule_text(schedule: dict) -> str:
    """e.g. "encoder 84+12, @8 60+10, @16 44+8, @24 32+6" (per crop)."""
    parts = [f"encoder {schedule['encoder'][0]}+{schedule['encoder'][1]}"] if schedule.get("encoder") else []
    parts += [f"@{layer} {d}+{c}" for layer, (d, c) in zip(schedule.get("layers", []), schedule.get("decoder", []))]
    return ", ".join(parts) or "none"


def ablations(records: pd.DataFrame, paper_csv: str | Path | None, model: str) -> tuple[pd.DataFrame, str]:
    """Per ablation and setting: the measured tokens, the share of the visual tokens the encoder stage keeps, the
    schedule, the score per benchmark; the official schedule is the reference row of every ablation."""
    cells = _cells(records, model, "visiondrop", tuple(KNOBS))
    cells["ablation"] = cells.options.map(_ablation)
    schedules = cells.schedule.map(json.loads)
    n_visual = (cells.budget / cells.retention_ratio).round()
    cells["schedule"] = schedules.map(_schedule_text)
    cells["encoder keeps"] = [
        f"{s['encoder'][0] + s['encoder'][1]} of {n:g} ({(s['encoder'][0] + s['encoder'][1]) / n:.1%})"
        if s.get("encoder") else f"all {n:g}" for s, n in zip(schedules, n_visual)]
    cells["knobs"] = cells.options.map(
        lambda o: ", ".join(f"{k}={o.get(k, d)}" for k, d in KNOBS.items() if o.get(k, d) != d) or "official")
    keys = ["ablation", "knobs", "budget", "encoder keeps", "schedule"]
    wide = cells.pivot_table(index=keys, columns="benchmark", values="score", aggfunc="first")
    counts = cells.pivot_table(index=keys, columns="benchmark", values="docs", aggfunc="first")
    table = cells.groupby(keys).agg(**{"measured tokens": ("measured_tokens", "mean")})
    for bench in dict.fromkeys(cells.benchmark):
        table[bench], table[f"{bench} n"] = wide[bench], counts[bench]
    partial = cells[cells.partial].groupby(keys).benchmark.agg(lambda b: ", ".join(sorted(set(b))))
    table["partial"] = partial.reindex(table.index).fillna("")
    table = table.reset_index().rename(columns={"budget": "# Tokens"})
    official = table[table.ablation == "official"]
    rows = []
    for name in ABLATIONS.values():  # the official row is the reference of every ablation
        group = pd.concat([official.assign(ablation=name), table[table.ablation == name]])
        rows.append(group.sort_values("knobs", key=lambda k: k != "official", kind="stable"))
    rows.append(table[table.ablation.str.startswith("combined")])
    claims = paper_claims(paper_csv, "Ablation")
    result = pd.concat(rows, ignore_index=True)
    result.insert(1, "paper's claim", result.ablation.map(lambda a: claims.get(a, ("",))[0]))
    note = ("encoder keeps: the visual tokens leaving the encoder stage, as a share of all of them; schedule: "
            "(dominant + contextual) tokens per crop at the encoder stage and before each decoder layer; "
            "n: questions scored; partial: evaluated on a subset (limit=). The paper's claims, in full: "
            + _claims_note(claims))
    return result, note
