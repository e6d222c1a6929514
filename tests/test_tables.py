"""The record store and the table builder on fixture records."""
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from visiondrop.harness.identity import identity_key
from visiondrop.harness.store import ResultStore
from visiondrop.harness.tables import build_table, curve_points, plot_scores, write_table

ROOT = Path(__file__).resolve().parents[1]
PAPER = pd.DataFrame([
    ["Table1_LLaVA-1.5-7B", "LLaVA-1.5-7B", "Vanilla (upper bound)", 576, "GQA", 61.92],
    ["Table1_LLaVA-1.5-7B", "LLaVA-1.5-7B", "VisionDrop", 192, "GQA", 59.99],
    ["Table1_LLaVA-1.5-7B", "LLaVA-1.5-7B", "VisionDrop", 192, "POPE", 87.23],
    ["Table1_LLaVA-1.5-7B", "LLaVA-1.5-7B", "VisionDrop", 192, "Avg", 98.76],
], columns=["table", "model", "method", "tokens", "benchmark", "value"])


def record(method, budget, benchmark, score, measured=None, docs=100, partial=False, schedule=None, created="1"):
    identity = {"model": "llava-1.5-7b", "method": method, "benchmark": {"name": benchmark}, "budget": budget,
                "partial": partial, "created": created}
    return {"model": "llava-1.5-7b", "method": method, "budget": budget, "benchmark": benchmark, "score": score,
            "metric": "exact_match", "convention": f"{benchmark} convention", "measured_tokens": measured,
            "docs": docs, "partial": partial, "created": created, "identity": identity, "key": identity_key(identity),
            "schedule": schedule or {"method": method, "tokens": budget}}


def write(store, *records):
    for r in records:
        store.write(r)
    return store.frame()


def test_store_writes_atomically_and_reads_the_first_layout(tmp_path):
    store = ResultStore(tmp_path)
    path = store.write(record("visiondrop", 64.0, "GQA", 1.0), samples=[{"doc_id": 0, "response": "yes"}])
    assert json.loads(path.read_text())["score"] == 1.0 and path.with_suffix(".samples.jsonl").exists()
    assert not list(tmp_path.rglob("*.tmp"))
    old = tmp_path / "llava-1.5-7b" / "fastv" / "192" / "GQA.json"  # before run identities: keyed by budget
    old.parent.mkdir(parents=True)
    old.write_text(json.dumps({"model": "llava-1.5-7b", "method": "fastv", "budget": 192.0, "benchmark": "GQA",
                               "score": 50.0, "config": {"limit": 16, "method": {"options": {"k": 3}}}}))
    frame = store.frame().set_index("method")
    assert frame.loc["fastv", "partial"] and frame.loc["fastv", "variant"] == "k=3"
    assert not frame.loc["visiondrop", "partial"]


def test_table_numbers_paper_columns_and_missing_cells(tmp_path):
    frame = write(ResultStore(tmp_path / "runs"), record("none", None, "GQA", 60.0, 576),
                  record("none", None, "POPE", 80.0, 576), record("visiondrop", 192.0, "GQA", 57.0, 192),
                  record("visiondrop", 192.0, "POPE", 84.0, 192), record("fastv", 192.0, "GQA", 51.0, 192))
    paper_csv = tmp_path / "paper.csv"
    PAPER.to_csv(paper_csv, index=False)
    table, note = build_table(frame, paper_csv, "llava-1.5-7b")

    vd = table.loc[("VisionDrop", 192.0)]
    assert vd["GQA"] == 57.0 and vd["GQA paper"] == 59.99 and vd["GQA diff"] == pytest.approx(57.0 - 59.99)
    assert vd["Avg"] == pytest.approx((57 / 60 + 84 / 80) / 2 * 100) and vd["GQA n"] == 100
    assert vd["Avg paper"] == 98.76
    full = table[table.index.get_level_values("budget").isna()].iloc[0]
    assert full["GQA paper"] == 61.92 and full["Avg"] == pytest.approx(100.0)
    fastv = table.loc[("FastV", 192.0)]
    assert pd.isna(fastv["POPE"]) and pd.isna(fastv["Avg"])  # a missing cell stays missing
    assert "GQA: GQA convention" in note and "POPE: POPE convention" in note and "no full-model" not in note

    md, csv = write_table(table, note, tmp_path / "out")
    text = md.read_text()
    assert "—" in text and "GQA paper" in text and "GQA n" in text and "full" in text
    assert pd.read_csv(csv).shape[0] == 3
    assert plot_scores(table, tmp_path / "out" / "t.png").stat().st_size > 0


def test_ratio_and_token_budgets_with_one_schedule_are_one_row_and_full_beats_partial(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the note's command names the model config found in ./configs
    schedule = {"method": "visiondrop", "encoder": [84, 12]}
    frame = write(ResultStore(tmp_path),
                  record("visiondrop", 63.94, "GQA", 50.0, 64, schedule=schedule, created="3"),  # budget.ratio=0.111
                  record("visiondrop", 64.0, "POPE", 70.0, 64, schedule=schedule),
                  record("visiondrop", 64.0, "GQA", 99.0, 64, docs=4, partial=True, schedule=schedule, created="9"),
                  record("sparsevlm", 192.0, "GQA", 40.0, 300.5, docs=4, partial=True))
    table, note = build_table(frame, None, "llava-1.5-7b")
    assert list(table.index) == [("SparseVLM", 192.0), ("VisionDrop", 64.0)]
    vd = table.loc[("VisionDrop", 64.0)]
    assert vd["GQA"] == 50.0 and vd["GQA n"] == 100 and vd["partial"] == ""  # the newer partial one stands aside
    assert table.loc[("SparseVLM", 192.0), "partial"] == "GQA"
    assert "no full-model record for llava-1.5-7b" in note and "run.py model=llava-1.5-7b method=none" in note
    [(method, points)] = curve_points(table, "GQA")[:1]
    assert method == "SparseVLM" and points.x.tolist() == [300.5] and points.label.tolist() == ["192"]
    assert points.partial.tolist() == [True]  # drawn at its measured tokens, labelled with its nominal budget


def test_make_table_names_the_models_that_have_records(tmp_path):
    write(ResultStore(tmp_path / "runs"), record("visiondrop", 64.0, "GQA", 50.0, 64))
    cmd = [sys.executable, str(ROOT / "scripts" / "make_table.py"), "--model", "llava-next-7b",
           "--records", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "no records for model 'llava-next-7b'; models with records: llava-1.5-7b" in out.stderr
