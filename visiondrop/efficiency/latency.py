"""Latency, throughput and memory benchmark (the paper's Table 2, plus a batch axis and a scaling run).

    make table2                                                   # GPU: both 7B models at full width; CPU: below
    python -m visiondrop.efficiency.latency --model llava-1.5-7b --width reduced --methods none visiondrop --budgets 64
    python -m visiondrop.efficiency.latency --batch-sizes 1 8 --methods none visiondrop   # throughput by batch
    python -m visiondrop.efficiency.latency --scaling            # make scaling: cost versus visual tokens
    python -m visiondrop.efficiency.latency --model llava-onevision-0.5b --width tiny --methods prunevid \
        prunevid:prune_cache=false --budgets 1500 --batch-sizes 1 2   # a method's option as a row of its own
    benchmark("llava-1.5-7b", width="reduced", methods=["none", "visiondrop"], budgets=[64]).markdown

Speed does not depend on weight values, so the architectures are built from configs written here (no download)
with random weights, initialised directly on the target device in the target dtype. `--width reduced` (the CPU
default) divides every width by 8 and keeps the depths (CLIP 24 layers, Llama 32 layers) and the 576 visual tokens,
so a CPU run takes minutes (on one thread by default: `benchmark`); `--pretrained PATH` loads a real checkpoint
instead. On a GPU: bfloat16, and FlashAttention 2 where the `flash-attn` package imports, else SDPA.

Inputs follow the paper's FLOPs convention: BOS and 34 text ids, the image placeholders, then text ids up to 63
non-visual tokens; random pixels (LLaVA-NeXT: one 672x672 image = 5 crops, 2928 placeholders incl. newlines). A
batch of B holds B such prompts, each with its own random ids and pixels (same length: no padding).
Per (method, budget, batch size), after `warmup` discarded rounds, `repeats` rounds each time (device synchronised
around every timed region; medians reported):
- prefill: one `model(**inputs, use_cache=True)` on the whole batch, vision tower included, all logits (as the
  FLOPs count them); throughput = B / prefill time;
- e2e: greedy `generate` of exactly N new tokens for the batch; decode ms/token (one step of the whole batch) =
  (e2e(N) - e2e(1)) / (N - 1), so the prefill inside `generate` cancels out; throughput = B / e2e time;
- overhead: time inside the policy's own `prepare`, `select_encoder`, `select_decoder` during the prefill (its
  scoring rows, top-k, merging), and separately the engine's gathers that apply a selection (re-packing the batch
  after a decoder cut, gathering the kept rows of an encoder cut), each as % of the prefill. Not in either: the
  CLS-row recomputation of the encoder cut inside the tower hook (one key projection);
- peak memory: GPU `max_memory_allocated` (weights included) over the measured rounds; CPU the growth of the
  resident set (glibc's free memory trimmed, VmHWM reset through /proc/self/clear_refs, minus VmRSS before),
  or n/a off Linux;
- KV cache: the keys and values the cache holds after the prefill, every layer's (read from the tensors' shapes):
  what a method's decoder cuts and pruned caches (`Policy.pruned_cache_layers`) leave for the decode steps.
"full" is the stock Hugging Face model (no `apply`), the baseline every speedup is taken against, at the same
batch size; every other row runs under `visiondrop.apply(model, method, budget)`, with the options a method is given
as `name:key=value,...` in `methods` (values read as YAML: `prunevid:prune_cache=false`), a row of its own. A method
that cannot run (not importable yet, budget out of reach, a model type the engine does not support yet) gets a row
saying why.

The scaling run (`scaling`) times the prefill and peak memory of the full model and of VisionDrop at one retention
ratio (`apply(..., ratio=)`) while the visual tokens grow: LLaVA-1.5's 576, then LLaVA-NeXT images filling grids of
3, 4 and 5 crops (v1.6's own pinpoints) and larger grids (10 crops; 17 on a GPU), for which the config's grid
pinpoints are extended (the architecture takes any grid; the v1.6 checkpoints know only their five).
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import math
import os
import re
import statistics
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import yaml
from torch import nn
from tqdm import tqdm

from ..engine import decoder as engine_decoder, encoder as engine_encoder
from ..engine.compat import CACHE_ARG, cache_bytes
from ..families import Dims, checkpoint_config, checkpoints, family_by_type, family_for, flops_dims
from .flops import TEXT_TOKENS, method_flops
from ..methods import METHODS, method as registered, method_title

PAPER_CSV = Path("results/paper/paper_tables.csv")  # relative to the working directory (the project root)


def image_models() -> list[str]:
    """The paper's efficiency table (its image models): what a GPU run builds by default."""
    return [name for name, c in checkpoints().items()
            if c.paper and not family_by_type(c.model_type).model_info(checkpoint_config(name, "tiny")).video]

def example_options(method: str, model: nn.Module) -> dict:
    """What a random model lacks for the method's defaults (`Method.example_options`: CDPruner's text side, a
    random tiny CLIP text tower: its few FLOPs are not what is timed)."""
    return registered(method).example_options(model.config)


