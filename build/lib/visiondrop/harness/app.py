"""The Hydra app: compose (model, method, budget, benchmarks), run the job, log it to wandb.

    python scripts/run.py method=visiondrop budget=64            # one job
    python scripts/run.py -m method=fastv,visiondrop budget=192,64  # a sweep; finished jobs are skipped
"""
from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from .job import Budget, Unreachable, project_path, run_job

log = logging.getLogger(__name__)
CONFIGS = str(Path(__file__).resolve().parents[2] / "configs")


def _wandb_run(cfg: DictConfig):
    os.environ.setdefault("WANDB_MODE", cfg.wandb.mode)  # set before import: offline makes no network call
    import wandb

    hydra_cfg = HydraConfig.get()
    group = Path(hydra_cfg.sweep.dir).name if hydra_cfg.mode.name == "MULTIRUN" else None
    return wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity, group=group,
                      name=f"{cfg.model.name}/{cfg.method.name}/{cfg.budget.tokens}",
                      dir=str(project_path(cfg.results_dir).parent), config=OmegaConf.to_container(cfg, resolve=True),
                      reinit="finish_previous")


@hydra.main(version_base="1.3", config_path=CONFIGS, config_name="config")
def main(cfg: DictConfig) -> None:
    """One job. A failure is logged and recorded in wandb, and never stops the rest of a sweep."""
    budget = Budget.resolve(cfg)
    label = f"{cfg.model.name} / {cfg.method.name} / budget {budget.tokens or 'full'}"
    run = _wandb_run(cfg)
    try:
        records = run_job(cfg, run)
        log.info("%s: %d benchmark record(s) written", label, len(records))
    except Unreachable as err:  # e.g. FastV below 36 tokens: skip, and say why
        log.warning("%s: skipped: %s", label, err)
        run.summary["skipped"] = str(err)
    except Exception as err:  # noqa: BLE001 - one failed job must not kill a sweep
        log.exception("%s: FAILED: %s", label, err)
        run.summary["failed"] = repr(err)
    finally:
        run.finish()


def quote_budget_choices(argv: list[str]) -> list[str]:
    """Hydra reads `budget=64` as an int, but config-group choices must be strings: quote numeric choices."""
    numeric = re.compile(r"^(budget=)([\d.]+(?:,[\d.]+)*)$")
    return [numeric.sub(lambda m: m[1] + ",".join(f"'{v}'" for v in m[2].split(",")), arg) for arg in argv]


def cli() -> None:
    sys.argv = quote_budget_choices(sys.argv)
    main()


if __name__ == "__main__":
    cli()
