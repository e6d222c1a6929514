"""One job: a (model, method, budget) evaluated on its benchmarks, one stored record per benchmark.

A job claims each record it will write (`harness.claims`), so jobs sharing one store never evaluate one identity
twice: a record another live job holds is left to it (`Plan.elsewhere`). Open-ended answers are stored before they
are judged; a judge fault leaves the record judged part-way and fails the job (`Plan.faults`), and the job again
judges only what is missing.
"""
from __future__ import annotations

import argparse
import glob
import logging
import subprocess
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import yaml
from omegaconf import DictConfig, OmegaConf

from ..methods import Unreachable, method, policy_for
from ..families import family_for
from . import TASKS_DIR
from .claims import ClaimSettings, describe, holder, try_claim
from .judge import Judge, JudgingIncomplete, judge_record, needs_judging
from .judge import configure as configure_judge
from .identity import SEEDS, checkpoint_fingerprint, code_version, identity_key, input_options, run_identity
from .store import ResultStore, judge_label, options_label, read_record, read_samples

log = logging.getLogger(__name__)


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

    def label(self, n_visual: int) -> str:
        """The budget as tokens and as a ratio, e.g. "64 tokens (ratio 0.111)" or "full (576 tokens)"."""
        if self.tokens is None:
            return f"full ({n_visual} tokens)"
        return f"{self.tokens:g} tokens (ratio {self.ratio:.3f})"


def job_label(cfg: DictConfig) -> str:
    """The job as logs, the sweep summary and wandb name it: model / method[options] / budget [/ limit]."""
    options = options_label(OmegaConf.to_container(cfg.method.options, resolve=True))
    parts = [cfg.model.name, cfg.method.name + (f"[{options}]" if options else ""),
             Budget.resolve(cfg).label(cfg.model.n_visual)]
    return " / ".join(parts + ([f"limit {cfg.limit} (partial)"] if cfg.limit is not None else []))


def project_path(path: str | Path) -> Path:
    """Relative paths are taken from the working directory (the checkout you run in), never from the package."""
    return Path(path).expanduser().absolute()


def model_path(cfg: DictConfig) -> str:
    """The checkpoint to load: a local folder or a hub id; the tiny demo model is built (seeded, offline) on use."""
    if cfg.model.pretrained:
        given = str(cfg.model.pretrained)
        local = project_path(given)
        if local.exists():
            return str(local)
        # a hub id is "org/name"; anything else that looks like a path must exist
        if given.startswith((".", "/", "~")) or given.count("/") != 1:
            raise FileNotFoundError(f"model.pretrained: no checkpoint folder at {local} (relative paths are taken "
                                    f"from the working directory, {Path.cwd()}); give an existing folder or a "
                                    "Hugging Face hub id such as llava-hf/llava-1.5-7b-hf")
        return given
    from ..testing.tiny import build_tiny

    path = project_path(cfg.results_dir).parent / "models" / cfg.model.name
    if not (path / "config.json").exists():
        build_tiny("llava", path, seed=0)
    return str(path)


