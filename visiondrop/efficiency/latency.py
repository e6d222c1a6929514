"""Latency and memory benchmark (the paper's Table 2): random-weight LLaVA architectures, or any checkpoint.

    make table2                                                   # GPU: both 7B models at full width; CPU: below
    python -m visiondrop.efficiency.latency --model llava-1.5-7b --width reduced --methods none visiondrop --budgets 64
    benchmark("llava-1.5-7b", width="reduced", methods=["none", "visiondrop"], budgets=[64]).markdown

Speed does not depend on weight values, so the architectures are built from configs written here (no download)
with random weights, initialised directly on the target device in the target dtype. `--width reduced` (the CPU
default) divides every width by 8 and keeps the depths (CLIP 24 layers, Llama 32 layers) and the 576 visual tokens,
so a CPU run takes minutes (on one thread by default: `benchmark`); `--pretrained PATH` loads a real checkpoint
instead.

Inputs follow the paper's FLOPs convention: BOS and 34 text ids, the image placeholders, then text ids up to 63
non-visual tokens; random pixels (LLaVA-NeXT: one 672x672 image = 5 crops, 2928 placeholders incl. newlines).
Per (method, budget), after `warmup` discarded rounds, `repeats` rounds each time (device synchronised around every
timed region; medians reported):
- prefill: one `model(**inputs, use_cache=True)`, vision tower included, all logits (as the FLOPs count them);
- e2e: greedy `generate` of exactly N new tokens; decode ms/token = (e2e(N) - e2e(1)) / (N - 1), so the prefill
  inside `generate` cancels out;
- overhead: time inside the policy's own `prepare`, `select_encoder`, `select_decoder` during the prefill (its
  scoring rows, top-k, merging), as % of the prefill. Not in it: the engine's mechanics (gathers that apply a
  selection, and the CLS-row recomputation of the encoder cut inside the tower hook: one key projection);
- peak memory: GPU `max_memory_allocated` (weights included) over the measured rounds; CPU the growth of the
  resident set (glibc's free memory trimmed, VmHWM reset through /proc/self/clear_refs, minus VmRSS before),
  or n/a off Linux.
"full" is the stock Hugging Face model (no `apply`), the baseline every speedup is taken against; every other row
runs under `visiondrop.apply(model, method, budget)`. A method that cannot run (not importable yet, budget out of
reach, a model type the engine does not support yet) gets a row saying why.
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import os
import re
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from tqdm import tqdm

from ..families import Shape, TokenIds, family_for
from ..families.llava import LLAVA
from ..families.llava_next import LLAVA_NEXT
from ..families.video_llava import VIDEO_LLAVA
from .flops import TEXT_TOKENS, Dims, method_flops
from ..harness.tables import PAPER_MODELS, method_title
from ..methods import METHODS

PAPER_CSV = Path("results/paper/paper_tables.csv")  # relative to the working directory (the project root)
MODELS = ("llava-1.5-7b", "llava-next-7b", "video-llava-7b")
IMAGE_MODELS = MODELS[:2]  # the paper's efficiency table: what a GPU run builds by default
DEFAULT_METHODS = tuple(METHODS)  # every registered method
DEFAULT_BUDGETS = {"llava-1.5-7b": (64,), "llava-next-7b": (320,), "video-llava-7b": (257,)}  # 257: 12.5% of 2056


#: "reduced" = full / 8 with head dims 64; "tiny" only keeps tests fast. Depths never change.
WIDTHS = {
    "full": Shape(hidden=4096, intermediate=11008, layers=32, heads=32, vision_hidden=1024, vision_intermediate=4096,
                  vision_layers=24, vision_heads=16),
    "reduced": Shape(hidden=512, intermediate=1376, layers=32, heads=8, vision_hidden=128, vision_intermediate=512,
                     vision_layers=24, vision_heads=2),
    "tiny": Shape(hidden=64, intermediate=172, layers=32, heads=2, vision_hidden=32, vision_intermediate=128,
                  vision_layers=24, vision_heads=1),
}
MODEL_FAMILIES = {"llava-1.5-7b": LLAVA, "llava-next-7b": LLAVA_NEXT, "video-llava-7b": VIDEO_LLAVA}
# the llava-hf checkpoints' vocabulary, and a free id for Video-LLaVA's <video> (the LLaVA families ignore it)
LLAVA_HF_IDS = TokenIds(vocab=32064, image=32000, bos=1, eos=2, pad=32001, video=32002)


def build_config(model: str = "llava-1.5-7b", width: str = "full"):
    """The config of llava-hf/llava-1.5-7b-hf (or llava-v1.6-vicuna-7b-hf) at `width`, built by its family."""
    if model not in MODEL_FAMILIES:
        raise ValueError(f"unknown model {model!r}; known: {', '.join(MODELS)}")
    return MODEL_FAMILIES[model].build_config(WIDTHS[width], LLAVA_HF_IDS, norm_eps=1e-5)


def build_model(config, device: torch.device, dtype: torch.dtype, attn: str = "sdpa") -> nn.Module:
    """Random weights, created on `device` in `dtype` (a 7B model never passes through host memory)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = family_for(config).model_class._from_config(config, dtype=dtype, attn_implementation=attn)
    return model.eval()


