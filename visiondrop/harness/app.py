"""The Hydra app: compose (model, method, budget, benchmarks), run the job, log it to wandb, say how it ended.

    python scripts/run.py method=visiondrop budget=64            # one job (budget=N is budget.tokens=N)
    python scripts/run.py -m method=fastv,visiondrop budget=192,64  # a sweep; finished jobs are skipped

Configs are read from ./configs (or --config-dir) and relative paths are taken from the working directory.
A job that fails makes the command exit 1; a sweep runs all its jobs first and ends with a summary. A job another
live process is evaluating (same records store) is skipped as running elsewhere, exit status 0. SIGTERM (Slurm
pre-emption, `kill`) ends the job cleanly (claims released, finished records and verdicts kept, exit 143): the same
command again resumes.
"""
from __future__ import annotations

import logging
import re
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from . import outcomes
from ..methods import METHODS
from .job import Unreachable, claimed, evaluate, job_label, judge_again, plan_job
from .store import judge_label
from .outcomes import Outcome

log = logging.getLogger(__name__)


def configs_dir() -> str | None:
    """./configs of the working directory; None leaves it to --config-dir."""
    folder = Path.cwd() / "configs"
    return str(folder) if (folder / "config.yaml").exists() else None


class Terminated(BaseException):
    """SIGTERM arrived: unwinds the job like KeyboardInterrupt (claims released, verdicts so far written), past the
    per-job `except Exception` that would let a sweep go on."""


@contextmanager
def terminate_cleanly() -> Iterator[None]:
    """Turn SIGTERM into Terminated while the job runs (only the main thread can take signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Terminated(f"terminated by {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(cfg: DictConfig) -> Outcome:
    """One job; every failure becomes an outcome (logged), so a sweep goes on with the other jobs."""
    label = cfg.model.name
    try:
        label = job_label(cfg)
        with claimed(plan_job(cfg), cfg) as plan:
            elsewhere = "running elsewhere: " + "; ".join(plan.elsewhere) if plan.elsewhere else ""
            if not plan.todo and not plan.rejudge:
                return Outcome(label, "elsewhere" if plan.elsewhere else "done", reason=elsewhere,
                               records=[str(p) for p in plan.done])
            from .dashboard import job_run

            with job_run(cfg, label) as log_record:
                rejudged = judge_again(plan, log_record)  # stored answers the configured judge has not judged yet
                records = evaluate(cfg, plan, log_record) if plan.todo else []
        paths = [str(p) for p in plan.done] + [r["path"] for r in records]  # done holds the judged again
        if plan.faults:
            return Outcome(label, "failed", reason="; ".join(plan.faults), records=paths)
        reasons = [f"{len(rejudged)} stored record(s) judged again by {judge_label(plan.judge.describe())}, "
                   "answers not generated again"] if rejudged else []
        return Outcome(label, "ran", reason="; ".join(reasons + ([elsewhere] if elsewhere else [])), records=paths)
    except Unreachable as err:  # e.g. FastV below 36 tokens: skipped, and why
        return Outcome(label, "unreachable", reason=str(err))
    except Exception as err:  # noqa: BLE001 - one failed job must not kill a sweep
        log.exception("%s: FAILED", label)
        return Outcome(label, "failed", reason=f"{type(err).__name__}: {err}")


def main(cfg: DictConfig) -> None:
    """Hydra's task function: run the job and leave its outcome where the sweep summary reads it."""
    with terminate_cleanly():
        outcome = run(cfg)
    outcome.write(HydraConfig.get().runtime.output_dir)
    outcomes.SEEN.append(outcome)
    (log.error if outcome.status == "failed" else log.info)("%s", outcomes.summary([outcome]).split("\n", 1)[1])


def budget_arguments(argv: list[str]) -> list[str]:
    """`budget=64` / `budget=192,64` mean tokens: rewrite them to `budget.tokens=...`, so any number works (the
    files in configs/budget/ are named presets, and Hydra would look for `budget/50`)."""
    return [re.sub(r"^budget=([\d.]+(?:,[\d.]+)*)$", r"budget.tokens=\1", arg) for arg in argv]


def register_resolvers() -> None:
    """`${visiondrop.methods:}`: every registered method, comma-separated, for sweeps over all of them."""
    OmegaConf.register_new_resolver("visiondrop.methods", lambda: ",".join(METHODS), replace=True)


def cli() -> None:
    """scripts/run.py: exits 1 if a job failed (the sweep's other jobs still run)."""
    sys.argv = budget_arguments(sys.argv)
    configs = configs_dir()
    if configs is None and not any(a.startswith(("--config-dir", "-cd")) for a in sys.argv):
        sys.exit(f"no configs/config.yaml in {Path.cwd()}: run from the project root, or pass --config-dir")
    outcomes.SEEN.clear()
    register_resolvers()
    try:
        hydra.main(version_base="1.3", config_path=configs, config_name="config")(main)()
    except Terminated as stop:
        log.error("%s: the finished records are kept; run the same command again to resume", stop)
        sys.exit(128 + signal.SIGTERM)
    sys.exit(outcomes.exit_status())