DEFAULT_BATCH_SIZES = {"cuda": (1, 8, 32), "cpu": (1, 8)}
TIME_CAP = "not measured: time cap reached"  # a row `_run` had no time left for
OUT_OF_MEMORY = "out of memory"
SCALING_RATIO = 64 / 576  # the paper's budget 64 of LLaVA-1.5's 576 tokens (and 320 of NeXT's 2880)
#: the scaling run's images: (model, image (height, width); None = the model's own size)
SCALING_POINTS = (("llava-1.5-7b", None), ("llava-next-7b", (336, 672)), ("llava-next-7b", (1008, 336)),
                  ("llava-next-7b", (672, 672)), ("llava-next-7b", (1008, 1008)))
SCALING_POINTS_GPU = SCALING_POINTS + (("llava-next-7b", (1344, 1344)),)


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


def default_attention(device: torch.device) -> str:
    """FlashAttention 2 on a GPU where the `flash-attn` package imports, else SDPA."""
    from transformers.utils import is_flash_attn_2_available

    return "flash_attention_2" if device.type == "cuda" and is_flash_attn_2_available() else "sdpa"


def make_inputs(config, device: torch.device, dtype: torch.dtype, text_tokens: int = TEXT_TOKENS,
                seed: int = 0, batch: int = 1, image_size: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """`batch` prompts of one layout (`Family.example_inputs`), each with its own random ids and pixels, on
    `device` in `dtype`. image_size: (height, width) where the family's token count depends on it."""
    g = torch.Generator().manual_seed(seed)
    family = family_for(config)
    prompts = [family.example_inputs(config, text_tokens, g, image_size) for _ in range(batch)]
    inputs = {key: torch.cat([prompt[key] for prompt in prompts]) for key in prompts[0]}
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}