def load_model(path: str | Path, device: torch.device, dtype: torch.dtype, attn: str = "sdpa") -> nn.Module:
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, attn_implementation=attn,
                                                       device_map=str(device)).eval()


def make_inputs(config, device: torch.device, dtype: torch.dtype, text_tokens: int = TEXT_TOKENS,
                seed: int = 0) -> dict[str, torch.Tensor]:
    """One prompt with random pixels (`Family.example_inputs`), on `device` in `dtype`."""
    inputs = family_for(config).example_inputs(config, text_tokens, torch.Generator().manual_seed(seed))
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}


# -- measuring ------------------------------------------------------------------------------------------------
def _mark(cuda: bool):
    """A point in time: a recorded CUDA event (no host sync) or the host clock."""
    if not cuda:
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def _ms(start, stop) -> float:
    return start.elapsed_time(stop) if isinstance(start, torch.cuda.Event) else (stop - start) * 1e3


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall time of `fn` in ms, the device synchronised before and after."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - start) * 1e3


@contextmanager
def _policy_clock(policy, cuda: bool) -> Iterator[Callable[[], float]]:
    """Time the policy's own calls (instance-level wrappers, removed on exit); yields a reader of the total ms,
    valid once the device has been synchronised."""
    spans: list[tuple] = []
    names = ("prepare", "select_encoder", "select_decoder")
    saved = {name: vars(policy).get(name) for name in names}

    def wrap(fn):
        def timed(*args, **kwargs):
            start = _mark(cuda)
            out = fn(*args, **kwargs)
            spans.append((start, _mark(cuda)))
            return out
        return timed

    for name in names:
        setattr(policy, name, wrap(getattr(policy, name)))
    try:
        yield lambda: sum(_ms(a, b) for a, b in spans)
    finally:
        for name, value in saved.items():
            if value is None:
                delattr(policy, name)
            else:
                setattr(policy, name, value)


class _PeakMemory:
    """Peak memory over a region in MiB: CUDA allocator peak, or growth of the process's resident set on Linux."""

    def __init__(self, device: torch.device):
        self.device, self.base = device, 0

    @staticmethod
    def _status(key: str) -> int:
        match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
        return int(match.group(1)) if match else 0

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, or earlier rows' memory hides growth
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
            self.base = self._status("VmRSS")
        except (OSError, AttributeError):  # not Linux/glibc
            self.base = -1

    def peak(self) -> float | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        return None if self.base < 0 else (self._status("VmHWM") - self.base) / 1024


