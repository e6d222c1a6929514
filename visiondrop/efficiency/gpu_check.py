"""`make gpu-check`: everything that needs a GPU, measured by one command within a fixed time (about 8 minutes).

    make gpu-check                                   # on the GPU machine: results/gpu/<gpu-name>/
    python scripts/gpu_check.py --dry-run            # every part at tiny size on the CPU: results/gpu/dry-run/
    python scripts/gpu_check.py --force              # measure again what is already there

Parts, each in a process of its own with its own time cap (a share of `--seconds`), each writing what it finished
as it goes (`<part>.json`), so a part that runs out of time or memory costs only itself; a second run skips the
parts that completed unless `--force`:
- `properties`: the engine's properties in bfloat16 on CUDA (`properties.check_model`) on the tiny model of every
  family (its first registered checkpoint, `families.checkpoints()`: a family joins by registering), every method
  at its contract budget;
- `properties-<model>`: the same once at full width, random weights (LLaVA-1.5-7B);
- `latency-<model>`: for every image family's first checkpoint at full width, random weights in bf16 built on the
  device: `none` and every method at the checkpoint's paper budget (`Checkpoint.budget`), batch sizes 1, 8,
  32 until memory or the cap stops it (`latency._run`); the SDPA kernel torch picked for a padded and an unpadded
  batch; the method's own host syncs (`syncs.policy_syncs`, CUDA's sync debug mode);
- `scaling`: prefill time against visual tokens at batch 8 on LLaVA-NeXT-7B (`latency.scaling`);
then `summary.md` and `summary.png` (Table 2 with the batch axis, the paper's numbers beside) and one headline line.
Only torch's SDPA kernels (no FlashAttention package), the locked stack and the standard library.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import torch

from ..families import checkpoint_config, checkpoints, family_by_type, info_of
from . import latency
from .latency import Row

DRY_RUN = "dry-run"  # the folder of a --dry-run
SECONDS = 450  # the parts' time in all, their processes' starts included: 7.5 minutes, the summary within 8
DRY_RUN_SECONDS = 240  # the dry run's: a few minutes of one core; the caps cut it short on a loaded machine
MIN_CAP = 3  # seconds: a part with less is not started
GRACE = 20  # seconds past its cap before a part's process is stopped (it stops itself at the cap)
BATCH_SIZES = (1, 8, 32)
SCALING_MODEL, SCALING_BATCH = "llava-next-7b", 8
FULL_WIDTH_PROPERTIES = ("llava-1.5-7b",)
#: share of `--seconds` per kind of part; the latency parts split theirs equally
SHARES = {"properties": 0.11, "properties-full": 0.09, "scaling": 0.1, "latency": 0.7}


@dataclass(frozen=True)
class Part:
    name: str
    kind: str  # a key of SHARES
    model: str | None = None


@dataclass(frozen=True)
class Settings:
    """How big a run is: the GPU run, or the dry run's tiny version of every part."""

    dry_run: bool
    device: str
    width: str
    batch_sizes: tuple[int, ...]
    scaling_batch: int
    new_tokens: int
    warmup: int
    repeats: int
    dtype: torch.dtype

    @classmethod
    def make(cls, dry_run: bool) -> "Settings":
        if dry_run:
            return cls(True, "cpu", "tiny", (1, 2), 2, 2, 0, 1, torch.float32)  # CPUs are slow in bf16
        if not torch.cuda.is_available():
            raise SystemExit("gpu-check needs a CUDA GPU (torch.cuda.is_available() is False); on a CPU run it "
                             "with --dry-run, which runs every part at tiny size")
        return cls(False, "cuda", "full", BATCH_SIZES, SCALING_BATCH, 32, 1, 3, torch.bfloat16)

    def methods(self, properties: bool = False) -> list[str]:
        """Every registered method (the dry run: the unpruned engine, one encoder + decoder method and, but for the
        properties, one greedy loop)."""
        from ..methods import METHODS

        if self.dry_run:
            return ["none", "visiondrop"] + ["divprune"] * (not properties)
        return list(METHODS)


def family_models() -> list[str]:
    """The first registered checkpoint of every family (`families.checkpoints()`): a family joins by registering."""
    return list({c.model_type: name for name, c in reversed(checkpoints().items())}.values())[::-1]


