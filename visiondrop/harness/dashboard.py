"""wandb: one run per evaluated job (numbers, per-sample answers, the record as an artifact) and one summary run per
sweep (the results table and the accuracy-versus-tokens plots), grouped by sweep. Offline unless wandb.mode=online.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from .job import project_path
from .store import positions_path, read_records, records_frame
from .tables import build_table, curve_points, flat_table, plot_scores, score_columns

#: the numbers of a record logged per benchmark (history and summary)
NUMBERS = ("score", "budget", "retention_ratio", "measured_tokens", "equivalent_tokens", "tflops", "docs",
           "docs_total", "samples", "wall_time_s", "throughput_docs_per_s", "partial")
PAPER_CSV = "results/paper/paper_tables.csv"


def _init(cfg: DictConfig, **kwargs):
    os.environ.setdefault("WANDB_MODE", cfg.wandb.mode)  # set before import: offline makes no network call
    import wandb

    return wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity, dir=str(project_path(cfg.results_dir).parent),
                      reinit="finish_previous", **kwargs)


def _group() -> str | None:
    hydra_cfg = HydraConfig.get()
    return Path(hydra_cfg.sweep.dir).name if hydra_cfg.mode.name == "MULTIRUN" else None


@contextmanager
def job_run(cfg: DictConfig, label: str) -> Iterator[Callable[[dict, list[dict]], None]]:
    """A run named after the job; yields the function that logs one record and its answers. A failure marks the run
    failed (exit code 1)."""
    import wandb

    run = _init(cfg, group=_group(), name=label, job_type="job", tags=["partial"] if cfg.limit is not None else [],
                config=OmegaConf.to_container(cfg, resolve=True))

    def log_record(record: dict, samples: list[dict]) -> None:
        bench = record["benchmark"]
        run.log({f"{bench}/{k}": record[k] for k in NUMBERS if record.get(k) is not None})
        run.log({f"{bench}/position_bias/{cut}": bias for cut, bias in (record.get("position_bias") or {}).items()})
        if samples:
            columns = list(samples[0])
            run.log({f"{bench}/answers": wandb.Table(columns=columns, data=[[s.get(c) for c in columns]
                                                                           for s in samples])})
        artifact = wandb.Artifact(f"record-{record['key']}", type="record",
                                  metadata={k: record.get(k) for k in ("model", "method", "benchmark", *NUMBERS)})
        for path in (Path(record["path"]), Path(record["path"]).with_suffix(".samples.jsonl"),
                     positions_path(record["path"])):
            if path.exists():
                artifact.add_file(str(path))
        run.log_artifact(artifact)

    try:
        yield log_record
    except BaseException:
        run.finish(exit_code=1)
        raise
    run.finish()


def sweep_run(cfg: DictConfig, group: str, record_paths: list[str]) -> None:
    """The sweep's summary run: per model, the results table (wandb.Table), one accuracy-versus-measured-tokens
    line chart per benchmark and Avg, and the matplotlib figure."""
    import wandb

    frame = records_frame(read_records(record_paths))
    run = _init(cfg, group=group, name=f"{group} summary", job_type="summary")
    paper = project_path(PAPER_CSV)
    for model in dict.fromkeys(frame.model):
        table, note = build_table(frame, paper if paper.exists() else None, model)
        run.log({f"{model}/table": wandb.Table(dataframe=flat_table(table))})
        run.summary[f"{model}/note"] = note
        for column in score_columns(table):
            series = curve_points(table, column)
            if series:
                run.log({f"{model}/{column} vs tokens": wandb.plot.line_series(
                    xs=[rows.x.tolist() for _, rows in series], ys=[rows.y.tolist() for _, rows in series],
                    keys=[method for method, _ in series], title=f"{model}: {column}",
                    xname="measured visual tokens (mean per decoder layer)")})
        png = plot_scores(table, Path(run.dir) / f"{model}.png")
        run.log({f"{model}/plot": wandb.Image(str(png))})
    run.finish()