@dataclass
class Row:
    method: str
    budget: float | None  # None: the full model
    new_tokens: int = 32
    status: str = "ok"
    tflops: float | None = None
    tokens: float | None = None  # measured average visual tokens per decoder layer (the trace)
    samples: dict[str, list[float]] = field(default_factory=dict)  # per measured round, see `measure_once`

    def median(self, key: str) -> float | None:
        values = [v for v in self.samples.get(key, []) if v is not None]
        return statistics.median(values) if values else None

    @property
    def prefill_ms(self) -> float | None:
        return self.median("prefill")

    @property
    def overhead_ms(self) -> float | None:
        return self.median("overhead")

    @property
    def e2e_ms(self) -> float | None:
        return self.median("e2e")

    @property
    def decode_ms(self) -> float | None:
        """Per new token: the medians of generating N and 1 tokens, differenced (the prefill cancels out)."""
        one, many = self.median("e2e_1"), self.e2e_ms
        return None if one is None or many is None else (many - one) / (self.new_tokens - 1)

    @property
    def peak_mib(self) -> float | None:
        values = [v for v in self.samples.get("peak", []) if v is not None]
        return max(values) if values else None


def measure_once(model: nn.Module, inputs: dict, method: str, budget: float | None,
                 new_tokens: int = 32) -> dict[str, float | None]:
    """One round of one (method, budget): prefill, generate 1 and `new_tokens` tokens, peak memory, and the
    measured visual tokens per layer. "none" is the stock model; otherwise the method is applied for the round
    and removed after it. Raises what `apply` raises."""
    from ..api import apply

    device = inputs["input_ids"].device
    eos, pad = model.generation_config.eos_token_id, model.generation_config.pad_token_id
    gen = dict(do_sample=False, pad_token_id=pad if pad is not None else eos)
    memory = _PeakMemory(device)
    out: dict[str, float | None] = {"overhead": None, "tokens": None}

    def prefill() -> None:
        model(**inputs, use_cache=True)

    def generate(n: int) -> None:
        model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, **gen)

    handle = None if method == "none" else apply(model, method, budget)
    try:
        memory.reset()
        if handle is None:
            out["prefill"] = _timed(prefill, device)
        else:
            with _policy_clock(handle.policy, device.type == "cuda") as overhead:
                out["prefill"] = _timed(prefill, device)
                out["overhead"] = overhead()
            counts = handle.trace.tokens_per_layer[0]
            out["tokens"] = sum(counts) / len(counts)
        out["e2e_1"] = _timed(lambda: generate(1), device)
        out["e2e"] = _timed(lambda: generate(new_tokens), device)
        out["peak"] = memory.peak()
    finally:
        if handle is not None:
            handle.remove()
    return out


# -- the benchmark and its table ------------------------------------------------------------------------------
@dataclass
class Result:
    model: str
    title: str
    rows: list[Row]
    markdown: str
    path: Path | None = None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        cpu = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M).group(1).strip()
    except (OSError, AttributeError):
        cpu = "unknown CPU"
    return f"CPU {cpu}, {os.cpu_count()} cores"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def paper_numbers(path: Path = PAPER_CSV) -> dict[tuple[str, str, float], dict[str, float]]:
    """(paper model, paper method, tokens) -> {"TFLOPs", "Latency", "Speedup"} from the Efficiency rows."""
    numbers: dict[tuple[str, str, float], dict[str, float]] = {}
    if path.exists():
        with path.open() as f:
            for r in csv.DictReader(f):
                if r["table"] == "Efficiency":
                    numbers.setdefault((r["model"], r["method"], float(r["tokens"])), {})[r["benchmark"]] = \
                        float(r["value"])
    return numbers


