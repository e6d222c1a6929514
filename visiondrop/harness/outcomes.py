"""What each job did (ran / done / unreachable / failed), and the summary a sweep ends with.

Each job writes `outcome.json` into its Hydra output folder, so the summary reads the same files whichever launcher
ran the jobs (in this process, joblib workers or Slurm); the sweep exits non-zero when any job failed.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

STATUSES = {"ran": "ran", "done": "skipped as done", "elsewhere": "skipped as running elsewhere",
            "unreachable": "skipped as unreachable", "failed": "failed"}
#: the outcomes of this process's last run or sweep: scripts/run.py exits non-zero if one failed
SEEN: list["Outcome"] = []


@dataclass
class Outcome:
    job: str  # e.g. "demo-llava-1.5 / visiondrop / 64 tokens (ratio 0.111)"
    status: str  # a key of STATUSES
    reason: str = ""
    records: list[str] = field(default_factory=list)

    def write(self, folder: str | Path) -> None:
        Path(folder, "outcome.json").write_text(json.dumps(asdict(self), indent=1))


def read_outcomes(sweep_dir: str | Path) -> list[Outcome]:
    return [Outcome(**json.loads(p.read_text())) for p in sorted(Path(sweep_dir).glob("*/outcome.json"),
                                                                  key=lambda p: (len(p.parent.name), p.parent.name))]


def summary(outcomes: list[Outcome]) -> str:
    """Counts per status, then one line per job with its reason and records."""
    counts = ", ".join(f"{sum(o.status == s for o in outcomes)} {label}" for s, label in STATUSES.items())
    lines = [f"{len(outcomes)} job(s): {counts}"]
    for o in outcomes:
        detail = o.reason or ", ".join(o.records)
        lines.append(f"  {STATUSES[o.status]:<23} {o.job}" + (f": {detail}" if detail else ""))
    return "\n".join(lines)


def exit_status() -> int:
    return 1 if any(o.status == "failed" for o in SEEN) else 0


class SweepSummary(Callback):
    """Hydra callback: at the end of a multirun, log the summary, keep it beside the jobs, build the dashboard."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        for stale in Path(config.hydra.sweep.dir).glob("*/outcome.json"):  # a sweep folder used before
            stale.unlink()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        SEEN[:] = read_outcomes(sweep_dir)
        text = summary(SEEN)
        (sweep_dir / "summary.txt").write_text(text + "\n")
        (log.error if exit_status() else log.info)("sweep %s\n%s", sweep_dir, text)
        records = [r for o in SEEN for r in o.records]
        if records:
            from .dashboard import sweep_run

            try:
                sweep_run(config, sweep_dir.name, records)
            except Exception:  # noqa: BLE001 - a dashboard problem must not hide the sweep's outcome
                log.exception("the sweep's wandb summary run failed")