def image_models() -> list[str]:
    """Of `family_models`, those whose budgets count an image's tokens (a video model's count frames)."""
    return [m for m in family_models() if not family_by_type(checkpoints()[m].model_type).model_info(
        checkpoint_config(m, "tiny")).video]


def plan() -> list[Part]:
    """The parts in the order they run: the speed measurements first (the question a GPU is lent for), so that
    time lost to an earlier part shortens the properties' caps, not theirs."""
    parts = [Part(f"latency-{m}", "latency", m) for m in image_models()] + [Part("scaling", "scaling", SCALING_MODEL)]
    parts += [Part(f"properties-{m}", "properties-full", m) for m in FULL_WIDTH_PROPERTIES]
    return parts + [Part("properties", "properties")]


def caps(parts: Sequence[Part], seconds: float) -> dict[str, float]:
    """Each part's time cap: its kind's share of `seconds`, split among the parts of that kind."""
    per_kind = {kind: sum(p.kind == kind for p in parts) for kind in SHARES}
    return {p.name: seconds * SHARES[p.kind] / per_kind[p.kind] for p in parts}


def folder_name(dry_run: bool) -> str:
    return DRY_RUN if dry_run else latency._slug(torch.cuda.get_device_name())


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically: a part stopped mid-write leaves its previous file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# -- the parts (each in its own process) ---------------------------------------------------------------------
def run_properties(part: Part, settings: Settings, folder: Path, deadline: float) -> None:
    from ..methods import method
    from .properties import check_model

    models = [part.model] if part.model else family_models()
    width = settings.width if part.model else "tiny"
    device, out = torch.device(settings.device), folder / f"{part.name}.json"
    done: dict[str, Any] = {"complete": False, "dtype": str(settings.dtype).removeprefix("torch."),
                            "device": settings.device, "width": width,
                            "checks": [], "skipped": []}
    for model_name in models:
        if time.monotonic() > deadline:
            done["skipped"].append(f"{model_name}: time cap reached")
            continue
        config = checkpoint_config(model_name, width, init_std=0.2 if width == "tiny" else 0.02)
        model = latency.build_model(config, device, settings.dtype)
        info = info_of(model)
        prompts = [latency.make_inputs(config, device, settings.dtype, n, seed=i)
                   for i, n in enumerate((latency.TEXT_TOKENS, latency.TEXT_TOKENS - 9, latency.TEXT_TOKENS - 17))]
        budget_of = lambda name: method(name).example_budget * info.n_visual / 576  # noqa: E731
        methods = settings.methods(properties=True)
        checks = check_model(model, f"{model_name} ({width})", prompts, methods, budget_of,
                             lambda name: method(name).example_options(config), deadline=deadline)
        done["checks"] += [c.to_json() for c in checks]
        if missing := [m for m in methods if m not in {c.method for c in checks}]:
            done["skipped"].append(f"{model_name}: {', '.join(missing)}: time cap reached")
        _write_json(out, done)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    done["complete"] = not done["skipped"]
    _write_json(out, done)


def sdpa_kernels(model: torch.nn.Module, inputs: dict, method: str, budget: float | None) -> dict[str, dict]:
    """The scaled-dot-product-attention kernels (aten ops, with calls) one prefill runs, for the batch as given
    (unpadded) and with its first sample shortened by left padding."""
    from torch.profiler import ProfilerActivity, profile

    from ..api import apply

    padded = dict(inputs, attention_mask=inputs["attention_mask"].clone())
    padded["attention_mask"][0, :4] = 0  # four pad tokens on the left of sample 0 (its BOS and first text)
    found = {}
    for name, batch in (("unpadded", inputs), ("left-padded", padded)):
        handle = None if method == "none" else apply(model, method, budget)
        try:
            with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
                model(**batch)
        finally:
            if handle is not None:
                handle.remove()
        found[name] = {e.key: e.count for e in prof.key_averages()
                       if "scaled_dot_product" in e.key or "flash_attention" in e.key}
    return found


