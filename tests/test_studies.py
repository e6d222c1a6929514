"""The controlled study and the ablations: their tables on fixture records, and both experiments end to end on the
demo model and task (a few questions)."""
import shutil

import pandas as pd
import pytest

from test_harness import ROOT, run_cli
from visiondrop.harness.identity import identity_key
from visiondrop.harness.store import ResultStore
from visiondrop.harness.studies import ablations, controlled_study

PAPER = ROOT / "results" / "paper" / "paper_tables.csv"


def record(method, options, budget, benchmark, score, schedule, measured, created="1", partial=False):
    identity = {"model": "m", "method": method, "benchmark": {"name": benchmark}, "options": options,
                "budget": budget, "partial": partial}
    return {"model": "m", "method": method, "options": options, "budget": budget, "retention_ratio": budget / 576,
            "benchmark": benchmark, "score": score, "measured_tokens": measured, "docs": 10, "partial": partial,
            "created": created, "identity": identity, "key": identity_key(identity), "schedule": schedule,
            "config": {"method": {"options": {k: v for k, v in options.items() if k == "scoring"}}}}


def frame(tmp_path, *records):
    store = ResultStore(tmp_path)
    for r in records:
        store.write(r)
    return store.frame()


def test_controlled_study_table(tmp_path):
    pd_ = lambda scoring, budget, bench, score: record(  # noqa: E731
        "pyramiddrop", {"layer_list": [2, 8, 16], "decay": None, "scoring": scoring}, budget, bench, score,
        {"keep_counts": [budget]}, budget - 0.5)
    other_schedule = record("pyramiddrop", {"layer_list": [8, 16, 24], "decay": 0.5, "scoring": "visual"}, 64, "GQA",
                            99.0, {"keep_counts": [576]}, 270.0)  # not PyramidDrop's default schedule: left out
    records = frame(tmp_path, pd_("text", 192, "GQA", 57.0), pd_("visual", 192, "GQA", 58.5),
                    pd_("text", 64, "GQA", 47.0), pd_("visual", 64, "GQA", 52.0), pd_("text", 64, "MMB", 60.0),
                    other_schedule)
    table, note = controlled_study(records, PAPER, "m")
    assert list(table["# Tokens"]) == [192, 64]
    row = table.set_index("# Tokens").loc[64]
    assert (row["GQA text"], row["GQA visual"], row["GQA visual - text"]) == (47.0, 52.0, 5.0)
    assert row["MMB text"] == 60.0 and pd.isna(row["MMB visual"]) and pd.isna(row["MMB visual - text"])
    assert row["measured tokens (text)"] == row["measured tokens (visual)"] == 63.5
    assert row["paper's claim"] == "visual better" and "gap grows with compression" in note
    with pytest.raises(ValueError, match="no pyramiddrop records for model 'm' with default options besides scoring"):
        controlled_study(frame(tmp_path / "vd", record("visiondrop", {}, 64, "GQA", 1.0, {}, 64)), PAPER, "m")


def test_ablations_table_puts_the_official_row_in_every_ablation(tmp_path):
    defaults = {"schedule": None, "first_stage": None, "contextual_fraction": None, "stages": "both",
                "newlines": "drop"}
    vd = lambda score, schedule, **knobs: record("visiondrop", {**defaults, **knobs}, 64, "GQA", score,  # noqa: E731
                                                 schedule, 64.0)
    official = {"encoder": [84, 12], "layers": [8, 16, 24], "decoder": [[60, 10], [44, 8], [32, 6]]}
    records = frame(tmp_path, vd(55.0, official),
                    vd(56.0, {"encoder": [168, 24], "layers": [8, 16, 24], "decoder": [[24, 4], [18, 3], [13, 2]]},
                       first_stage=3.0),
                    vd(50.0, {"encoder": None, "layers": [2, 8, 16], "decoder": [[37, 6], [27, 5], [20, 4]]},
                       stages="decoder"),
                    vd(54.0, {"encoder": [48, 48], "layers": [8, 16, 24], "decoder": [[35, 35], [26, 26], [19, 19]]},
                       contextual_fraction=0.5))
    table, note = ablations(records, PAPER, "m")
    assert list(table.ablation) == ["encoder-stage retention ratio"] * 2 + ["dominant-to-contextual ratio"] * 2 + [
        "progressive vs single-stage"] * 2
    assert list(table.knobs) == ["official", "first_stage=3.0", "official", "contextual_fraction=0.5", "official",
                                 "stages=decoder"]
    assert list(table.GQA) == [55.0, 56.0, 55.0, 54.0, 55.0, 50.0]
    assert table["encoder keeps"][1] == "192 of 576 (33.3%)" and table["encoder keeps"][5] == "all 576"
    assert table.schedule[5] == "@2 37+6, @8 27+5, @16 20+4"
    assert table["paper's claim"][0] == "33.3 % (best setting)" and table["paper's claim"][5] == "progressive better"
    assert "scores not known" in note


def test_both_experiments_run_end_to_end_on_the_demo_setup(tmp_path, monkeypatch):
    checkout = tmp_path / "checkout"  # configs and records stay inside it
    shutil.copytree(ROOT / "configs", checkout / "configs")
    monkeypatch.chdir(checkout)
    demo = ["model=demo-llava-1.5", f"model.pretrained={ROOT / 'visiondrop/harness/assets/demo_model'}", "benchmarks=demo",
            "limit=2", "batch_size=2"]
    assert run_cli(monkeypatch, "experiment=controlled_study", *demo, "budget=176", "hydra.sweep.dir=cs") == 0
    assert (checkout / "cs" / "summary.txt").read_text().startswith("2 job(s): 2 ran")
    assert run_cli(monkeypatch, "experiment=ablations", *demo, "budget=160", "++method.options={},{stages: decoder}",
                   "hydra.sweep.dir=ab") == 0
    records = ResultStore(checkout / "results" / "runs").frame()
    table, _ = controlled_study(records, PAPER, "demo-llava-1.5")
    row = table.iloc[0]
    assert row["# Tokens"] == 176 and row["Demo n"] == 2 and row["partial"] == "Demo"
    assert row["measured tokens (text)"] == row["measured tokens (visual)"] == 175.75  # (576 + 105 + 19 + 3) / 4
    table, _ = ablations(records, PAPER, "demo-llava-1.5")
    decoder = table[table.knobs == "stages=decoder"].iloc[0]
    assert decoder["encoder keeps"] == "all 576" and decoder["measured tokens"] == pytest.approx(160, abs=1)
    assert set(table.knobs) == {"official", "stages=decoder"}
