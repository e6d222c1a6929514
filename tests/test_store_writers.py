"""One results store, many writers: claims (a live owner's kept, a dead owner's taken over), processes racing on the
same and on different identities, unreadable record files never counted as done, and SIGTERM ending a job cleanly
so that the same command resumes (a sweep's finished jobs are skipped as done: tests/test_harness.py)."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

from test_harness import DEMO_MODEL, ROOT, config
from test_tables import record, write
from visiondrop.harness import claims, job
from visiondrop.harness.identity import identity_key
from visiondrop.harness.store import ResultStore

FAST = claims.ClaimSettings(heartbeat_s=0.05, stale_after_s=2.0)


def test_a_live_claim_is_kept_and_a_dead_owners_claim_is_taken_over(tmp_path, caplog):
    record_path = tmp_path / "m" / "x" / "b" / "0123.json"
    first = claims.try_claim(record_path, FAST)
    assert first is not None and claims.try_claim(record_path, FAST) is None  # this live process holds it
    assert claims.holder(record_path, FAST)["pid"] == os.getpid()
    mtime = claims.claim_path(record_path).stat().st_mtime
    time.sleep(0.3)
    assert claims.claim_path(record_path).stat().st_mtime > mtime  # the heartbeat touches it
    first.release()
    assert not claims.claim_path(record_path).exists() and not list(tmp_path.rglob("*.json"))

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    claim = claims.claim_path(record_path)
    claim.write_text(json.dumps({"host": socket.gethostname(), "pid": int(gone.stdout), "started": time.time()}))
    with caplog.at_level("WARNING"), claims.try_claim(record_path, FAST) as taken:  # its pid no longer runs
        assert taken is not None and json.loads(claim.read_text())["pid"] == os.getpid()
    assert f"taking over the claim of pid {int(gone.stdout)}" in caplog.text and not claim.exists()

    claim.write_text(json.dumps({"host": "another-node", "pid": 1, "started": time.time()}))
    assert claims.try_claim(record_path, FAST) is None  # another host, heartbeat fresh: alive
    assert claims.holder(record_path, FAST)["host"] == "another-node"
    old = time.time() - 10
    os.utime(claim, (old, old))  # its heartbeat stopped longer ago than stale_after_s
    with claims.try_claim(record_path, FAST) as taken:
        assert taken is not None and json.loads(claim.read_text())["host"] == socket.gethostname()


RACER = """
import sys, time
from pathlib import Path
from visiondrop.harness import claims
path, start = Path(sys.argv[1]), float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))
claim = claims.try_claim(path, claims.ClaimSettings(heartbeat_s=0.1, stale_after_s=30))
print("won" if claim else "lost", flush=True)
time.sleep(3)
if claim:
    claim.release()