def benchmark(model: str = "llava-1.5-7b", *, width: str | None = None, pretrained: str | Path | None = None,
              device: str | None = None, dtype: str | None = None, methods: Sequence[str] = DEFAULT_METHODS,
              budgets: Sequence[float] | None = None, new_tokens: int = 32, warmup: int = 2,
              repeats: int | None = None, threads: int | None = None, text_tokens: int = TEXT_TOKENS,
              attn: str = "sdpa", out: str | Path | None = "results") -> Result:
    """Measure full and each method at each budget; write `out`/table2_<model>_<device>_<width>.md if `out`.

    Defaults: on a GPU full width, bfloat16, 5 repeats; on a CPU reduced width, float32, 3 repeats, ONE thread
    (stable on a shared machine, where competing threads make multi-threaded timings swing tenfold; the work per
    token, which speedups compare, does not need more).
    """
    if new_tokens < 2:
        raise ValueError("new_tokens must be at least 2 (decode time is the difference of N and 1 new tokens)")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = dev.type == "cuda"
    width = "pretrained" if pretrained else width or ("full" if on_gpu else "reduced")
    torch_dtype = getattr(torch, dtype or ("bfloat16" if on_gpu else "float32"))
    repeats = repeats or (5 if on_gpu else 3)
    budgets = DEFAULT_BUDGETS.get(model, (64,)) if budgets is None else budgets
    threads_before = torch.get_num_threads()
    if not on_gpu:
        torch.set_num_threads(threads or 1)
    threads = torch.get_num_threads()
    load = os.getloadavg()
    try:
        net = load_model(pretrained, dev, torch_dtype, attn) if pretrained \
            else build_model(build_config(model, width), dev, torch_dtype, attn)
        inputs = make_inputs(net.config, dev, torch_dtype, text_tokens)
        rows = [Row("none", None, new_tokens)] + [Row(m, b, new_tokens) for m in methods if m != "none"
                                                  for b in budgets]
        _run(net, inputs, rows, warmup, repeats, desc=f"table2 {model} ({width})")
    finally:
        torch.set_num_threads(threads_before)
    config = net.config
    n_image = inputs["input_ids"].eq(config.image_token_index).sum().item()
    dims = Dims.from_config(config)
    dims = replace(dims, extra_tokens=n_image - dims.n_visual)  # LLaVA-NeXT's row newlines
    for row in rows:
        row.tokens = dims.n_visual if row.method == "none" else row.median("tokens")
        try:
            row.tflops = method_flops(dims, row.method, row.budget, text_tokens).total / 1e12
        except (ValueError, NotImplementedError):
            pass
    label = Path(pretrained).name if pretrained else model
    title = (f"Table 2 (measured): {label}, {'checkpoint ' + str(pretrained) if pretrained else 'random weights'}, "
             f"{width} width (decoder {config.text_config.hidden_size}, vision {config.vision_config.hidden_size}; "
             f"{config.text_config.num_hidden_layers}+{config.vision_config.num_hidden_layers} layers), "
             f"{str(torch_dtype).removeprefix('torch.')}, {attn}, on {device_name(dev)}"
             + ("" if on_gpu else f", {threads} torch thread{'s' * (threads > 1)}") + f"; torch {torch.__version__}; "
             f"{text_tokens} text + {n_image} image tokens; N={new_tokens} new tokens; warm-up {warmup}, "
             f"median of {repeats}; load average {load[0]:.2f} before, {os.getloadavg()[0]:.2f} after")
    md = render(title, rows, model, dev, width, torch_dtype, new_tokens, dims.n_visual)
    path = None
    if out is not None:
        where = _slug(("cuda " if on_gpu else "") + device_name(dev))
        path = Path(out) / f"table2_{_slug(label)}_{where}_{width}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(md)
    return Result(label, title, rows, md, path)


