"""One job: a (model, method, budget) evaluated on its benchmarks, one stored record per benchmark."""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from importlib.metadata import version
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from ..api import policy_for
from ..models import ModelInfo
from .store import ResultStore

from . import TASKS_DIR

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Budget:
    tokens: float | None  # average visual tokens per decoder layer; None: the full model
    ratio: float | None  # the same as a fraction of the model's visual tokens

    @classmethod
    def resolve(cls, cfg: DictConfig) -> "Budget":
        n_visual = cfg.model.n_visual
        if cfg.method.name == "none":
            return cls(None, 1.0)
        if cfg.budget.ratio is not None:
            if not 0 < cfg.budget.ratio <= 1:
                raise ValueError(f"budget.ratio must be in (0, 1], got {cfg.budget.ratio}")
            return cls(round(cfg.budget.ratio * n_visual, 2), cfg.budget.ratio)
        if cfg.budget.tokens is None:
            return cls(None, 1.0)
        return cls(float(cfg.budget.tokens), cfg.budget.tokens / n_visual)


def project_path(path: str | Path) -> Path:
    path = Path(path)
    return path if path.is_absolute() else ROOT / path


def model_path(cfg: DictConfig) -> str:
    """The checkpoint to load; the tiny demo model is built (seeded, offline) on first use."""
    if cfg.model.pretrained:  # a folder (relative to the project root) or a hub id
        local = project_path(cfg.model.pretrained)
        return str(local) if local.exists() else str(cfg.model.pretrained)
    from ..tiny import build_tiny_llava

    path = project_path(cfg.results_dir).parent / "models" / cfg.model.name
    if not (path / "config.json").exists():
        build_tiny_llava(path, seed=0)
    return str(path)


