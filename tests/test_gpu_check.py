"""`make gpu-check` on the CPU: the Makefile's command with --dry-run runs every part at tiny size and writes the
summary a GPU run writes; a second run skips what completed; a part in its own process is stopped at its cap."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from visiondrop.efficiency import gpu_check

ROOT = Path(__file__).resolve().parents[1]


def makefile_command() -> list[str]:
    """The recipe of `make gpu-check`, with this interpreter for $(PY) and no extra arguments."""
    recipe = re.search(r"^gpu-check:.*\n\t(.+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    return recipe.replace("$(PY)", sys.executable).replace("$(GPU_CHECK_ARGS)", "").split()


def run(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run(makefile_command() + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_dry_run_runs_every_part_and_writes_the_summary(tmp_path):
    first = run(["--dry-run", "--out", str(tmp_path)])
    assert first.returncode == 0, first.stderr[-3000:]
    folder = tmp_path / gpu_check.DRY_RUN
    parts = gpu_check.plan()
    assert {p.kind for p in parts} == set(gpu_check.SHARES)
    latency = [p.model for p in parts if p.kind == "latency"]  # every image family's first checkpoint, registry order
    assert latency == gpu_check.image_models() and latency[:3] == ["llava-1.5-7b", "llava-next-7b", "qwen2.5-vl-7b"]
    assert "qwen3-vl-8b" in latency
    log = json.loads((folder / "parts.json").read_text())
    assert set(log) == {p.name for p in parts}
    ran = [p for p in parts if not log[p.name]["state"].startswith("not run")]  # a loaded machine runs out of time
    assert ran[0] == parts[0]
    for part in ran:  # each part wrote what it measured, whatever its state
        data = json.loads((folder / f"{part.name}.json").read_text())
        assert data.get("checks") or data.get("rows") or data.get("points"), part.name
    summary = (folder / "summary.md").read_text()
    headings = {"latency": "## {}: every method at", "scaling": "## Scaling: prefill against visual tokens, {} at "
                "batch 2", "properties": "## Properties in float32", "properties-full": "## Properties in float32"}
    for part in ran:
        assert headings[part.kind].format(part.model) in summary
    assert all(f"| {p.name} | " in summary for p in parts)  # every part's state in the table
    assert "| full | 1 |" in summary and "| 237 | 1.0x |" in summary  # the paper's Table 2 beside, batch 1
    assert "SDPA kernels of one prefill" in summary and "_scaled_dot_product" in summary
    assert (folder / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    headline = first.stdout.strip().splitlines()[-1]
    assert headline.startswith("gpu-check dry-run: llava-1.5-7b VisionDrop-64 batch 1: e2e ")
    assert summary.strip().endswith(headline)

    complete = [p.name for p in ran if json.loads((folder / f"{p.name}.json").read_text())["complete"]]
    assert complete, "no part completed within its cap"
    again = run(["--dry-run", "--out", str(tmp_path), "--seconds", "5"])  # too little time to start a part
    assert again.returncode == 0, again.stderr[-3000:]
    for name in complete:
        assert f"gpu-check: {name} already complete" in again.stdout
    log = json.loads((folder / "parts.json").read_text())
    assert all(log[p.name]["state"] == "not run: no time left" for p in parts if p.name not in complete)


def test_a_part_in_its_own_process_is_stopped_at_its_cap(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "GRACE", 0)
    part = gpu_check.plan()[0]
    entry = gpu_check.run_part(part, gpu_check.Settings.make(True), tmp_path, cap=0.5, own_process=True)
    assert entry["state"] == "stopped past its cap" and entry["seconds"] < 30
