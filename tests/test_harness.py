"""The Hydra app end to end on the tiny model and the local benchmark: records, resume, wandb, clear errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from visiondrop.harness import job
from visiondrop.harness.app import CONFIGS, quote_budget_choices

ROOT = Path(__file__).resolve().parents[1]


def config(tmp_path, *overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose("config", overrides=[f"results_dir={tmp_path}/runs", "limit=2", *overrides])
    return cfg


def test_numeric_budget_choices_are_quoted_for_hydra():
    assert quote_budget_choices(["run.py", "budget=64", "budget=192,64", "budget.ratio=0.1", "budget=full"]) == [
        "run.py", "budget='64'", "budget='192','64'", "budget.ratio=0.1", "budget=full"]


def test_budget_as_tokens_or_ratio(tmp_path):
    assert job.Budget.resolve(config(tmp_path, "budget='64'")) == job.Budget(64.0, 64 / 576)
    assert job.Budget.resolve(config(tmp_path, "budget.ratio=0.25")) == job.Budget(144.0, 0.25)
    assert job.Budget.resolve(config(tmp_path, "method=none", "budget='64'")) == job.Budget(None, 1.0)
    with pytest.raises(ValueError, match="ratio must be in"):
        job.Budget.resolve(config(tmp_path, "budget.ratio=1.5"))


def test_interrupted_sweep_resumes_with_only_the_missing_jobs(tmp_path, tiny_dir, monkeypatch):
    evaluated = []
    import lmms_eval.evaluator as evaluator

    original = evaluator.simple_evaluate

    def counting(**kwargs):
        evaluated.append(kwargs["tasks"][0])
        return original(**kwargs)

    monkeypatch.setattr(evaluator, "simple_evaluate", counting)
    jobs = [("visiondrop", "'64'"), ("visionzip", "'64'")]
    first = config(tmp_path, f"model.pretrained={tiny_dir}", f"method={jobs[0][0]}", f"budget={jobs[0][1]}")
    assert len(job.run_job(first)) == 1  # the sweep "dies" after its first job
    record = next((tmp_path / "runs").rglob("*.json"))
    stamp = record.stat().st_mtime_ns
    for method, budget in jobs:  # the same sweep, started again
        job.run_job(config(tmp_path, f"model.pretrained={tiny_dir}", f"method={method}", f"budget={budget}"))
    assert evaluated == ["visiondrop_demo", "visiondrop_demo"]
    assert record.stat().st_mtime_ns == stamp
    records = {json.loads(p.read_text())["method"]: json.loads(p.read_text()) for p in (tmp_path / "runs").rglob("*.json")}
    assert set(records) == {"visiondrop", "visionzip"}
    r = records["visiondrop"]
    assert r["measured_tokens"] == 64 and r["samples"] == 2 and r["tflops"] > 0 and r["versions"]["torch"]
    assert r["config"]["method"]["name"] == "visiondrop" and r["retention_ratio"] == pytest.approx(64 / 576)
    forced = config(tmp_path, f"model.pretrained={tiny_dir}", "method=visiondrop", "budget='64'", "force=true")
    assert len(job.run_job(forced)) == 1


def test_a_replaced_checkpoint_is_evaluated_again(tmp_path, tiny_dir):
    import shutil

    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(tiny_dir, checkpoint)
    cfg = config(tmp_path, f"model.pretrained={checkpoint}", "method=visionzip", "budget='64'")
    first = job.run_job(cfg)
    assert len(first) == 1 and first[0]["checkpoint"] == job.checkpoint_fingerprint(str(checkpoint))
    assert job.run_job(cfg) == []  # same checkpoint: the record stands
    (checkpoint / "notes.txt").write_text("retrained")
    again = job.run_job(cfg)
    assert len(again) == 1 and again[0]["checkpoint"] != first[0]["checkpoint"]
    assert job.checkpoint_fingerprint("llava-hf/llava-1.5-7b-hf") is None  # hub ids: the name alone


def test_unreachable_budget_and_missing_data_fail_clearly(tmp_path, tiny_dir):
    with pytest.raises(job.Unreachable, match="smallest reachable budget is 36"):
        job.run_job(config(tmp_path, f"model.pretrained={tiny_dir}", "method=fastv", "budget='32'"))
    cfg = config(tmp_path, f"model.pretrained={tiny_dir}", "method=none", "benchmarks=table1")
    with open_dict(cfg):
        cfg.benchmarks = [dict(cfg.benchmarks[0], data={"dataset_path": "parquet", "dataset_kwargs": {
            "data_files": {"testdev": str(tmp_path / "gqa" / "*.parquet")}}})]
    with pytest.raises(FileNotFoundError, match="benchmark GQA: no local data matches"):
        job.run_job(cfg)


def test_app_writes_records_and_offline_wandb_runs_and_skips_unreachable_jobs(tmp_path, tiny_dir):
    env = dict(os.environ, WANDB_MODE="offline")
    cmd = [sys.executable, str(ROOT / "scripts" / "run.py"), "-m", f"results_dir={tmp_path}/runs", "limit=2",
           f"model.pretrained={tiny_dir}", "method=fastv,visiondrop", "budget=32", f"hydra.sweep.dir={tmp_path}/sweep"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "fastv / budget 32.0: skipped" in out.stderr + out.stdout
    assert [p.parent.parent.name for p in (tmp_path / "runs").rglob("*.json")] == ["visiondrop"]
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(any(r.glob("*.wandb")) for r in runs)


def test_malformed_config_is_reported_by_hydra(tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts" / "run.py"), "method=fastvv", f"results_dir={tmp_path}"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "Could not find 'method/fastvv'" in out.stderr and "visiondrop" in out.stderr


def test_next_model_config_runs_a_job_with_ratio_budgets(tmp_path, tiny_next_dir):
    cfg = config(tmp_path, "model=llava_next_7b", f"model.pretrained={tiny_next_dir}", "model.device=cpu",
                 "model.dtype=float32", "method=visiondrop", "budget.ratio=0.111111111")
    [record] = job.run_job(cfg)
    assert record["budget"] == 320.0 and record["model"] == "llava-next-7b"
    # each sample keeps the same share of its own grid's tokens: measured below the nominal 320 for small grids
    assert 0 < record["measured_tokens"] <= 320 and record["tflops"] > 0
    assert record["run_info"]["image_aspect_ratio"] == "none"