"""


def test_processes_racing_for_one_claim_leave_one_winner(tmp_path):
    """Six processes claim at the same instant: one key for four of them (one wins), its own key for two."""
    start = time.time() + 4
    keys = ["same"] * 4 + ["other-1", "other-2"]
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path / f"{k}.json"), str(start)],
                               stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
              for k in keys]
    results = [p.communicate(timeout=120)[0].strip() for p in racers]
    assert sorted(results[:4]) == ["lost", "lost", "lost", "won"] and results[4:] == ["won", "won"]
    assert not list(tmp_path.iterdir())  # every claim released


def test_unreadable_record_files_are_named_never_done_and_never_crash_a_table(tmp_path, caplog):
    store = ResultStore(tmp_path / "runs")
    good = record("visiondrop", 64.0, "GQA", 50.0)
    write(store, good, record("fastv", 64.0, "GQA", 40.0))
    truncated = store.path(good["identity"], good["key"])
    truncated.write_text(truncated.read_text()[:100])  # as a full disk or a killed copy leaves it
    foreign = truncated.parent / "notes.json"
    foreign.write_text(json.dumps(["not", "a", "record"]))
    binary = truncated.parent / "zz.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with caplog.at_level("WARNING"):
        assert [r["method"] for r in store.records()] == ["fastv"]
    for path in (truncated, foreign, binary):
        assert f"{path}: not a" in caplog.text

    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_table.py"), "--records", str(store.root),
                          "--model", "llava-1.5-7b", "--paper", str(ROOT / "results/paper/paper_tables.csv"),
                          "--out", str(tmp_path / "tables")], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"{truncated}: not a readable record" in out.stderr and "FastV" in out.stdout
    assert "VisionDrop" not in out.stdout  # the broken record stands in for nothing


def test_a_broken_record_file_counts_as_not_done(tmp_path):
    cfg = config(tmp_path, f"model.pretrained={DEMO_MODEL}", "budget.tokens=64")
    [(_, identity)] = job.plan_job(cfg).todo
    path = ResultStore(tmp_path / "runs").path(identity, identity_key(identity))
    path.parent.mkdir(parents=True)
    path.write_text('{"model": "demo-llava-1.5", "meth')  # truncated where the job's record belongs
    with job.claimed(job.plan_job(cfg), cfg) as plan:
        assert plan.todo == [(plan.todo[0][0], identity)] and plan.done == []  # evaluated again, not skipped


def run_script(tmp_path, *args, **popen):
    """scripts/run.py on the demo model, its output in a file."""
    log = open(tmp_path / f"log-{time.time_ns()}.txt", "w+")
    command = [sys.executable, str(ROOT / "scripts" / "run.py"), *args, f"model.pretrained={DEMO_MODEL}",
               f"results_dir={tmp_path}/runs"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}, **popen)
    return process, log


def read(log) -> str:
    log.seek(0)
    return log.read()


def test_jobs_racing_on_one_store_evaluate_each_identity_once(tmp_path):
    """Three jobs at once on one results store: two of one identity (one evaluates, the other is skipped as
    running elsewhere, or as done if it came late), one of another identity (evaluated alongside); all exit 0."""
    jobs = [run_script(tmp_path, "limit=6", "budget=64", f"hydra.run.dir={tmp_path}/out{i}")
            for i in range(2)] + [run_script(tmp_path, "limit=6", "budget=32", f"hydra.run.dir={tmp_path}/out2")]
    codes = [p.wait(timeout=600) for p, _ in jobs]
    logs = [read(log) for _, log in jobs]
    assert codes == [0, 0, 0], logs
    statuses = [json.loads((tmp_path / f"out{i}" / "outcome.json").read_text())["status"] for i in range(3)]
    assert sorted(statuses[:2]) in (["elsewhere", "ran"], ["done", "ran"]) and statuses[2] == "ran", logs
    skipped = logs[statuses.index("elsewhere" if "elsewhere" in statuses else "done")]
    assert "skipped as running elsewhere" in skipped or "skipped as done" in skipped
    records = ResultStore(tmp_path / "runs").records()
    assert sorted(r["budget"] for r in records) == [32.0, 64.0]
    assert not [p for p in (tmp_path / "runs").rglob("*") if p.suffix in (".claim", ".tmp", ".takeover")]


def test_sigterm_ends_a_job_cleanly_and_the_same_command_resumes(tmp_path):
    """SIGTERM (Slurm pre-emption) mid-generation: the job stops at once with exit 143, its claim released and no
    record or temporary file left; the same command then evaluates the job."""
    args = ["limit=24", "budget=64", f"hydra.run.dir={tmp_path}/out"]
    process, log = run_script(tmp_path, *args)
    deadline = time.time() + 300
    while "pruned_lvlm generate" not in read(log):
        assert process.poll() is None and time.time() < deadline, read(log)[-3000:]
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 143, read(log)[-3000:]
    assert "terminated by SIGTERM: the finished records are kept; run the same command again to resume" in read(log)
    assert not (tmp_path / "runs").exists() or not [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]

    again, log = run_script(tmp_path, *args)
    assert again.wait(timeout=600) == 0, read(log)[-3000:]
    assert json.loads((tmp_path / "out" / "outcome.json").read_text())["status"] == "ran"
    [record] = ResultStore(tmp_path / "runs").records()
    assert record["docs"] == 24 and record["budget"] == 64.0
    assert not [p for p in (tmp_path / "runs").rglob("*") if p.suffix in (".claim", ".tmp", ".takeover")]