def visual_tokens(model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[int, str]:
    """The first sample's visual tokens, found as the engine finds them (`Family.image_token_mask`: every
    modality's placeholders), and their modality: "video" where the family's example is one (`ModelInfo.video`)."""
    family = family_for(model.config)
    count = int(family.image_token_mask(model, inputs["input_ids"][:1], None).sum())
    return count, "video" if family.model_info(model.config).video else "image"


# -- measuring ------------------------------------------------------------------------------------------------
#: "wall": elapsed time; "process": this process's CPU time (CPU runs only: on a shared machine, the work the run
#: did, free of other processes' load; equal to wall time on an idle machine at one thread)
CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def _mark(cuda: bool, clock: str = "wall"):
    """A point in time: a recorded CUDA event (no host sync) or the host clock."""
    if not cuda:
        return CLOCKS[clock]()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def _ms(start, stop) -> float:
    return start.elapsed_time(stop) if isinstance(start, torch.cuda.Event) else (stop - start) * 1e3


def _timed(fn: Callable[[], Any], device: torch.device, clock: str = "wall") -> float:
    """Time of `fn` in ms on `clock`, the device synchronised before and after."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    now = CLOCKS[clock]
    sync()
    start = now()
    fn()
    sync()
    return (now() - start) * 1e3


@contextmanager
def _overhead_clock(policy, cuda: bool, clock: str = "wall") -> Iterator[Callable[[], tuple[float, float]]]:
    """Time the policy's own calls and the engine's gathers that apply its selections (wrappers on the policy
    instance and on the two engine modules' names, removed on exit); yields a reader of the totals in ms
    (policy, gathers), valid once the device has been synchronised. Each call is also a `record_function` range
    (`visiondrop.policy.<name>`, `visiondrop.gathers.<name>`) that torch.profiler shows (`profile_prefill`)."""
    spans: dict[str, list[tuple]] = {"policy": [], "gathers": []}
    wrapped = [(policy, name, "policy") for name in ("prepare", "select_encoder", "select_decoder")]
    wrapped += [(engine_decoder, "apply_selections", "gathers"), (engine_encoder, "gather_rows", "gathers")]
    saved = [(owner, name, vars(owner).get(name)) for owner, name, _ in wrapped]

    def wrap(fn, kind: str):
        def timed(*args, **kwargs):
            start = _mark(cuda, clock)
            with torch.profiler.record_function(f"visiondrop.{kind}.{fn.__name__}"):
                out = fn(*args, **kwargs)
            spans[kind].append((start, _mark(cuda, clock)))
            return out
        return timed

    for owner, name, kind in wrapped:
        setattr(owner, name, wrap(getattr(owner, name), kind))
    try:
        yield lambda: tuple(sum(_ms(a, b) for a, b in spans[kind]) for kind in ("policy", "gathers"))
    finally:
        for owner, name, value in saved:
            if value is None:  # a method of the policy's class: drop the instance attribute
                delattr(owner, name)
            else:
                setattr(owner, name, value)


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
    budget: float | None  # None: the full model, or a `ratio` row
    new_tokens: int = 32  # 0: prefill only
    batch: int = 1
    ratio: float | None = None  # the budget as a retention ratio (`apply(..., ratio=)`)
    options: dict[str, Any] = field(default_factory=dict)  # the method's options (`method_spec`)
    status: str = "ok"
    tflops: float | None = None  # of one sample's prefill
    tokens: float | None = None  # measured average visual tokens per decoder layer (the trace, mean of the batch)
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
    def gathers_ms(self) -> float | None:
        return self.median("gathers")

    @property
    def e2e_ms(self) -> float | None:
        return self.median("e2e")

    @property
    def decode_ms(self) -> float | None:
        """Per decode step of the whole batch: the medians of generating N and 1 tokens, differenced (the prefill
        cancels out)."""
        one, many = self.median("e2e_1"), self.e2e_ms
        return None if one is None or many is None else (many - one) / (self.new_tokens - 1)

    @property
    def prefill_per_s(self) -> float | None:
        """Prefill throughput, samples per second."""
        return None if not self.prefill_ms else self.batch * 1e3 / self.prefill_ms

    @property
    def e2e_per_s(self) -> float | None:
        """End-to-end throughput for N new tokens, samples per second."""
        return None if not self.e2e_ms else self.batch * 1e3 / self.e2e_ms

    @property
    def peak_mib(self) -> float | None:
        values = [v for v in self.samples.get("peak", []) if v is not None]
        return max(values) if values else None

    @property
    def cache_mib(self) -> float | None:
        """The KV cache after the prefill, MiB (the same every round)."""
        return self.median("cache")

    @property
    def label(self) -> str:
        """The method as the table names it: "full", or its name and the options it was given."""
        if self.method == "none":
            return "full"
        return " ".join([self.method, *(f"{k}={v}" for k, v in self.options.items())])


def method_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """A method named for the benchmark, `name` or `name:key=value,...` (values read as YAML), as (name, options)."""
    name, _, given = spec.partition(":")
    options = {}
    for item in filter(None, given.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"give a method's options as name:key=value,key=value; got {item!r} in {spec!r}")
        options[key] = yaml.safe_load(value)
    return name, options


def measure_once(model: nn.Module, inputs: dict, method: str, budget: float | None,
                 new_tokens: int = 32, ratio: float | None = None, clock: str = "wall",
                 options: dict[str, Any] | None = None) -> dict[str, float | None]:
    """One round of one (method with `options`, budget or ratio) on the batch `inputs`: prefill, then (unless
    `new_tokens` is 0) generate 1 and `new_tokens` tokens; peak memory, the KV cache after the prefill (MiB), and the
    measured visual tokens per layer. "none" is the stock model; otherwise the method is applied for the round and
    removed after it. Times on `clock` (`CLOCKS`). Raises what `apply` raises."""
    from ..api import apply

    device = inputs["input_ids"].device
    eos, pad = model.generation_config.eos_token_id, model.generation_config.pad_token_id
    gen = dict(do_sample=False, pad_token_id=pad if pad is not None else eos)
    memory = _PeakMemory(device)
    out: dict[str, float | None] = {"overhead": None, "gathers": None, "tokens": None}

    def prefill() -> None:  # the cache's size from its shapes (no sync), its memory let go at once
        out["cache"] = cache_bytes(getattr(model(**inputs, use_cache=True), CACHE_ARG)) / 2 ** 20

    def generate(n: int) -> None:
        model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, **gen)

    handle = None if method == "none" else apply(model, method, budget, ratio, **example_options(method, model),
                                                 **(options or {}))
    try:
        memory.reset()
        if handle is None:
            out["prefill"] = _timed(prefill, device, clock)
        else:
            with _overhead_clock(handle.policy, device.type == "cuda", clock) as overhead:
                out["prefill"] = _timed(prefill, device, clock)
                out["overhead"], out["gathers"] = overhead()
            out["tokens"] = statistics.mean(handle.trace.mean_tokens)
        if new_tokens:
            out["e2e_1"] = _timed(lambda: generate(1), device, clock)
            out["e2e"] = _timed(lambda: generate(new_tokens), device, clock)
        out["peak"] = memory.peak()
    finally:
        if handle is not None:
            handle.remove()
    return out


def profile_prefill(model: nn.Module, inputs: dict, method: str, budget: float | None, ratio: float | None = None,
                    row_limit: int = 25, options: dict[str, Any] | None = None) -> str:
    """torch.profiler's table of one prefill (after one unprofiled warm-up), ops by self time; under a method the
    policy's calls and the engine's gathers are ranges of their own (`_overhead_clock`), so the table shows what
    they spend and on which ops."""
    from torch.profiler import ProfilerActivity, profile

    from ..api import apply

    cuda = inputs["input_ids"].device.type == "cuda"
    activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda
    handle = None if method == "none" else apply(model, method, budget, ratio, **example_options(method, model),
                                                 **(options or {}))
    try:
        clock = _overhead_clock(handle.policy, cuda) if handle else nullcontext()
        with torch.inference_mode(), clock:
            model(**inputs, use_cache=True)
            with profile(activities=activities) as prof:
                model(**inputs, use_cache=True)
    finally:
        if handle is not None:
            handle.remove()
    events = prof.key_averages()
    total_ms = sum(e.self_device_time_total if cuda else e.self_cpu_time_total for e in events) / 1e3
    ranges = [f"- {e.key}: {e.count} calls, {e.cpu_time_total / 1e3:.1f} ms CPU"
              + (f", {e.device_time_total / 1e3:.1f} ms GPU" if cuda else "") for e in events
              if e.key.startswith("visiondrop.")]
    return "\n".join([f"profiled prefill: {total_ms:.1f} ms of {'GPU' if cuda else 'CPU'} self time in all",
                      *ranges, "", events.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                                                 row_limit=row_limit)])


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


@dataclass(frozen=True)
class Setup:
    """Where and how a run measures: device, dtype, width, attention, repeats and CPU threads."""

    device: torch.device
    dtype: torch.dtype
    width: str
    attn: str
    repeats: int
    clock: str = "wall"

    @classmethod
    def make(cls, device: str | None, dtype: str | None, width: str | None, attn: str | None,
             repeats: int | None, pretrained: str | Path | None = None, clock: str | None = None) -> "Setup":
        """Defaults: on a GPU full width, bfloat16, FlashAttention 2 if importable (else SDPA), 5 repeats; on a
        CPU reduced width, float32, SDPA, 3 repeats; wall-clock time."""
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        gpu = dev.type == "cuda"
        clock = clock or "wall"
        if clock not in CLOCKS or gpu and clock != "wall":
            raise ValueError(f"clock must be one of {', '.join(CLOCKS)} ('process' on a CPU only), got {clock!r}")
        return cls(dev, getattr(torch, dtype or ("bfloat16" if gpu else "float32")),
                   "pretrained" if pretrained else width or ("full" if gpu else "reduced"),
                   attn or default_attention(dev), repeats or (5 if gpu else 3), clock)

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def describe(self, threads: int) -> str:
        return (f"{str(self.dtype).removeprefix('torch.')}, {self.attn}, on {device_name(self.device)}"
                + ("" if self.on_gpu else f", {threads} torch thread{'s' * (threads > 1)}")
                + ("; times are this process's CPU time" if self.clock == "process" else "")
                + f"; torch {torch.__version__}")

    def file_stem(self) -> str:
        return _slug(("cuda " if self.on_gpu else "") + device_name(self.device))


@contextmanager
def _cpu_threads(device: torch.device, threads: int | None) -> Iterator[int]:
    """ONE torch thread on a CPU unless told otherwise (restored after); yields the count in force."""
    before = torch.get_num_threads()
    if device.type != "cuda":
        torch.set_num_threads(threads or 1)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _load_text(load: tuple[float, ...]) -> str:
    return f"load average {load[0]:.2f} before, {os.getloadavg()[0]:.2f} after"


def benchmark(model: str = "llava-1.5-7b", *, width: str | None = None, pretrained: str | Path | None = None,
              device: str | None = None, dtype: str | None = None, methods: Sequence[str] | None = None,
              budgets: Sequence[float] | None = None, batch_sizes: Sequence[int] | None = None,
              new_tokens: int = 32, warmup: int = 2, repeats: int | None = None, threads: int | None = None,
              text_tokens: int = TEXT_TOKENS, attn: str | None = None, out: str | Path | None = "results",
              profile: bool = False, clock: str | None = None) -> Result:
    """Measure full and each method at each budget and batch size; write `out`/table2_<model>_<device>_<width>.md
    if `out`, and with `profile` one profiled prefill per row (`profile_prefill`) beside it, profile_<...>.txt.

    Defaults (`Setup.make`): batch sizes 1, 8, 32 on a GPU, 1 and 8 on a CPU; on a CPU ONE thread (stable on a
    shared machine, where competing threads make multi-threaded timings swing tenfold; the work per token, which
    speedups compare, does not need more).
    """
    if new_tokens < 2:
        raise ValueError("new_tokens must be at least 2 (decode time is the difference of N and 1 new tokens)")
    setup = Setup.make(device, dtype, width, attn, repeats, pretrained, clock)
    dev, torch_dtype = setup.device, setup.dtype
    batch_sizes = tuple(batch_sizes or DEFAULT_BATCH_SIZES.get(dev.type, (1,)))
    if min(batch_sizes) < 1 or len(set(batch_sizes)) != len(batch_sizes):
        raise ValueError(f"batch sizes must be distinct positive integers, got {list(batch_sizes)}")
    if budgets is None:  # the checkpoint's paper budget (a --pretrained folder of another name: 64)
        budgets = (checkpoints()[model].budget,) if model in checkpoints() else (64,)
    methods = list(METHODS) if methods is None else methods  # every registered method
    load = os.getloadavg()
    with _cpu_threads(dev, threads) as n_threads:
        net = load_model(pretrained, dev, torch_dtype, setup.attn) if pretrained \
            else build_model(checkpoint_config(model, setup.width), dev, torch_dtype, setup.attn)
        inputs = {b: make_inputs(net.config, dev, torch_dtype, text_tokens, batch=b) for b in batch_sizes}
        specs = [method_spec(m) for m in methods if m != "none"]
        rows = [Row(m, b, new_tokens, batch, options=o) for batch in batch_sizes
                for m, o, b in [("none", {}, None)] + [(m, o, b) for m, o in specs for b in budgets]]
        _run(net, inputs, rows, warmup, setup.repeats, f"table2 {model} ({setup.width})", setup.clock)
        profiles = [f"## {r.label} {'' if r.budget is None else f'{r.budget:g} '}at batch {r.batch}\n\n"
                    + profile_prefill(net, inputs[r.batch], r.method, r.budget, r.ratio, options=r.options)
                    for r in rows if profile and r.status == "ok"]
    config = net.config
    n_visual, modality, dims = count_flops(net, inputs[batch_sizes[0]], rows, text_tokens)
    label = Path(pretrained).name if pretrained else model
    title = (f"Table 2 (measured): {label}, {'checkpoint ' + str(pretrained) if pretrained else 'random weights'}, "
             f"{setup.width} width (decoder {config.text_config.hidden_size}, vision {config.vision_config.hidden_size}; "
             f"{config.text_config.num_hidden_layers}+{config.vision_config.num_hidden_layers} layers), "
             f"{setup.describe(n_threads)}; {text_tokens} text + {n_visual} {modality} tokens per sample; batch sizes "
             f"{', '.join(map(str, batch_sizes))}; N={new_tokens} new tokens; warm-up {warmup}, median of "
             f"{setup.repeats}; {_load_text(load)}")
    md = render(title, rows, model, dev, setup.width, torch_dtype, new_tokens, dims.n_visual)
    path = None
    if out is not None:
        path = Path(out) / f"table2_{_slug(label)}_{setup.file_stem()}_{setup.width}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(md)
        if profiles:
            path.with_name(path.name.replace("table2_", "profile_", 1)).with_suffix(".txt").write_text(
                f"# torch.profiler, one prefill per row: {title}\n\n" + "\n\n".join(profiles))
    return Result(label, title, rows, md, path)


def count_flops(model: nn.Module, inputs: dict, rows: list[Row], text_tokens: int = TEXT_TOKENS,
                ) -> tuple[int, str, Dims]:
    """Fill each row's FLOPs of one sample's prefill and its visual tokens (the model's, or the trace's measured
    mean); returns the visual tokens of a sample of `inputs`, their modality and the FLOPs dimensions."""
    n_visual, modality = visual_tokens(model, inputs)
    dims = flops_dims(model.config)
    dims = replace(dims, extra_tokens=n_visual - dims.n_visual)  # LLaVA-NeXT's row newlines
    for row in rows:
        row.tokens = dims.n_visual if row.method == "none" else row.median("tokens")
        try:
            row.tflops = method_flops(dims, row.method, row.budget, text_tokens, **row.options).total / 1e12
        except (ValueError, NotImplementedError):
            pass
    return n_visual, modality, dims


def _run(model: nn.Module, inputs: dict[int, dict], rows: list[Row], warmup: int, repeats: int, desc: str,
         clock: str = "wall", deadline: float | None = None) -> None:
    """Fill each row's samples, on the inputs of its batch size. Rounds go over the whole grid, so that a load
    drifting over minutes (a shared machine) hits every row alike; a row whose method cannot run gets its reason
    as status. Past `deadline` (`time.monotonic()`) nothing more is measured: rows keep the rounds they have, and
    a row with none says so."""
    with torch.inference_mode(), tqdm(total=(warmup + repeats) * len(rows), desc=desc) as bar:
        for round_ in range(warmup + repeats):
            for row in rows:
                bar.update()
                if deadline is not None and time.monotonic() > deadline and row.status == "ok":
                    if "prefill" not in row.samples:
                        row.status = TIME_CAP
                    continue
                if row.status != "ok":
                    continue
                try:
                    sample = measure_once(model, inputs[row.batch], row.method, row.budget, row.new_tokens,
                                          row.ratio, clock, row.options)
                except TypeError as err:  # the engine rejects the model type
                    row.status = f"not supported yet: {err}"
                except torch.OutOfMemoryError:
                    row.status = OUT_OF_MEMORY
                    torch.cuda.empty_cache()  # the next rows start from the weights alone
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


def _share(part: float | None, whole: float | None) -> float | None:
    return None if part is None or not whole else 100 * part / whole


def render(title: str, rows: list[Row], model: str, device: torch.device, width: str, dtype: torch.dtype,
           new_tokens: int, n_visual: int) -> str:
    """The markdown table, the paper's numbers beside (batch 1), and the efficiency targets that apply."""
    fulls, paper = {r.batch: r for r in rows if r.method == "none"}, paper_numbers()
    head = ["method", "budget", "batch", "avg visual tokens", "TFLOPs", "FLOPs ratio", "prefill ms",
            "prefill samples/s", "prefill speedup", "speedup / FLOPs ratio", "overhead % prefill",
            "gathers % prefill", "decode ms/token", f"e2e ms ({new_tokens} tok)", "e2e samples/s", "e2e speedup",
            "peak MiB (allocated)" if device.type == "cuda" else "peak RSS growth MiB", "KV cache MiB",
            "paper TFLOPs", "paper ms", "paper speedup"]
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    checks = []
    for r in rows:
        full = fulls[r.batch]
        budget = n_visual if r.budget is None else r.budget
        ref = paper.get((checkpoints()[model].paper if model in checkpoints() else "", method_title(r.method), float(budget)), {}) \
            if r.batch == 1 else {}
        ratio = full.tflops / r.tflops if full.tflops and r.tflops else None
        ok = r.status == "ok" and full.status == "ok"
        speedup = full.prefill_ms / r.prefill_ms if ok else None
        e2e = full.e2e_ms / r.e2e_ms if ok else None
        efficiency = speedup / ratio if speedup and ratio else None
        overhead, gathers = _share(r.overhead_ms, r.prefill_ms), _share(r.gathers_ms, r.prefill_ms)
        cells = [r.label, f"{budget:g}", str(r.batch), _fmt(r.tokens),
                 _fmt(r.tflops, ".3f"), _fmt(ratio, ".2f", "x")]
        cells += [_fmt(r.prefill_ms) + _range(r, "prefill"), _fmt(r.prefill_per_s, ".2f"), _fmt(speedup, ".2f", "x"),
                  _fmt(efficiency, ".2f"), _fmt(overhead, ".2f"), _fmt(gathers, ".2f"), _fmt(r.decode_ms, ".2f"),
                  _fmt(r.e2e_ms) + _range(r, "e2e"), _fmt(r.e2e_per_s, ".2f"), _fmt(e2e, ".2f", "x"),
                  _fmt(r.peak_mib, ".0f"), _fmt(r.cache_mib, ".2f")] if r.status == "ok" else [r.status] + [""] * 11
        cells += [_fmt(ref.get("TFLOPs"), ".2f"), _fmt(ref.get("Latency"), "g"), _fmt(ref.get("Speedup"), ".1f", "x")]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
        if r.method != "none" and r.status == "ok":
            checks += _targets(r, model, device, width, dtype, n_visual, efficiency, overhead, speedup, e2e)
    lines += ["", "Columns: FLOPs (of one sample's prefill) by `visiondrop.efficiency.flops.method_flops` on this "
              "model's dimensions and token counts; FLOPs ratio = full / method; times are per batch, medians over "
              "the rounds, (min-max) beside; prefill = one forward of the batch with all logits; samples/s = batch "
              f"/ time; decode ms/token = (e2e({new_tokens}) - e2e(1)) / {new_tokens - 1}, one step of the whole "
              "batch; speedups against 'full' (the stock model) at the same batch size; overhead = time in the "
              "policy's own calls during the prefill, gathers = the engine's applying of its selections; KV cache "
              "= the keys and values cached after the prefill, all layers. Paper "
              "columns (batch 1 only): LLaVA-7B on the paper's GPU (protocol unknown), shown beside whatever this "
              "run measured."]
    if checks:
        lines += ["", "Targets:", *checks]
    return "\n".join(lines) + "\n"


def _targets(r: Row, model: str, device: torch.device, width: str, dtype: torch.dtype, n_visual: int,
             efficiency: float | None, overhead: float | None, speedup: float | None, e2e: float | None) -> list[str]:
    """The issues' targets that apply to this row's setup: CPU reduced width at 576 tokens, budget 64 (every
    method at batch 1; VisionDrop at batch 8); GPU full width bf16 at batch 1 (VisionDrop 64 on LLaVA-1.5, 320 on
    LLaVA-NeXT)."""
    at = f"{r.method} {r.budget:g} (batch {r.batch})"
    if device.type == "cpu" and width != "full" and n_visual == 576 and r.budget == 64:
        if r.batch == 1:
            return [_check(f"{at}: prefill speedup / FLOPs ratio", efficiency, 0.70, True),
                    _check(f"{at}: overhead % of the pruned prefill", overhead, 5.0, False)]
        if r.batch == 8 and r.method == "visiondrop":
            return [_check(f"{at}: prefill throughput speedup / FLOPs ratio", efficiency, 0.90, True)]
        return []
    if device.type != "cuda" or width != "full" or dtype != torch.bfloat16 or r.method != "visiondrop" \
            or r.batch != 1:
        return []
    if model == "llava-1.5-7b" and r.budget == 64:
        return [_check(f"{at}: e2e speedup", e2e, 2.0, True), _check(f"{at}: prefill speedup", speedup, 3.0, True)]
    if model == "llava-next-7b" and r.budget == 320:
        return [_check(f"{at}: e2e speedup", e2e, 2.7, True)]
    return []


def _check(what: str, value: float | None, bound: float, at_least: bool) -> str:
    if value is None:
        return f"- {what}: n/a"
    met = value >= bound if at_least else value < bound
    return f"- {what}: {value:.2f} ({'>=' if at_least else '<'} {bound:g}: {'met' if met else 'NOT met'})"


# -- the scaling run ------------------------------------------------------------------------------------------
@dataclass
class ScalingPoint:
    """One image size: its visual tokens (placeholders of one sample) and crops, and the rows measured on it."""

    model: str
    image: tuple[int, int] | None
    visual: int
    crops: int
    full: Row
    pruned: Row


@dataclass
class ScalingResult:
    title: str
    points: list[ScalingPoint]
    markdown: str
    path: Path | None = None
    plot: Path | None = None


def scaling(*, width: str | None = None, device: str | None = None, dtype: str | None = None,
            ratio: float = SCALING_RATIO, points: Sequence[tuple[str, tuple[int, int] | None]] | None = None,
            warmup: int = 1, repeats: int | None = None, threads: int | None = None, text_tokens: int = TEXT_TOKENS,
            attn: str | None = None, out: str | Path | None = "results/latency", clock: str | None = None,
            batch: int = 1, deadline: float | None = None) -> ScalingResult:
    """Prefill time and peak memory (of `batch` prompts) of the full model and of VisionDrop at retention `ratio` at
    each (model, image size) of `points` (default SCALING_POINTS; on a GPU also a 4x4 grid); writes
    `out`/scaling_<device>_<width>.md and .png if `out`. Past `deadline` (`time.monotonic()`), the rows not yet
    measured say so (`_run`)."""
    setup = Setup.make(device, dtype, width, attn, repeats, clock=clock)
    points = tuple(points or (SCALING_POINTS_GPU if setup.on_gpu else SCALING_POINTS))
    load = os.getloadavg()
    measured: list[ScalingPoint] = []
    with _cpu_threads(setup.device, threads) as n_threads:
        for model in dict.fromkeys(m for m, _ in points):  # one model per architecture, built once
            sizes = [size for m, size in points if m == model]
            config = checkpoint_config(model, setup.width)
            pinpoints = getattr(config, "image_grid_pinpoints", None)
            if pinpoints is not None:  # grids beyond the checkpoints' own (the architecture takes any grid)
                config.image_grid_pinpoints = pinpoints + [list(s) for s in sizes if s and list(s) not in pinpoints]
            net = build_model(config, setup.device, setup.dtype, setup.attn)
            for size in sizes:
                inputs = make_inputs(config, setup.device, setup.dtype, text_tokens, batch=batch, image_size=size)
                rows = [Row("none", None, 0, batch), Row("visiondrop", None, 0, batch, ratio=ratio)]
                pixels = next(v for k, v in inputs.items() if k.startswith("pixel_values"))  # images or videos
                visual, _ = visual_tokens(net, inputs)
                _run(net, {batch: inputs}, rows, warmup, setup.repeats, f"scaling {model} {visual} tokens",
                     setup.clock, deadline)
                rows[0].tokens, rows[1].tokens = visual, rows[1].median("tokens")
                measured.append(ScalingPoint(model, size, visual, pixels.shape[1] if pixels.dim() == 5 else 1,
                                             *rows))
            del net
    prompts = "one sample" if batch == 1 else f"a batch of {batch}"
    title = (f"Scaling (measured): prefill of {prompts} versus the visual tokens per sample, full and VisionDrop at "
             f"retention ratio {ratio:.4g}; random weights, {setup.width} width; {setup.describe(n_threads)}; {text_tokens} "
             f"text tokens; warm-up {warmup}, median of {setup.repeats}; {_load_text(load)}")
    md = render_scaling(title, measured, setup.device)
    result = ScalingResult(title, measured, md)
    if out is not None:
        stem = Path(out) / f"scaling_{setup.file_stem()}_{setup.width}"
        stem.parent.mkdir(parents=True, exist_ok=True)
        result.path, result.plot = stem.with_suffix(".md"), stem.with_suffix(".png")
        result.path.write_text(md)
        plot_scaling(measured, ratio, result.plot, setup.device, f"{setup.width} width, {device_name(setup.device)}")
    return result


def _slope(points: list[ScalingPoint], value: Callable[[ScalingPoint], float | None]) -> float | None:
    """The least-squares slope of log(value) over log(visual tokens): cost grows as tokens^slope."""
    pairs = [(math.log(p.visual), math.log(v)) for p in points if (v := value(p)) and v > 0]
    if len(pairs) < 2:
        return None
    mx, my = statistics.mean(x for x, _ in pairs), statistics.mean(y for _, y in pairs)
    return sum((x - mx) * (y - my) for x, y in pairs) / sum((x - mx) ** 2 for x, _ in pairs)


def render_scaling(title: str, points: list[ScalingPoint], device: torch.device) -> str:
    memory = "peak MiB (allocated)" if device.type == "cuda" else "peak RSS growth MiB"
    head = ["model", "image", "crops", "visual tokens", "full prefill ms", "VisionDrop prefill ms",
            "VisionDrop avg visual tokens", "prefill speedup", f"full {memory}", f"VisionDrop {memory}"]
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in points:
        image = "native" if p.image is None else f"{p.image[0]}x{p.image[1]}"
        cells = [p.model, image, str(p.crops), str(p.visual)]
        for row in (p.full, p.pruned):
            if row.status != "ok":
                cells.append(row.status)
        if len(cells) == 4:
            speedup = p.full.prefill_ms / p.pruned.prefill_ms
            cells += [_fmt(p.full.prefill_ms) + _range(p.full, "prefill"),
                      _fmt(p.pruned.prefill_ms) + _range(p.pruned, "prefill"), _fmt(p.pruned.tokens),
                      _fmt(speedup, ".2f", "x"), _fmt(p.full.peak_mib, ".0f"), _fmt(p.pruned.peak_mib, ".0f")]
        lines.append("| " + " | ".join(cells + [""] * (len(head) - len(cells))) + " |")
    ok = [p for p in points if p.full.status == p.pruned.status == "ok"]
    growth = [(what, _slope(ok, lambda p, r=r, k=k: getattr(getattr(p, r), k)))
              for what, r, k in (("full prefill", "full", "prefill_ms"), ("VisionDrop prefill", "pruned", "prefill_ms"),
                                 ("full peak memory", "full", "peak_mib"),
                                 ("VisionDrop peak memory", "pruned", "peak_mib"))]
    lines += ["", "Growth (least-squares slope on log-log axes; cost ~ visual tokens^slope): "
              + "; ".join(f"{what} {_fmt(slope, '.2f')}" for what, slope in growth) + ".",
              "", "visual tokens: the image placeholders of one sample (LLaVA-NeXT: base crop + grid, with the "
              "row newlines); VisionDrop avg visual tokens: measured by the trace; times are medians, (min-max) "
              "beside; prefill = one forward with all logits, vision tower included."]
    return "\n".join(lines) + "\n"


def plot_scaling(points: list[ScalingPoint], ratio: float, path: Path, device: torch.device, where: str) -> None:
    """Prefill time and peak memory versus visual tokens, log-log, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    memory = "peak memory allocated (MiB)" if device.type == "cuda" else "peak resident-set growth (MiB)"
    panels = (("prefill_ms", "prefill time per sample (ms)"), ("peak_mib", memory))
    for ax, (key, label) in zip(axes, panels):
        for name, pick in (("full", lambda p: p.full), (f"VisionDrop, ratio {ratio:.3g}", lambda p: p.pruned)):
            xy = [(p.visual, v) for p in points if pick(p).status == "ok" and (v := getattr(pick(p), key)) and v > 0]
            if xy:
                ax.plot(*zip(*xy), marker="o", label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(sorted({p.visual for p in points}))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("visual tokens per sample (image placeholders)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"Cost versus visual tokens, batch 1 ({where})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> list[Result] | ScalingResult:
    parser = argparse.ArgumentParser(prog="python -m visiondrop.efficiency.latency", description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", choices=list(checkpoints()), help="architectures to build (default: both on a GPU, "
                        "llava-1.5-7b on a CPU); with --pretrained: which paper rows to show beside")
    parser.add_argument("--pretrained", help="load this checkpoint instead of random weights")
    parser.add_argument("--width", choices=("full", "reduced", "tiny"), help="default: full on a GPU, reduced on a CPU")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                        help="default: bfloat16 on a GPU, float32 on a CPU")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help="default: every registered method")
    parser.add_argument("--budgets", nargs="+", type=float,
                        help="per method (default: 64 for llava-1.5-7b, 320 for llava-next-7b, 64 for qwen2.5-vl-7b and qwen3-vl-8b, 257 for video-llava-7b)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, help="default: 1 8 32 on a GPU, 1 8 on a CPU")
    parser.add_argument("--new-tokens", type=int, default=32, help="N, tokens generated end to end")
    parser.add_argument("--warmup", type=int, help="discarded rounds (default: 2; 1 for --scaling)")
    parser.add_argument("--repeats", type=int, help="default: 5 on a GPU, 3 on a CPU")
    parser.add_argument("--threads", type=int, help="CPU threads (default: 1, see `benchmark`)")
    parser.add_argument("--text-tokens", type=int, default=TEXT_TOKENS)
    parser.add_argument("--attn", help="attention implementation (default: flash_attention_2 on a GPU where "
                        "flash-attn imports, else sdpa)")
    parser.add_argument("--scaling", action="store_true", help="instead of the table: prefill time and peak memory "
                        "of full and VisionDrop (at --ratio) as the visual tokens grow (table and PNG)")
    parser.add_argument("--ratio", type=float, default=SCALING_RATIO, help="--scaling: VisionDrop's retention ratio")
    parser.add_argument("--clock", choices=list(CLOCKS), help="wall (default), or process: this process's CPU time "
                        "(a CPU shared with other work)")
    parser.add_argument("--profile", action="store_true", help="also write one torch.profiler table per row "
                        "(profile_<model>_<device>_<width>.txt beside the table)")
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)
    if args.scaling:
        result = scaling(width=args.width, device=args.device, dtype=args.dtype, ratio=args.ratio,
                         warmup=1 if args.warmup is None else args.warmup, repeats=args.repeats,
                         threads=args.threads, text_tokens=args.text_tokens, attn=args.attn, out=args.out,
                         clock=args.clock)
        print(result.markdown)
        return result
    gpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    models = args.model or (image_models() if gpu and not args.pretrained else ["llava-1.5-7b"])
    budgets = None if args.budgets is None else [int(b) if b.is_integer() else b for b in args.budgets]
    results = []
    for model in models[:1] if args.pretrained else models:
        results.append(benchmark(model, width=args.width, pretrained=args.pretrained, device=args.device,
                                 dtype=args.dtype, methods=args.methods, budgets=budgets,
                                 batch_sizes=args.batch_sizes, new_tokens=args.new_tokens,
                                 warmup=2 if args.warmup is None else args.warmup, repeats=args.repeats,
                                 threads=args.threads, text_tokens=args.text_tokens, attn=args.attn, out=args.out,
                                 profile=args.profile, clock=args.clock))
        print(results[-1].markdown)
    latest = "\n".join(r.markdown for r in results)  # the latest run; every table also kept under its own name
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "table2.md").write_text(latest)
    return results


if __name__ == "__main__":
    main()
