"""The Hydra app end to end on tiny models and the local benchmark: run identity, resume, outcomes, wandb, errors."""
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import wandb
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from visiondrop.harness import TASKS_DIR, app, job
from visiondrop.harness.identity import checkpoint_fingerprint
from visiondrop.harness.store import ResultStore
from visiondrop.harness.bias_report import collect, plot_bias_maps
from visiondrop.harness.tables import build_table

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = ROOT / "visiondrop" / "harness" / "assets" / "demo_model"


def config(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("config", overrides=[f"results_dir={tmp_path}/runs", "limit=2", *overrides])


def test_budget_numbers_mean_tokens():
    assert app.budget_arguments(["run.py", "budget=50", "budget=192,64", "budget.ratio=0.1", "budget=full"]) == [
        "run.py", "budget.tokens=50", "budget.tokens=192,64", "budget.ratio=0.1", "budget=full"]


def test_budget_as_tokens_or_ratio(tmp_path):
    assert job.Budget.resolve(config(tmp_path, "budget.tokens=64")) == job.Budget(64.0, 64 / 576)
    assert job.Budget.resolve(config(tmp_path, "budget.ratio=0.25")) == job.Budget(144.0, 0.25)
    assert job.Budget.resolve(config(tmp_path, "method=none", "budget='64'")) == job.Budget(None, 1.0)
    for budget in ("640", "320", "160"):  # LLaVA-NeXT's budgets have presets too
        assert job.Budget.resolve(config(tmp_path, "model=llava-next-7b", f"budget='{budget}'")).tokens == int(budget)
    with pytest.raises(ValueError, match="ratio must be in"):
        job.Budget.resolve(config(tmp_path, "budget.ratio=1.5"))


def small_demo_data(tmp_path, rows=8) -> str:
    """The first `rows` questions of the demo benchmark as local data, through the README's override syntax."""
    import pyarrow.parquet as pq

    path = tmp_path / "demo_small.parquet"  # pyarrow keeps the schema's `datasets` features (the image column)
    pq.write_table(pq.read_table(TASKS_DIR / "visiondrop_demo" / "demo.parquet").slice(0, rows), path)
    return f"benchmarks.0.data={{dataset_path: parquet, dataset_kwargs: {{data_files: {{test: {path}}}}}}}"


def test_a_partial_run_never_stands_in_for_the_full_one(tmp_path):
    data = small_demo_data(tmp_path)
    quick = config(tmp_path, data, f"model.pretrained={DEMO_MODEL}", "budget.tokens=64", "limit=4")
    [partial] = job.run_job(quick)
    assert partial["partial"] and partial["docs"] == 4 and partial["docs_total"] == 8
    assert len(Path(partial["path"]).with_suffix(".samples.jsonl").read_text().splitlines()) == 4
    full = config(tmp_path, data, f"model.pretrained={DEMO_MODEL}", "budget.tokens=64", "limit=null")
    [complete] = job.run_job(full)  # not skipped: the partial record is another identity
    assert not complete["partial"] and complete["docs"] == 8 and complete["key"] != partial["key"]

    # a ratio resolving to the same schedule is the same run; other options are not
    same = config(tmp_path, data, f"model.pretrained={DEMO_MODEL}", "budget.ratio=0.111", "limit=null")
    assert job.plan_job(same).todo == [] and job.plan_job(same).done == [Path(complete["path"])]
    explicit_default = config(tmp_path, data, f"model.pretrained={DEMO_MODEL}", "budget.tokens=64", "limit=null",
                              "+method.options.newlines=drop")
    assert job.plan_job(explicit_default).todo == []
    other = config(tmp_path, data, f"model.pretrained={DEMO_MODEL}", "budget.tokens=64", "limit=null",
                   "+method.options.newlines=keep")
    assert len(job.plan_job(other).todo) == 1
    small_demo_data(tmp_path, rows=7)  # the local data replaced under the same name
    assert len(job.plan_job(full).todo) == 1

    table, note = build_table(ResultStore(tmp_path / "runs").frame(), None, "demo-llava-1.5")
    assert list(table.index) == [("VisionDrop", 64.0)]  # one row: the full record, not the partial one
    row = table.loc[("VisionDrop", 64.0)]
    assert row["Demo"] == complete["score"] and row["Demo n"] == 8 and row["partial"] == ""
    assert "no full-model record" in note and "method=none" in note


def test_interrupted_sweep_resumes_with_only_the_missing_jobs(tmp_path, tiny_dir, monkeypatch):
    evaluated = []
    import lmms_eval.evaluator as evaluator

    original = evaluator.simple_evaluate

    def counting(**kwargs):
        evaluated.append(kwargs["tasks"][0])
        return original(**kwargs)

    monkeypatch.setattr(evaluator, "simple_evaluate", counting)
    jobs = [("visiondrop", "64"), ("visionzip", "64")]
    first = config(tmp_path, f"model.pretrained={tiny_dir}", f"method={jobs[0][0]}", f"budget.tokens={jobs[0][1]}")
    assert len(job.run_job(first)) == 1  # the sweep "dies" after its first job
    record = next((tmp_path / "runs").rglob("*.json"))
    stamp = record.stat().st_mtime_ns
    for method, budget in jobs:  # the same sweep, started again
        job.run_job(config(tmp_path, f"model.pretrained={tiny_dir}", f"method={method}", f"budget.tokens={budget}"))
    assert evaluated == ["visiondrop_demo", "visiondrop_demo"]
    assert record.stat().st_mtime_ns == stamp
    records = {r["method"]: r for r in ResultStore(tmp_path / "runs").records()}
    assert set(records) == {"visiondrop", "visionzip"}
    r = records["visiondrop"]
    assert r["measured_tokens"] == 64 and r["samples"] == 2 and r["tflops"] > 0 and r["versions"]["torch"]
    assert r["config"]["method"]["name"] == "visiondrop" and r["retention_ratio"] == pytest.approx(64 / 576)
    assert r["identity"]["options"] == {"schedule": None, "first_stage": None, "contextual_fraction": None,
                                        "stages": "both", "newlines": "drop"} and r["identity"]["versions"]["code"]
    forced = config(tmp_path, f"model.pretrained={tiny_dir}", "method=visiondrop", "budget.tokens=64", "force=true")
    assert len(job.run_job(forced)) == 1


def test_a_replaced_checkpoint_is_evaluated_again(tmp_path, tiny_dir):
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(tiny_dir, checkpoint)
    cfg = config(tmp_path, f"model.pretrained={checkpoint}", "method=visionzip", "budget.tokens=64")
    first = job.run_job(cfg)
    assert len(first) == 1 and first[0]["checkpoint"] == checkpoint_fingerprint(str(checkpoint))
    assert job.run_job(cfg) == []  # same checkpoint: the record stands
    (checkpoint / "notes.txt").write_text("retrained")
    again = job.run_job(cfg)
    assert len(again) == 1 and again[0]["checkpoint"] != first[0]["checkpoint"]
    assert checkpoint_fingerprint("llava-hf/llava-1.5-7b-hf") is None  # hub ids: the name alone


def test_bad_input_fails_clearly(tmp_path, tiny_dir):
    with pytest.raises(job.Unreachable, match="smallest reachable budget is 36"):
        job.run_job(config(tmp_path, f"model.pretrained={tiny_dir}", "method=fastv", "budget.tokens=32"))
    missing = tmp_path / "gqa" / "*.parquet"  # the README's override: the key exists, no `+` needed
    cfg = config(tmp_path, f"model.pretrained={tiny_dir}", "method=none", "benchmarks=table1",
                 f"benchmarks.0.data={{dataset_path: parquet, dataset_kwargs: {{data_files: {{testdev: {missing}}}}}}}")
    with pytest.raises(FileNotFoundError, match="benchmark GQA: no local data matches"):
        job.run_job(cfg)
    with pytest.raises(FileNotFoundError, match="no checkpoint folder at /nonexistent.*hub id"):
        job.plan_job(config(tmp_path, "model.pretrained=/nonexistent"))
    with pytest.raises(Exception, match="kk") as err:  # a wrong option name fails; it is not "unreachable"
        job.plan_job(config(tmp_path, f"model.pretrained={tiny_dir}", "+method.options.kk=3"))
    assert not isinstance(err.value, job.Unreachable)


def wandb_records(run_dir: Path) -> list:
    """The records of an offline run's transaction log (.wandb: wandb's LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = next(run_dir.glob("*.wandb")).read_bytes()
    pos, block, chunk, records = 7, 32768, b"", []  # 7-byte file header; 32 KiB blocks of 7-byte-headed chunks
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = chunk + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            records.append(pb.Record.FromString(chunk))
            chunk = b""
        elif kind == 0:
            break
    return records


def wandb_run(run_dir: Path) -> dict:
    """What an offline run holds: name, group, tags, summary, history keys and artifacts (name -> files)."""
    run = {"summary": {}, "history": set(), "artifacts": {}}
    for r in wandb_records(run_dir):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run.update(name=r.run.display_name, group=r.run.run_group, tags=list(r.run.tags))
        elif kind == "summary":
            run["summary"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.summary.update})
        elif kind == "history":
            run["history"] |= {i.key or "/".join(i.nested_key) for i in r.history.item}
        elif kind == "artifact":
            run["artifacts"][r.artifact.name] = [m.path for m in r.artifact.manifest.contents]
    return run


def run_cli(monkeypatch, *args) -> int:
    monkeypatch.setattr(sys, "argv", ["run.py", *args])
    GlobalHydra.instance().clear()
    with pytest.raises(SystemExit) as done:
        app.cli()
    GlobalHydra.instance().clear()
    wandb.teardown()  # the wandb service writes the runs' logs: let it finish them before they are read
    return done.value.code


def test_sweep_summary_exit_status_and_wandb_dashboards(tmp_path, monkeypatch):
    checkout = tmp_path / "checkout"  # a second checkout: configs, records and runs all stay inside it
    shutil.copytree(ROOT / "configs", checkout / "configs")
    monkeypatch.chdir(checkout)
    sweep = ["-m", "method=fastv,visiondrop", "budget=50", "limit=2", f"model.pretrained={DEMO_MODEL},/nonexistent",
             "hydra.sweep.dir=sweep"]
    assert run_cli(monkeypatch, *sweep) == 1  # two jobs failed; the others still ran
    summary = (checkout / "sweep" / "summary.txt").read_text()
    assert summary.startswith("4 job(s): 1 ran, 0 skipped as done, 0 skipped as running elsewhere, "
                              "1 skipped as unreachable, 2 failed")
    assert "smallest reachable budget is 144" in summary and "no checkpoint folder at /nonexistent" in summary
    [record] = ResultStore(checkout / "results" / "runs").records()
    assert f"ran                     demo-llava-1.5 / visiondrop / 50 tokens" in summary and record["path"] in summary

    runs = {wandb_run(d)["name"]: wandb_run(d) for d in (checkout / "results" / "wandb").glob("offline-run-*")}
    assert set(runs) == {"demo-llava-1.5 / visiondrop / 50 tokens (ratio 0.087) / limit 2 (partial)",
                         "sweep summary"}  # no run for the unreachable or failed jobs
    job_run = runs["demo-llava-1.5 / visiondrop / 50 tokens (ratio 0.087) / limit 2 (partial)"]
    assert job_run["group"] == "sweep" and job_run["tags"] == ["partial"]
    numbers = {"score", "measured_tokens", "equivalent_tokens", "tflops", "retention_ratio", "samples", "docs",
               "wall_time_s", "throughput_docs_per_s", "partial"}
    assert {f"Demo/{k}" for k in numbers} <= job_run["history"] and job_run["summary"]["Demo/score"] == record["score"]
    assert job_run["summary"]["Demo/position_bias/layer 1"] == record["position_bias"]["layer 1"]
    assert job_run["summary"]["Demo/answers/_type"] == "table-file" and job_run["summary"]["Demo/answers/nrows"] == 2
    assert job_run["artifacts"][f"record-{record['key']}"] == [f"{record['key']}.json",
                                                               f"{record['key']}.positions.json",
                                                               f"{record['key']}.samples.jsonl"]
    dashboard = runs["sweep summary"]
    assert dashboard["group"] == "sweep" and dashboard["summary"]["demo-llava-1.5/table/_type"] == "table-file"
    assert dashboard["summary"]["demo-llava-1.5/Demo vs tokens_table/_type"] == "table-file"  # line_series chart
    assert dashboard["summary"]["demo-llava-1.5/plot/_type"] == "image-file"

    assert run_cli(monkeypatch, *sweep) == 1  # again: the finished job is skipped and creates no wandb run
    assert "1 skipped as done" in (checkout / "sweep" / "summary.txt").read_text()
    assert len(list((checkout / "results" / "wandb").glob("offline-run-*"))) == 3  # + this sweep's summary run
    assert run_cli(monkeypatch, "model.pretrained=/nonexistent") == 1  # a single failed job exits non-zero
    assert run_cli(monkeypatch, f"model.pretrained={DEMO_MODEL}", "limit=2", "budget=50") == 0


def test_configs_come_from_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "no configs/config.yaml in" in run_cli(monkeypatch, "method=none")


def test_malformed_config_is_reported_by_hydra(tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts" / "run.py"), "method=fastvv", f"results_dir={tmp_path}"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "Could not find 'method/fastvv'" in out.stderr and "visiondrop" in out.stderr


def test_next_model_config_runs_a_job_with_ratio_budgets(tmp_path, tiny_next_dir):
    cfg = config(tmp_path, "model=llava-next-7b", f"model.pretrained={tiny_next_dir}", "model.device=cpu",
                 "model.dtype=float32", "method=visiondrop", "budget.ratio=0.111111111")
    [record] = job.run_job(cfg)
    assert record["budget"] == 320.0 and record["model"] == "llava-next-7b"
    # each sample keeps the same share of its own grid's tokens: measured below the nominal 320 for small grids
    assert 0 < record["measured_tokens"] <= 320 and record["tflops"] > 0
    assert record["run_info"]["image_aspect_ratio"] == "none"
    maps = json.loads(Path(record["path"]).with_suffix(".positions.json").read_text())  # per crop of each grid
    assert maps["grid"] == [5, 24] and list(maps["cuts"]) == ["encoder", "layer 8", "layer 16", "layer 24"]
    encoder = maps["cuts"]["encoder"]
    assert encoder["samples"] == 2 and sum(map(sum, encoder["present"][0])) == 2 * 576  # every base crop whole
    assert list(record["position_bias"]) == list(maps["cuts"])
    entries = collect([record], "llava-next-7b", record["benchmark"])
    assert plot_bias_maps(entries, tmp_path / "maps.png", "NeXT").stat().st_size > 10_000  # crops side by side