def versions() -> dict:
    """The library versions and code hash of the identity, plus the git commit of the code that ran (informative)."""
    found = code_version()
    try:
        found["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                                             capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        found["git_commit"] = None
    return found


#: `datasets` builders that read local files: a stock task's `dataset_name` (a hub subset) does not apply to them
LOCAL_BUILDERS = ("parquet", "json", "csv", "arrow", "text", "imagefolder")


def resolve_schedule(cfg: DictConfig, path: str, budget: Budget) -> dict:
    """The policy's resolved schedule from the checkpoint's config alone, so unreachable budgets are caught before
    loading. A wrong option name is the caller's mistake, not an unreachable budget: policy_for raises TypeError."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    info = family_for(config).model_info(config)
    options = dict(cfg.method.options)
    try:
        return policy_for(info, cfg.method.name, budget.tokens, **options).describe()
    except ValueError as err:
        raise Unreachable(str(err)) from None


@dataclass
class Plan:
    """What a job will do: the resolved budget, checkpoint and schedule, and per benchmark its identity."""
    budget: Budget
    path: str
    options: dict
    schedule: dict
    todo: list[tuple[DictConfig, dict]]  # (benchmark, identity) without a record
    done: list[Path]  # the records of the benchmarks already evaluated
    judge: Judge | None = None  # the configured judge of open-ended answers (video QA), if any
    rejudge: list[Path] = field(default_factory=list)  # records of `done` whose answers `judge` has not judged
    elsewhere: list[str] = field(default_factory=list)  # benchmarks another live job is evaluating (claimed)
    faults: list[str] = field(default_factory=list)  # judging that stopped part-way (records kept, incomplete)
    #: what the model lacks for the method's defaults, added where the config asks (`example_options`): in the
    #: identity and given to the plugin; the FLOPs count's proxy adds its own
    example_options: dict = field(default_factory=dict)


SET_BY_ENV = ("model", "base_url", "api_key_env")  # judge settings `configure` passes through the environment


def configured_judge(cfg: DictConfig) -> Judge | None:
    """The judge the config (`judge.*`) or the environment sets, put where the tasks read it; a JudgeConfigError
    if it lacks its key."""
    judge = cfg.get("judge") or {}
    configure_judge(judge.get("model"), judge.get("base_url"), judge.get("api_key_env"))  # the key stays in the env
    settings = {f.name: judge[f.name] for f in fields(Judge) if f.name in judge and f.name not in SET_BY_ENV}
    return Judge.from_env(**settings)  # concurrency, max_failures, attempts, timeout_s, ...


def example_options(cfg: DictConfig, path: str) -> dict:
    """What the model at `path` lacks for the method's defaults (`Method.example_options`), where the config does not
    set it: the demo's tiny model has no CLIP text side for CDPruner."""
    from transformers import AutoConfig

    extra = method(cfg.method.name).example_options(AutoConfig.from_pretrained(path))
    return {k: v for k, v in extra.items() if k not in cfg.method.options}


def plan_job(cfg: DictConfig) -> Plan:
    """Resolve everything that identifies the job's records; raises Unreachable for a budget the method cannot reach.

    The judge of open-ended answers is no part of the identity (the answers do not depend on it): a stored record
    that the configured judge has not judged (judged by another, or not at all) is planned for judging again.
    """
    store = ResultStore(project_path(cfg.results_dir))
    budget = Budget.resolve(cfg)
    path = model_path(cfg)
    extra = example_options(cfg, path) if cfg.get("example_options") else {}
    schedule = resolve_schedule(cfg, path, budget)
    options = method(cfg.method.name).resolved_options(
        {**extra, **OmegaConf.to_container(cfg.method.options, resolve=True)})
    checkpoint = checkpoint_fingerprint(path) or path  # a hub id: the name alone
    judged = any(b.get("protocol") == "video-chatgpt" for b in cfg.benchmarks)
    judge = configured_judge(cfg) if judged else None  # fails here without its key, before anything runs
    todo, done, rejudge = [], [], []
    for bench in cfg.benchmarks:
        identity = run_identity(cfg, checkpoint, options, schedule, bench)
        record = store.path(identity, identity_key(identity))
        stored = None if cfg.force else read_record(record)  # an unreadable file is no record: evaluated again
        if stored is not None:
            if judge is not None and needs_judging(stored, judge):
                log.info("judge %s: its record %s is %s, the configured judge is %s (the stored answers are judged, "
                         "not generated again)", bench.name, record, _judged_by(stored), judge_label(judge.describe()))
                rejudge.append(record)
            else:
                log.info("skip %s: an identical record exists, %s (force=true re-runs it)", bench.name, record)
            done.append(record)
        else:
            todo.append((bench, identity))
    return Plan(budget, path, options, schedule, todo, done, judge, rejudge, example_options=extra)


def _judged_by(record: dict) -> str:
    judge = record.get("judge")
    state = (record.get("judging") or {})
    if judge is None:
        return "not judged"
    if state.get("state") == "incomplete":
        return f"judged part-way ({state.get('judged')} of {state.get('answers')}) by {judge_label(judge)}"
    return f"judged by {judge_label(judge)}"


@contextmanager
def claimed(plan: Plan, cfg: DictConfig) -> Iterator[Plan]:
    """Hold the claims of the records the plan will write, released on leaving (however the job ends). A record
    another live job has claimed moves to `plan.elsewhere`; one that another job finished meanwhile, to `done`."""
    settings = ClaimSettings(**cfg.get("claims", {}))
    store = ResultStore(project_path(cfg.results_dir))
    with ExitStack() as held:
        todo, rejudge = [], []
        for bench, identity in plan.todo:
            path = store.path(identity, identity_key(identity))
            if _claim(path, bench.name, plan, settings, held):
                if read_record(path) is not None and not cfg.force:  # finished by another job after planning
                    log.info("skip %s: another job has just written its record %s", bench.name, path)
                    plan.done.append(path)
                else:
                    todo.append((bench, identity))
        for path in plan.rejudge:
            if _claim(path, path.parent.name, plan, settings, held):
                record = read_record(path)
                if record is not None and needs_judging(record, plan.judge):
                    rejudge.append(path)
        plan.todo, plan.rejudge = todo, rejudge
        yield plan


def _claim(path: Path, name: str, plan: Plan, settings: ClaimSettings, held: ExitStack) -> bool:
    claim = try_claim(path, settings)
    if claim is None:
        owner = holder(path, settings)
        plan.elsewhere.append(f"{name} ({describe(owner) if owner else 'claimed by another job'}: {path})")
        log.warning("skip %s: another job is evaluating it, %s", name, plan.elsewhere[-1])
        return False
    held.enter_context(claim)
    return True


def judge_again(plan: Plan, on_record: Callable[[dict, list[dict]], None] | None = None) -> list[dict]:
    """Judge the stored answers of the plan's `rejudge` records with its judge; returns the records rewritten, each
    also shown to `on_record(record, samples)`. A record judged part-way is kept so, its fault in `plan.faults`."""
    records = []
    for path in plan.rejudge:
        records.append(_judge_stored(plan, path))
        if on_record is not None:
            on_record(records[-1], read_samples(path))
    return records


def _judge_stored(plan: Plan, path: Path) -> dict:
    """The stored record at `path` judged by the plan's judge; one judged part-way is kept, its fault noted."""
    try:
        return judge_record(path, plan.judge)
    except JudgingIncomplete as err:
        plan.faults.append(str(err))
        return {**read_record(path), "path": str(path)}


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
    if data.get("dataset_path") in LOCAL_BUILDERS:
        data.setdefault("dataset_name", None)  # the stock task's hub subset names no local file's config
    if bench.task not in task_manager.task_index:
        raise ValueError(f"benchmark {bench.name}: lmms-eval has no task {bench.task!r}")
    name = f"{bench.task}_local"
    spec = {"include": task_manager.task_index[bench.task]["yaml_path"], "task": name, **data}
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    return name


def run_tflops(config, cfg: DictConfig, budget: Budget, text_tokens: float | None) -> float | None:
    """Prefill TFLOPs of one average sample of the run (paper convention, measured text length)."""
    from ..efficiency.flops import method_flops
    from ..families import flops_dims

    if text_tokens is None:
        return None  # no sample with an image
    try:
        return method_flops(flops_dims(config), cfg.method.name, budget.tokens, round(text_tokens),
                            **cfg.method.options).total / 1e12
    except NotImplementedError as err:  # e.g. a baseline on LLaVA-NeXT, which the FLOPs model does not cover
        log.warning("no FLOPs for this run: %s", err)
        return None


def evaluate(cfg: DictConfig, plan: Plan, on_record: Callable[[dict, list[dict]], None] | None = None
             ) -> list[dict]:
    """Evaluate the planned benchmarks and store one record each; `on_record(record, samples)` sees each as written."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from .lmms_model import PrunedLVLM

    store = ResultStore(project_path(cfg.results_dir))
    budget, todo = plan.budget, [bench for bench, _ in plan.todo]
    judge = plan.judge  # configured where the tasks read it, and its key checked, by plan_job
    model = PrunedLVLM(pretrained=plan.path, method=cfg.method.name, budget=budget.tokens, batch_size=cfg.batch_size,
                        dtype=cfg.model.dtype, device=cfg.model.device,
                        attn_implementation=cfg.model.attn_implementation,
                        image_aspect_ratio=cfg.model.image_aspect_ratio, conv_template=cfg.model.conv_template,
                        **input_options(cfg.model), **plan.example_options, **cfg.method.options)
    include = [str(TASKS_DIR)] + [str(project_path(b.include_path)) for b in todo if b.get("include_path")]
    task_manager = TaskManager(include_path=include)
    with tempfile.TemporaryDirectory(prefix="visiondrop_tasks_") as tmp:  # local-data task overrides
        overrides = Path(tmp)
        tasks = {b.name: local_task(b, task_manager, overrides) if b.get("data") else b.task for b in todo}
        if any(b.get("data") for b in todo):
            task_manager = TaskManager(include_path=include + [str(overrides)])
        written = []
        for bench, identity in plan.todo:
            model.reset_measurements()
            start = time.perf_counter()
            task = tasks[bench.name]
            # tasks that write submission files (MMBench, TextVQA, ...) write them beside the record, not in the cwd
            key = identity_key(identity)
            outputs = store.path(identity, key).with_suffix(".outputs")
            cli_args = argparse.Namespace(output_path=str(outputs), process_with_media=True)
            try:
                results = simple_evaluate(model=model, tasks=[task], task_manager=task_manager, limit=cfg.limit,
                                          bootstrap_iters=0, datetime_str=datetime.now().strftime("%Y%m%d_%H%M%S"),
                                          cli_args=cli_args, **SEEDS)
            except SystemExit as stop:  # some stock tasks sys.exit() on a missing file: one failed job, not the sweep
                raise RuntimeError(f"benchmark {bench.name}: lmms-eval task {task!r} stopped: {stop}") from None
            wall = time.perf_counter() - start
            task_results = results["results"][task]
            score = benchmark_score(bench, task_results)
            info, docs = model.run_info, results["n-samples"][task]
            record = {
                "key": key, "created": datetime.now(timezone.utc).isoformat(),
                "model": cfg.model.name, "checkpoint": identity["checkpoint"], "method": cfg.method.name,
                "options": plan.options, "budget": budget.tokens, "retention_ratio": budget.ratio,
                "benchmark": bench.name, "task": bench.task, "metric": bench.metric,
                "convention": bench.get("convention"), "unit": bench.get("unit", "%"), "score": score,
                "metrics": task_results, "equivalent_tokens": plan.schedule.get("equivalent_tokens", budget.tokens),
                "measured_tokens": info.get("measured_tokens_mean"), "schedule": plan.schedule,
                "tflops": run_tflops(model.model.config, cfg, budget, info.get("text_tokens_mean")),
                # docs: questions evaluated of the split's docs_total; samples: model inputs (choices count each)
                "docs": docs["effective"], "docs_total": docs["original"], "limit": cfg.limit,
                "partial": docs["effective"] < docs["original"], "samples": info.get("samples"),
                "wall_time_s": wall, "throughput_docs_per_s": docs["effective"] / wall,
                # per cut: mean kept row / its value under uniform selection (the maps: `<key>.positions.json`)
                "position_bias": model.position_maps.bias(),
                "run_info": info, "versions": versions(), "identity": identity,
                "config": OmegaConf.to_container(cfg, resolve=True),
            }
            samples = [_answer(s, bench.metric) for s in results.get("samples", {}).get(task, [])]
            judged = bench.get("protocol") == "video-chatgpt"  # open-ended answers: stored first, judged after
            if judged:
                record.update(protocol="video-chatgpt", scale=bench.get("scale", 100), judge=None,
                              judging={"state": "unjudged", "judged": 0, "answers": len(samples)})
            record["path"] = str(store.write(record, samples, model.position_maps.to_dict()))
            if judged and judge is not None:
                record = _judge_stored(plan, Path(record["path"]))
                samples = read_samples(record["path"])
            written.append(record)
            if on_record is not None:
                on_record(record, samples)
        return written


def run_job(cfg: DictConfig) -> list[dict]:
    """Plan and evaluate one job without a dashboard; returns the records written (judged again, then evaluated).
    Raises JudgingIncomplete, after everything else ran, if judging stopped part-way (those records are kept)."""
    with claimed(plan_job(cfg), cfg) as plan:
        rejudged = judge_again(plan)
        written = evaluate(cfg, plan) if plan.todo else []
    if plan.faults:
        raise JudgingIncomplete("\n".join(plan.faults))
    return rejudged + written


def benchmark_score(bench: DictConfig, task_results: dict) -> float | None:
    """The benchmark's number: its task's `metric` (or the sum of "a+b", as MME's perception + cognition score)
    times `scale`."""
    parts = bench.metric.split("+")
    missing = [m for m in parts if f"{m},none" not in task_results]
    if missing:
        raise KeyError(f"{bench.task} reported no metric {', '.join(map(repr, missing))}; it reported "
                       f"{sorted(task_results)}: fix `metric` in the benchmarks config")
    values = [task_results[f"{m},none"] for m in parts]
    if any(v is None for v in values):  # answers stored unjudged (video QA without a judge): scripts/judge.py
        return None
    return sum(values) * bench.get("scale", 100)


def _answer(sample: dict, metric: str) -> dict:
    """One evaluated question as stored and shown: its id, the reference, the model's answer and its score (under
    the part of a summed metric that scored it)."""
    response = sample.get("filtered_resps")
    scores = {m: sample[m] for m in metric.split("+") if m in sample} or {metric: None}
    return {"doc_id": sample.get("doc_id"), "target": str(sample.get("target")),
            "response": response[0] if isinstance(response, list) and len(response) == 1 else str(response),
            **scores}