def versions() -> dict:
    packages = ("torch", "transformers", "lmms_eval", "visiondrop-harness")
    found = {}
    for p in packages:
        try:
            found[p] = version(p)
        except Exception:  # a missing package is recorded as such, never fatal
            found[p] = None
    try:
        found["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                             text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        found["git_commit"] = None
    return found


def checkpoint_fingerprint(path: str) -> str | None:
    """A short hash of a local checkpoint folder (file names, sizes, and the contents of files up to 64 MiB, the
    first and last MiB of larger ones); None for a hub id. Records carry it, so that a checkpoint replaced under
    the same model name is evaluated again instead of reusing the old records."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        size = file.stat().st_size
        digest.update(f"{file.relative_to(folder)}:{size}".encode())
        with open(file, "rb") as f:
            if size <= 64 * 2**20:
                digest.update(f.read())
            else:
                digest.update(f.read(2**20))
                f.seek(-(2**20), os.SEEK_END)
                digest.update(f.read())
    return digest.hexdigest()[:16]


def pending_benchmarks(cfg: DictConfig, store: ResultStore, budget: Budget, checkpoint: str | None) -> list[DictConfig]:
    todo = []
    for bench in cfg.benchmarks:
        where = (cfg.model.name, cfg.method.name, budget.tokens, bench.name)
        if cfg.force or not store.has(*where):
            todo.append(bench)
        elif json.loads(store.path(*where).read_text()).get("checkpoint") != checkpoint:
            log.info("re-run %s / %s / %s / %s: its record comes from another checkpoint", *where)
            todo.append(bench)
        else:
            log.info("skip %s / %s / %s / %s: record exists (force=true re-runs it)", *where)
    return todo


class Unreachable(Exception):
    """This method cannot run at this budget (or with these options) on this model."""


def check_reachable(cfg: DictConfig, path: str, budget: Budget) -> dict:
    """Resolve the policy from the checkpoint's config alone, so unreachable budgets are caught before loading."""
    from transformers import AutoConfig

    info = ModelInfo.from_config(AutoConfig.from_pretrained(path))
    try:
        return policy_for(info, cfg.method.name, budget.tokens, **cfg.method.options).describe()
    except ValueError as err:
        raise Unreachable(str(err)) from None


def local_task(bench: DictConfig, task_manager, folder: Path) -> str:
    """A task that `include:`s the stock one and reads local data (`data` of the benchmark config) instead.

    Checks the local files first, so a wrong path fails at once with the file named rather than deep in `datasets`.
    """
    data = OmegaConf.to_container(bench.data, resolve=True)
    kwargs = data.get("dataset_kwargs", {})
    files = kwargs.get("data_files", {})
    if not isinstance(files, dict):
        raise ValueError(f"benchmark {bench.name}: data.dataset_kwargs.data_files must map the task's split names "
                         f"to files, e.g. {{testdev: /data/gqa/*.parquet}}")
    for split, patterns in files.items():
        patterns = [patterns] if isinstance(patterns, str) else patterns
        for item in patterns:
            if not glob.glob(str(project_path(item))):
                raise FileNotFoundError(f"benchmark {bench.name}: no local data matches {item!r} (set "
                                        "`data.dataset_kwargs.data_files` of this benchmark to existing files)")
        files[split] = [str(project_path(p)) for p in patterns]  # the generated YAML lives elsewhere
    if files:
        data["dataset_kwargs"] = {**kwargs, "data_files": files}
    if bench.task not in task_manager.task_index:
        raise ValueError(f"benchmark {bench.name}: lmms-eval has no task {bench.task!r}")
    name = f"{bench.task}_local"
    spec = {"include": task_manager.task_index[bench.task]["yaml_path"], "task": name, **data}
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    return name


def run_tflops(config, cfg: DictConfig, budget: Budget, text_tokens: float | None) -> float | None:
    """Prefill TFLOPs of one average sample of the run (paper convention, measured text length)."""
    from ..flops import Dims, method_flops

    if text_tokens is None:
        return None  # no sample with an image
    try:
        return method_flops(Dims.from_config(config), cfg.method.name, budget.tokens, round(text_tokens),
                            **cfg.method.options).total / 1e12
    except NotImplementedError as err:  # e.g. a baseline on LLaVA-NeXT, which the FLOPs model does not cover
        log.warning("no FLOPs for this run: %s", err)
        return None


def run_job(cfg: DictConfig, wandb_run=None) -> list[dict]:
    """Evaluate the benchmarks whose records are missing; returns the records written."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from .lmms_model import PrunedLlava

    store = ResultStore(project_path(cfg.results_dir))
    budget = Budget.resolve(cfg)
    path = model_path(cfg)
    checkpoint = checkpoint_fingerprint(path)
    todo = pending_benchmarks(cfg, store, budget, checkpoint)
    if not todo:
        return []
    schedule = check_reachable(cfg, path, budget)
    model = PrunedLlava(pretrained=path, method=cfg.method.name, budget=budget.tokens, batch_size=cfg.batch_size,
                        dtype=cfg.model.dtype, device=cfg.model.device,
                        attn_implementation=cfg.model.attn_implementation,
                        image_aspect_ratio=cfg.model.image_aspect_ratio, conv_template=cfg.model.conv_template,
                        **cfg.method.options)
    include = [str(TASKS_DIR)] + [str(project_path(b.include_path)) for b in todo if b.get("include_path")]
    task_manager = TaskManager(include_path=include)
    with tempfile.TemporaryDirectory(prefix="visiondrop_tasks_") as tmp:  # local-data task overrides
        overrides = Path(tmp)
        tasks = {b.name: local_task(b, task_manager, overrides) if b.get("data") else b.task for b in todo}
        if any(b.get("data") for b in todo):
            task_manager = TaskManager(include_path=include + [str(overrides)])
        written = []
        for bench in todo:
            model.reset_measurements()
            start = time.perf_counter()
            results = simple_evaluate(model=model, tasks=[tasks[bench.name]], task_manager=task_manager,
                                      limit=cfg.limit, bootstrap_iters=0,
                                      datetime_str=datetime.now().strftime("%Y%m%d_%H%M%S"))
            task_results = results["results"][tasks[bench.name]]
            score = task_results.get(f"{bench.metric},none")
            if score is None:
                raise KeyError(f"{bench.task} reported no metric {bench.metric!r}; it reported "
                               f"{sorted(task_results)}: fix `metric` in the benchmarks config")
            info = model.run_info
            record = {
                "model": cfg.model.name, "checkpoint": checkpoint, "method": cfg.method.name, "budget": budget.tokens,
                "retention_ratio": budget.ratio, "benchmark": bench.name, "task": bench.task, "metric": bench.metric,
                "convention": bench.get("convention"), "score": score * bench.get("scale", 100),
                "metrics": task_results, "equivalent_tokens": schedule.get("equivalent_tokens", budget.tokens),
                "measured_tokens": info.get("measured_tokens_mean"), "schedule": schedule,
                "tflops": run_tflops(model.model.config, cfg, budget, info.get("text_tokens_mean")),
                "samples": info.get("samples"), "wall_time_s": time.perf_counter() - start,
                "run_info": info, "versions": versions(), "config": OmegaConf.to_container(cfg, resolve=True),
            }
            store.write(record)
            written.append(record)
            if wandb_run is not None:
                wandb_run.log({f"{bench.name}/score": record["score"], f"{bench.name}/measured_tokens":
                               record["measured_tokens"]})
        return written
