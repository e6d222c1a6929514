"""The record store and the table builder on fixture records."""
import json

import pandas as pd
import pytest

from visiondrop.harness.store import ResultStore
from visiondrop.harness.tables import build_table, plot_scores, write_table

PAPER = pd.DataFrame([
    ["Table1_LLaVA-1.5-7B", "LLaVA-1.5-7B", "Vanilla (upper bound)", 576, "GQA", 61.92],
    ["Table1_LLaVA-1.5-7B", "LLaVA-1.5-7B", "VisionDrop", 192, "GQA", 59.99],
    ["Table1_LLaVA-1.5-7B", "LLaVA-1.5-7B", "VisionDrop", 192, "POPE", 87.23],
    ["Table1_LLaVA-1.5-7B", "LLaVA-1.5-7B", "VisionDrop", 192, "Avg", 98.76],
], columns=["table", "model", "method", "tokens", "benchmark", "value"])


def record(method, budget, benchmark, score, measured=None):
    return {"model": "llava-1.5-7b", "method": method, "budget": budget, "benchmark": benchmark, "score": score,
            "metric": "exact_match", "convention": f"{benchmark} convention", "measured_tokens": measured}


def test_store_writes_atomically_and_reports_existing(tmp_path):
    store = ResultStore(tmp_path)
    assert not store.has("m", "visiondrop", 64.0, "GQA")
    path = store.write({"model": "m", "method": "visiondrop", "budget": 64.0, "benchmark": "GQA", "score": 1.0})
    assert store.has("m", "visiondrop", 64.0, "GQA") and json.loads(path.read_text())["score"] == 1.0
    assert not list(tmp_path.rglob("*.tmp"))
    assert store.path("m", "none", None, "GQA").parent.name == "full"


def test_table_numbers_paper_columns_and_missing_cells(tmp_path):
    store = ResultStore(tmp_path / "runs")
    for r in [record("none", None, "GQA", 60.0, 576), record("none", None, "POPE", 80.0, 576),
              record("visiondrop", 192.0, "GQA", 57.0, 192), record("visiondrop", 192.0, "POPE", 84.0, 192),
              record("fastv", 192.0, "GQA", 51.0, 192)]:
        store.write(r)
    paper_csv = tmp_path / "paper.csv"
    PAPER.to_csv(paper_csv, index=False)
    table, note = build_table(store.frame(), paper_csv, "llava-1.5-7b")

    vd = table.loc[("VisionDrop", 192.0)]
    assert vd["GQA"] == 57.0 and vd["GQA paper"] == 59.99 and vd["GQA diff"] == pytest.approx(57.0 - 59.99)
    assert vd["Avg"] == pytest.approx((57 / 60 + 84 / 80) / 2 * 100)
    assert vd["Avg paper"] == 98.76
    full = table[table.index.get_level_values("budget").isna()].iloc[0]
    assert full["GQA paper"] == 61.92 and full["Avg"] == pytest.approx(100.0)
    fastv = table.loc[("FastV", 192.0)]
    assert pd.isna(fastv["POPE"]) and pd.isna(fastv["Avg"])  # a missing cell stays missing
    assert "GQA: GQA convention" in note and "POPE: POPE convention" in note

    md, csv = write_table(table, note, tmp_path / "out")
    text = md.read_text()
    assert "—" in text and "GQA paper" in text and "full" in text
    assert pd.read_csv(csv).shape[0] == 3
    assert plot_scores(table, tmp_path / "out" / "t.png").stat().st_size > 0