def run_latency(part: Part, settings: Settings, folder: Path, deadline: float) -> None:
    from .syncs import policy_syncs

    device, dtype = torch.device(settings.device), settings.dtype
    budget = checkpoints()[part.model].budget
    out = folder / f"{part.name}.json"
    started = time.monotonic()
    net = latency.build_model(checkpoint_config(part.model, settings.width), device, dtype, "sdpa")
    done: dict[str, Any] = {"complete": False, "model": part.model, "width": settings.width, "budget": budget,
                            "build_s": time.monotonic() - started, "new_tokens": settings.new_tokens,
                            "rounds": [settings.warmup, settings.repeats], "rows": [], "stopped": None}
    syncs_batch = None
    for batch in settings.batch_sizes:
        rows = [Row(m, None if m == "none" else budget, settings.new_tokens, batch) for m in settings.methods()]
        try:
            inputs = latency.make_inputs(net.config, device, dtype, batch=batch)
        except torch.OutOfMemoryError:
            done["stopped"] = f"batch {batch}: out of memory building the inputs"
            break
        latency._run(net, {batch: inputs}, rows, settings.warmup, settings.repeats,
                     f"gpu-check {part.model} batch {batch}", deadline=deadline)
        n_visual, _, _ = latency.count_flops(net, inputs, rows)
        runs = {r.method for r in rows if r.status == "ok"}  # the methods that ran here (not: a missing weight)
        done["n_visual"] = n_visual
        done["rows"] += [asdict(r) for r in rows]
        if "sdpa_kernels" not in done and time.monotonic() < deadline and batch > 1:
            done["sdpa_kernels"] = {m: sdpa_kernels(net, inputs, m, None if m == "none" else budget)
                                    for m in ("none", "visiondrop")}
            syncs_batch = inputs
        _write_json(out, done)
        statuses = {r.status for r in rows}
        if latency.OUT_OF_MEMORY in statuses or latency.TIME_CAP in statuses:
            done["stopped"] = f"batch {batch}: " + ("out of memory" if latency.OUT_OF_MEMORY in statuses
                                                    else "time cap reached")
            break
        del inputs
    if syncs_batch is not None and time.monotonic() < deadline:
        done["host_syncs"] = {}
        for m in (m for m in settings.methods() if m != "none" and m in runs):
            done["host_syncs"][m] = dict(policy_syncs(net, syncs_batch, m, budget,
                                                      **latency.example_options(m, net)))
    done["complete"] = done["stopped"] is None or "out of memory" in done["stopped"]
    _write_json(out, done)


def run_scaling(part: Part, settings: Settings, folder: Path, deadline: float) -> None:
    points = [p for p in latency.SCALING_POINTS_GPU if p[0] == part.model]
    result = latency.scaling(width=settings.width, device=settings.device, attn="sdpa", points=points,
                             dtype=str(settings.dtype).removeprefix("torch."), warmup=settings.warmup,
                             repeats=settings.repeats, out=folder, batch=settings.scaling_batch, deadline=deadline)
    rows = [{"image": p.image, "visual": p.visual, "crops": p.crops, "full": asdict(p.full),
             "pruned": asdict(p.pruned)} for p in result.points]
    complete = all(p.full.status == "ok" == p.pruned.status for p in result.points)
    _write_json(folder / f"{part.name}.json", {"complete": complete, "model": part.model, "batch":
                                               settings.scaling_batch, "points": rows,
                                               "markdown": result.path.name, "plot": result.plot.name})


RUNNERS = {"properties": run_properties, "properties-full": run_properties, "latency": run_latency,
           "scaling": run_scaling}


# -- the summary ---------------------------------------------------------------------------------------------
def _rows(data: dict) -> list[Row]:
    return [Row(**r) for r in data.get("rows", [])]


def _speedups(rows: list[Row]) -> dict[tuple[str, int], tuple[float | None, float | None, float | None]]:
    """(method, batch) -> (prefill speedup, e2e speedup, speedup / FLOPs ratio) against `none` at that batch."""
    fulls = {r.batch: r for r in rows if r.method == "none" and r.status == "ok"}
    out = {}
    for r in rows:
        full = fulls.get(r.batch)
        if r.status != "ok" or full is None or r.method == "none":
            continue
        prefill = full.prefill_ms / r.prefill_ms if r.prefill_ms else None
        e2e = full.e2e_ms / r.e2e_ms if r.e2e_ms and full.e2e_ms else None
        flops = full.tflops / r.tflops if full.tflops and r.tflops else None
        out[r.method, r.batch] = prefill, e2e, (prefill / flops if prefill and flops else None)
    return out


