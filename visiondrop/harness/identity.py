"""Run identity: everything that can change a record's number, and the key records are stored and found under.

A job is skipped only when a record with the same key exists, so a quick look (`limit=`), other method options,
preprocessing, dtype, a replaced checkpoint or edited code never stand in for the run asked for. The budget itself is
not part of it: the resolved schedule is, so a ratio and a token budget that resolve to the same schedule are one run.
Nor is the judge of open-ended answers (video QA), on which the answers do not depend: a record the configured judge
has not judged is judged again, not generated again (`job.plan_job`, `judge.judge_record`).
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Iterable

from omegaconf import DictConfig, OmegaConf

import baselines
import visiondrop

#: lmms-eval's seeds, passed explicitly so that they are part of the identity rather than a library default.
SEEDS = {"random_seed": 0, "numpy_random_seed": 1234, "torch_random_seed": 1234, "fewshot_random_seed": 1234}
#: modules that do not score (they present, schedule, time, or make models and data that are fingerprinted
#: themselves): editing them must not invalidate every record.
NOT_SCORING = {"visiondrop/harness/app.py", "visiondrop/harness/dashboard.py", "visiondrop/harness/outcomes.py",
               "visiondrop/harness/store.py", "visiondrop/harness/tables.py",
               "visiondrop/harness/bias_report.py", "visiondrop/efficiency/latency.py",
               "visiondrop/demo/training.py", "visiondrop/demo/synthetic.py", "visiondrop/testing/tiny.py"}


def checkpoint_fingerprint(path: str) -> str | None:
    """A short hash of a local checkpoint folder's files; None for a hub id."""
    folder = Path(path)
    return files_fingerprint(folder, folder.rglob("*")) if folder.is_dir() else None


def data_fingerprint(bench: DictConfig) -> str | None:
    """A short hash of the local data files a benchmark's `data` override points at (None without local files)."""
    files = ((bench.get("data") or {}).get("dataset_kwargs") or {}).get("data_files")
    if not isinstance(files, (dict, DictConfig)):
        return None
    patterns = [p for v in files.values() for p in ([v] if isinstance(v, str) else v)]
    matched = [Path(f) for p in patterns for f in glob.glob(str(Path(p).expanduser().absolute()))]
    return files_fingerprint(Path("/"), matched, whole=2**21)  # datasets can be large: ends of files only


def files_fingerprint(root: Path, files: Iterable[Path], whole: int = 64 * 2**20) -> str:
    """File names (relative to root), sizes, and the contents of files up to `whole` bytes, the first and last MiB
    of larger ones: it changes when a file is replaced."""
    digest = hashlib.sha256()
    for file in sorted(p for p in files if p.is_file()):
        size = file.stat().st_size
        digest.update(f"{file.relative_to(root)}:{size}".encode())
        with open(file, "rb") as f:
            if size <= whole:
                digest.update(f.read())
            else:
                digest.update(f.read(2**20))
                f.seek(-(2**20), os.SEEK_END)
                digest.update(f.read())
    return digest.hexdigest()[:16]


def code_version() -> dict:
    """A hash of the code that scores (engine, methods, plugin, tasks) and the versions of the libraries under it."""
    digest = hashlib.sha256()
    for package in (visiondrop, baselines):
        root = Path(package.__file__).parent
        for file in sorted(root.rglob("*")):
            name = file.relative_to(root.parent).as_posix()
            if file.suffix in (".py", ".yaml", ".parquet") and name not in NOT_SCORING:
                digest.update(name.encode() + file.read_bytes())
    found = {"code": digest.hexdigest()[:16]}
    for package in ("torch", "transformers", "lmms_eval"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def input_options(model: DictConfig) -> dict:
    """The model config's options on how inputs are prepared that are set (Qwen2.5-VL: min_pixels, max_pixels;
    video models: frames sampled per video)."""
    return {k: model[k] for k in ("min_pixels", "max_pixels", "frames") if model.get(k) is not None}


def run_identity(cfg: DictConfig, checkpoint: str, options: dict, schedule: dict, bench: DictConfig) -> dict:
    """Everything that can change the number of `bench` in this job."""
    model = cfg.model
    benchmark = {k: v for k, v in OmegaConf.to_container(bench, resolve=True).items()
                 if k not in ("convention", "unit")}  # how the number is presented, not what it is
    return {
        "model": model.name, "checkpoint": checkpoint, "method": cfg.method.name, "options": options,
        "schedule": schedule, "benchmark": benchmark, "limit": cfg.limit,
        "preprocessing": {"image_aspect_ratio": model.image_aspect_ratio, "conv_template": model.conv_template,
                          **input_options(model)},
        "dtype": model.dtype, "attn_implementation": model.attn_implementation, "device": model.device,
        "local_data": data_fingerprint(bench), "seeds": SEEDS, "versions": code_version(),
    }


def identity_key(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]