def _run(model: nn.Module, inputs: dict, rows: list[Row], warmup: int, repeats: int, desc: str) -> None:
    """Fill each row's samples. Rounds go over the whole grid, so that a load drifting over minutes (a shared
    machine) hits every row alike; a row whose method cannot run gets its reason as status."""
    with torch.inference_mode(), tqdm(total=(warmup + repeats) * len(rows), desc=desc) as bar:
        for round_ in range(warmup + repeats):
            for row in rows:
                bar.update()
                if row.status != "ok":
                    continue
                try:
                    sample = measure_once(model, inputs, row.method, row.budget, row.new_tokens)
                except TypeError as err:  # the engine rejects the model type
                    row.status = f"not supported yet: {err}"
                except Exception as err:  # noqa: BLE001 - a method that cannot run must not cost the others' rows
                    row.status = f"unavailable: {type(err).__name__}: {err}"
                else:
                    if round_ >= warmup:
                        for key, value in sample.items():
                            row.samples.setdefault(key, []).append(value)


def _fmt(x: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "n/a" if x is None else f"{x:{spec}}{suffix}"


def _range(row: Row, key: str) -> str:
    """' (min-max)' of the measured rounds, so that a reader sees the noise behind a median."""
    values = row.samples.get(key, [])
    return f" ({min(values):.0f}-{max(values):.0f})" if len(values) > 1 else ""


def render(title: str, rows: list[Row], model: str, device: torch.device, width: str, dtype: torch.dtype,
           new_tokens: int, n_visual: int) -> str:
    """The markdown table, the paper's numbers beside, and the efficiency targets that apply to this run."""
    full, paper = rows[0], paper_numbers()
    head = ["method", "budget", "avg visual tokens", "TFLOPs", "FLOPs ratio", "prefill ms", "prefill speedup",
            "speedup / FLOPs ratio", "overhead % prefill", "decode ms/token", f"e2e ms ({new_tokens} tok)",
            "e2e speedup", "peak MiB (allocated)" if device.type == "cuda" else "peak RSS growth MiB",
            "paper TFLOPs", "paper ms", "paper speedup"]
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    checks = []
    for r in rows:
        budget = n_visual if r.budget is None else r.budget
        ref = paper.get((PAPER_MODELS.get(model, ""), method_title(r.method), float(budget)), {})
        ratio = full.tflops / r.tflops if full.tflops and r.tflops else None
        ok = r.status == "ok" and full.status == "ok"
        speedup = full.prefill_ms / r.prefill_ms if ok else None
        e2e = full.e2e_ms / r.e2e_ms if ok else None
        efficiency = speedup / ratio if speedup and ratio else None
        overhead = None if r.overhead_ms is None else 100 * r.overhead_ms / r.prefill_ms
        cells = ["full" if r.method == "none" else r.method, f"{budget:g}", _fmt(r.tokens), _fmt(r.tflops, ".3f"),
                 _fmt(ratio, ".2f", "x")]
        cells += [_fmt(r.prefill_ms) + _range(r, "prefill"), _fmt(speedup, ".2f", "x"), _fmt(efficiency, ".2f"),
                  _fmt(overhead, ".2f"), _fmt(r.decode_ms, ".2f"), _fmt(r.e2e_ms) + _range(r, "e2e"),
                  _fmt(e2e, ".2f", "x"), _fmt(r.peak_mib, ".0f")] if r.status == "ok" else [r.status] + [""] * 7
        cells += [_fmt(ref.get("TFLOPs"), ".2f"), _fmt(ref.get("Latency"), "g"), _fmt(ref.get("Speedup"), ".1f", "x")]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
        if r.method != "none" and r.status == "ok":
            checks += _targets(r, model, device, width, dtype, n_visual, efficiency, overhead, speedup, e2e)
    lines += ["", "Columns: FLOPs by `visiondrop.efficiency.flops.method_flops` on this model's dimensions and token counts; "
              "FLOPs ratio = full / method; times are medians over the rounds, (min-max) beside; prefill = one "
              f"forward with all logits; decode ms/token = (e2e({new_tokens}) - e2e(1)) / {new_tokens - 1}; "
              "overhead = time in the policy's own calls during the prefill; 'full' is the stock model. Paper "
              "columns: LLaVA-7B on the paper's GPU (protocol unknown), shown beside whatever this run measured."]
    if checks:
        lines += ["", "Targets:", *checks]
    return "\n".join(lines) + "\n"


def _targets(r: Row, model: str, device: torch.device, width: str, dtype: torch.dtype, n_visual: int,
             efficiency: float | None, overhead: float | None, speedup: float | None, e2e: float | None) -> list[str]:
    """The issue's targets that apply to this row's setup: CPU reduced width at 576 tokens, budget 64 (every
    method); GPU full width bf16 (VisionDrop 64 on LLaVA-1.5, 320 on LLaVA-NeXT)."""
    if device.type == "cpu" and width != "full" and n_visual == 576 and r.budget == 64:
        return [_check(f"{r.method} 64: prefill speedup / FLOPs ratio", efficiency, 0.70, True),
                _check(f"{r.method} 64: overhead % of the pruned prefill", overhead, 5.0, False)]
    if device.type != "cuda" or width != "full" or dtype != torch.bfloat16 or r.method != "visiondrop":
        return []
    if model == "llava-1.5-7b" and r.budget == 64:
        return [_check("visiondrop 64: e2e speedup", e2e, 2.0, True),
                _check("visiondrop 64: prefill speedup", speedup, 3.0, True)]
    if model == "llava-next-7b" and r.budget == 320:
        return [_check("visiondrop 320: e2e speedup", e2e, 2.7, True)]
    return []


def _check(what: str, value: float | None, bound: float, at_least: bool) -> str:
    if value is None:
        return f"- {what}: n/a"
    met = value >= bound if at_least else value < bound
    return f"- {what}: {value:.2f} ({'>=' if at_least else '<'} {bound:g}: {'met' if met else 'NOT met'})"


def main(argv: Sequence[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(prog="python -m visiondrop.efficiency.latency", description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", choices=MODELS, help="architectures to build (default: both on a GPU, "
                        "llava-1.5-7b on a CPU); with --pretrained: which paper rows to show beside")
    parser.add_argument("--pretrained", help="load this checkpoint instead of random weights")
    parser.add_argument("--width", choices=sorted(WIDTHS), help="default: full on a GPU, reduced on a CPU")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                        help="default: bfloat16 on a GPU, float32 on a CPU")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    parser.add_argument("--budgets", nargs="+", type=float,
                        help="per method (default: 64 for llava-1.5-7b, 320 for llava-next-7b, 257 for video-llava-7b)")
    parser.add_argument("--new-tokens", type=int, default=32, help="N, tokens generated end to end")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, help="default: 5 on a GPU, 3 on a CPU")
    parser.add_argument("--threads", type=int, help="CPU threads (default: 1, see `benchmark`)")
    parser.add_argument("--text-tokens", type=int, default=TEXT_TOKENS)
    parser.add_argument("--attn", default="sdpa", help="attention implementation")
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)
    gpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    models = args.model or (list(IMAGE_MODELS) if gpu and not args.pretrained else ["llava-1.5-7b"])
    budgets = None if args.budgets is None else [int(b) if b.is_integer() else b for b in args.budgets]
    results = []
    for model in models[:1] if args.pretrained else models:
        results.append(benchmark(model, width=args.width, pretrained=args.pretrained, device=args.device,
                                 dtype=args.dtype, methods=args.methods, budgets=budgets, new_tokens=args.new_tokens,
                                 warmup=args.warmup, repeats=args.repeats, threads=args.threads,
                                 text_tokens=args.text_tokens, attn=args.attn, out=args.out))
        print(results[-1].markdown)
    latest = "\n".join(r.markdown for r in results)  # the latest run; every table also kept under its own name
    (Path(args.out) / "table2.md").write_text(latest)
    return results


if __name__ == "__main__":
    main()