def summarise(folder: Path, settings: Settings, parts: Sequence[Part], log: dict[str, dict]) -> str:
    """Write summary.md and summary.png from the parts' files; return the headline line."""
    from ..methods import method_title

    fmt = latency._fmt
    paper = latency.paper_numbers()
    where = "the CPU (dry run, tiny width; times mean nothing)" if settings.dry_run else torch.cuda.get_device_name()
    lines = [f"# gpu-check on {where}", "",
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}"
             + (f", CUDA {torch.version.cuda}" if torch.version.cuda else "")
             + f"; {str(settings.dtype).removeprefix('torch.')}; attention: torch SDPA "
             "(no FlashAttention package); random weights built on the device from each checkpoint's config.", "",
             "## Parts", "", "| part | state | seconds | cap s |", "|---|---|---|---|"]
    for p in parts:
        entry = log.get(p.name, {})
        data = _read_json(folder / f"{p.name}.json") or {}
        state = "complete" if data.get("complete") else entry.get("state", "not run")
        if data.get("stopped"):
            state += f" (stopped at {data['stopped']})"
        lines.append(f"| {p.name} | {state} | {fmt(entry.get('seconds'), '.0f')} | {fmt(entry.get('cap'), '.0f')} |")

    headline, table2 = [], []
    for p in (p for p in parts if p.kind == "latency"):
        data = _read_json(folder / f"{p.name}.json")
        if not data:
            continue
        rows, speed = _rows(data), _speedups(_rows(data))
        batches = sorted({r.batch for r in rows})
        lines += ["", f"## {p.model}: every method at {data['budget']:g} tokens, batch sizes "
                  f"{', '.join(map(str, batches))}", "",
                  f"Model built in {data['build_s']:.0f} s; {data['new_tokens']} new tokens end to end; warm-up "
                  f"{data['rounds'][0]}, median of up to {data['rounds'][1]} rounds."
                  + (f" Stopped at {data['stopped']}." if data.get("stopped") else ""), "",
                  "| method | batch | prefill ms | decode ms/token | e2e ms | e2e samples/s | peak GiB | overhead % "
                  "| prefill speedup | e2e speedup | FLOPs ratio | speedup / FLOPs ratio | paper ms | paper speedup |",
                  "|" + "---|" * 14]
        fulls = {r.batch: r for r in rows if r.method == "none"}
        for r in rows:
            pre, e2e, quotient = speed.get((r.method, r.batch), (None, None, None))
            full = fulls.get(r.batch)
            flops = full.tflops / r.tflops if full and full.tflops and r.tflops else None
            budget = data.get("n_visual") if r.method == "none" else r.budget
            ref = paper.get((checkpoints()[p.model].paper or "", method_title(r.method), float(budget or 0)), {}) \
                if r.batch == 1 else {}
            if r.status != "ok":
                cells = [r.status] + [""] * 9
            else:
                cells = [fmt(r.prefill_ms), fmt(r.decode_ms, ".2f"), fmt(r.e2e_ms), fmt(r.e2e_per_s, ".2f"),
                         fmt(None if r.peak_mib is None else r.peak_mib / 1024, ".1f"),
                         fmt(None if r.overhead_ms is None or not r.prefill_ms else 100 * r.overhead_ms / r.prefill_ms,
                             ".2f"), fmt(pre, ".2f", "x"), fmt(e2e, ".2f", "x"), fmt(flops, ".2f", "x"),
                         fmt(quotient, ".2f")]
            lines.append("| " + " | ".join([r.method if r.method != "none" else "full", str(r.batch), *cells,
                                            fmt(ref.get("Latency"), "g"), fmt(ref.get("Speedup"), ".1f", "x")])
                         + " |")
        kernels = data.get("sdpa_kernels")
        if kernels:
            lines += ["", "SDPA kernels of one prefill (aten op: calls): " + "; ".join(
                f"{m} {kind}: {', '.join(f'{k} x{n}' for k, n in ops.items()) or 'none found'}"
                for m, found in kernels.items() for kind, ops in found.items())]
        if data.get("host_syncs") is not None:
            synced = {m: c for m, c in data["host_syncs"].items() if c}
            lines += ["", "Host syncs inside the methods' own calls during one prefill: "
                      + ("none" if not synced else "; ".join(f"{m}: {c}" for m, c in synced.items()))]
        for r in rows:
            if r.method == "visiondrop" and r.batch in (1, batches[-1]):
                pre, e2e, _ = speed.get((r.method, r.batch), (None, None, None))
                budget_ref = paper.get((checkpoints()[p.model].paper or "", "VisionDrop", float(r.budget)), {})
                table2.append((p.model, r.batch, pre, e2e, budget_ref.get("Speedup") if r.batch == 1 else None))
                headline.append(f"{p.model} VisionDrop-{r.budget:g} batch {r.batch}: e2e {fmt(e2e, '.2f', 'x')}"
                                + (f" (paper {budget_ref['Speedup']:.1f}x)" if r.batch == 1 and budget_ref else "")
                                + f", prefill {fmt(pre, '.2f', 'x')}")

    scaling = _read_json(folder / "scaling.json")
    if scaling:
        table, plot = scaling["markdown"], scaling["plot"]
        lines += ["", f"## Scaling: prefill against visual tokens, {scaling['model']} at batch {scaling['batch']}", "",
                  f"Table: [{table}]({table}); plot: [{plot}]({plot})", "",
                  "| visual tokens per sample | full prefill ms | VisionDrop prefill ms | speedup |",
                  "|---|---|---|---|"]
        for point in scaling["points"]:
            full, pruned = Row(**point["full"]), Row(**point["pruned"])
            speed = full.prefill_ms / pruned.prefill_ms if full.prefill_ms and pruned.prefill_ms else None
            lines.append(f"| {point['visual']} | {fmt(full.prefill_ms) if full.status == 'ok' else full.status} | "
                         f"{fmt(pruned.prefill_ms) if pruned.status == 'ok' else pruned.status} | "
                         f"{fmt(speed, '.2f', 'x')} |")

    checks = []
    for p in (p for p in parts if p.kind.startswith("properties")):
        checks += (_read_json(folder / f"{p.name}.json") or {}).get("checks", [])
    if checks:
        from .properties import TOLERANCE

        passed = sum(c["ok"] for c in checks)
        headline.append(f"properties {passed}/{len(checks)} hold")
        lines += ["", f"## Properties in {str(settings.dtype).removeprefix('torch.')}", "",
                  f"Logits within {TOLERANCE:g} x the largest reference logit (SDPA == eager: at least twice the "
                  "stock model's own kernel difference); greedy tokens equal up to the first near tie "
                  "(`visiondrop.efficiency.properties`); `remove()` bit-exact.", "",
                  "| model | property | methods holding | largest logit difference |", "|---|---|---|---|"]
        groups: dict[tuple[str, str], list[dict]] = {}
        for c in checks:
            groups.setdefault((c["model"], c["prop"]), []).append(c)
        for (model, prop), group in groups.items():
            worst = max((c["max_diff"] or 0.0) for c in group)
            lines.append(f"| {model} | {prop} | {sum(c['ok'] for c in group)}/{len(group)} | {worst:.3g} |")
        failed = [c for c in checks if not c["ok"]]
        if failed:
            lines += ["", "Failed:", *[f"- {c['model']} {c['method']} {c['prop']}: {c['detail']}" for c in failed]]

    _plot(folder / "summary.png", folder, parts, where)
    line = f"gpu-check {folder.name}: " + ("; ".join(headline) if headline else "nothing measured yet")
    lines += ["", "![summary](summary.png)", "", line]
    (folder / "summary.md").write_text("\n".join(lines) + "\n")
    return line


def _plot(path: Path, folder: Path, parts: Sequence[Part], where: str) -> None:
    """End-to-end and prefill speedup of every method, per model, one bar per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [(p.model, _read_json(folder / f"{p.name}.json")) for p in parts if p.kind == "latency"]
    models = [(m, d) for m, d in models if d and d.get("rows")]
    fig, axes = plt.subplots(2, max(len(models), 1), figsize=(5 * max(len(models), 1), 7), squeeze=False)
    for col, (model, data) in enumerate(models):
        speed = _speedups(_rows(data))
        methods = list(dict.fromkeys(m for m, _ in speed))
        batches = sorted({b for _, b in speed})
        for row, (index, label) in enumerate(((1, "end-to-end speedup"), (0, "prefill speedup"))):
            ax = axes[row][col]
            width = 0.8 / max(len(batches), 1)
            for i, batch in enumerate(batches):
                values = [speed.get((m, batch), (None, None, None))[index] or 0 for m in methods]
                ax.bar([x + i * width for x in range(len(methods))], values, width, label=f"batch {batch}")
            ax.set_xticks([x + width * (len(batches) - 1) / 2 for x in range(len(methods))], methods, rotation=45,
                          ha="right", fontsize=8)
            ax.axhline(1, color="gray", lw=0.8)
            ax.set_ylabel(label)
            ax.set_title(f"{model}, budget {data['budget']:g}", fontsize=9)
            ax.legend(fontsize=7)
    fig.suptitle(f"gpu-check: speedup against the full model at the same batch size ({where})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- the command ---------------------------------------------------------------------------------------------
def run_part(part: Part, settings: Settings, folder: Path, cap: float, own_process: bool) -> dict[str, Any]:
    """Run one part, in a process of its own that is stopped GRACE seconds past its cap (the GPU run: a part that
    hangs, or leaves the GPU's memory fragmented, costs only itself), or in this one (the dry run: one import of
    torch instead of one per part). Returns its log entry."""
    # the deadline as a wall-clock time, so that the part's cap includes its process's start (importing torch)
    command = [sys.executable, "-m", "visiondrop.efficiency.gpu_check", "--part", part.name, "--folder",
               str(folder), "--until", f"{time.time() + cap:.3f}"] + ["--dry-run"] * settings.dry_run
    started = time.monotonic()
    try:
        if own_process:
            rc = subprocess.run(command, timeout=cap + GRACE).returncode
        else:
            RUNNERS[part.kind](part, settings, folder, started + cap)
            rc = 0
        state = "finished" if rc == 0 else f"failed (exit {rc})"
    except subprocess.TimeoutExpired:
        state = "stopped past its cap"
    data = _read_json(folder / f"{part.name}.json") or {}
    if state == "finished" and not data.get("complete"):
        state = "partial"
    return {"state": state, "seconds": time.monotonic() - started, "cap": cap}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/gpu_check.py", description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="every part at tiny size on the CPU (a few "
                        "minutes), under results/gpu/dry-run/")
    parser.add_argument("--force", action="store_true", help="run the parts that completed before again")
    parser.add_argument("--out", default="results/gpu", help="the results' parent folder")
    parser.add_argument("--seconds", type=float, help=f"the parts' time in all (default {SECONDS}; dry run "
                        f"{DRY_RUN_SECONDS})")
    parser.add_argument("--part", help=argparse.SUPPRESS)  # internal: run this part in this process
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--until", type=float, help=argparse.SUPPRESS)  # the part's deadline, time.time()
    args = parser.parse_args(argv)
    settings = Settings.make(args.dry_run)
    parts = plan()
    if settings.dry_run:
        torch.set_num_threads(1)
    if args.part:
        part = next(p for p in parts if p.name == args.part)
        RUNNERS[part.kind](part, settings, Path(args.folder), time.monotonic() + args.until - time.time())
        return 0
    folder = Path(args.out) / folder_name(settings.dry_run)
    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / "parts.json"
    log = (_read_json(log_path) or {}) if not args.force else {}
    seconds = args.seconds or (DRY_RUN_SECONDS if settings.dry_run else SECONDS)
    end = time.monotonic() + seconds  # a part that overran shortens the later ones' caps, not the total
    for part, cap in caps(parts, seconds).items():
        part = next(p for p in parts if p.name == part)
        if not args.force and (_read_json(folder / f"{part.name}.json") or {}).get("complete"):
            print(f"gpu-check: {part.name} already complete in {folder} (--force runs it again)")
            continue
        cap = min(cap, end - time.monotonic())
        if cap < MIN_CAP:
            log[part.name] = {"state": "not run: no time left", "seconds": 0, "cap": cap}
            _write_json(log_path, log)
            continue
        print(f"gpu-check: {part.name} (cap {cap:.0f} s)", flush=True)
        log[part.name] = run_part(part, settings, folder, cap, own_process=not settings.dry_run)
        _write_json(log_path, log)
    print(summarise(folder, settings, parts, log))
    return 0


if __name__ == "__main__":
    sys.exit(main())
