"""Device-to-host syncs inside a method's own calls during a pruned prefill.

A policy that reads a device value on the host (`.item()`, `.tolist()`, `int(t)`, `if t:`, a boolean-mask index,
`nonzero`) makes the host wait for the GPU at that point; inside a loop over tokens, the GPU idles between tiny
kernels and the method's overhead on a GPU is a multiple of what the CPU shows. `policy_syncs` counts such reads
inside the policy's `prepare`, `select_encoder` and `select_decoder` during one prefill, on any device: on a CPU
with a torch function mode that sees the operations that would synchronise a CUDA stream (`reads_host`), on a GPU
also with `torch.cuda.set_sync_debug_mode`, which sees every synchronising call the CUDA runtime makes.
"""
from __future__ import annotations

import warnings
from collections import Counter
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

#: operations that read device memory on the host, or need a data-dependent output size from it
READS = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero", "equal",
         "masked_select", "unique", "unique_consecutive", "tensor", "as_tensor"}
#: the policy calls counted
POLICY_CALLS = ("prepare", "select_encoder", "select_decoder")


class HostReads(TorchFunctionMode):
    """Counts host reads of tensors while entered, by "<where>: <operation>" (`where` set by the caller).

    A torch function mode: it sees every torch call in the region (methods, operators, conversions such as
    `int(t)`), patches nothing, and counts what `reads_host` says reads device values on the host.
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.where = "?"

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if reads_host(name, args, kwargs):
            self.counts[f"{self.where}: {name}"] += 1
        return func(*args, **kwargs)


def reads_host(name: str, args: tuple, kwargs: dict) -> bool:
    """Whether a torch call reads device values on the host: one of `READS` (torch.tensor / as_tensor only of
    tensors), a moving `.to()` onto the CPU, an index with a boolean mask (its True count decides the size), a
    `repeat_interleave` by tensor counts without `output_size`."""
    if name in ("tensor", "as_tensor"):
        return bool(args) and _holds_tensor(args[0])
    if name in READS:
        return True
    if name == "to":
        target = kwargs.get("device", args[1] if len(args) > 1 else None)
        return isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu" \
            and args[0].device.type != "cpu" or isinstance(target, torch.Tensor) and target.device.type == "cpu"
    if name == "__getitem__":
        index = args[1] if len(args) > 1 else None
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                   for i in (index if isinstance(index, tuple) else (index,)))
    if name == "repeat_interleave":
        repeats = kwargs.get("repeats", args[1] if len(args) > 1 else args[0])
        return isinstance(repeats, torch.Tensor) and repeats.numel() > 1 and kwargs.get("output_size") is None
    return False


def _holds_tensor(data: Any) -> bool:
    if isinstance(data, torch.Tensor):
        return True
    return isinstance(data, (list, tuple)) and any(_holds_tensor(x) for x in data)


@contextmanager
def _counting(policy: Any, reads: HostReads, cuda: bool) -> Iterator[None]:
    """Wrap the policy's calls on the instance so that `reads` counts inside them (and on a GPU, the CUDA
    runtime's own sync warnings); removed on exit."""
    own = {name: vars(policy).get(name) for name in POLICY_CALLS}

    def wrap(name: str, fn: Callable) -> Callable:
        def counted(*args: Any, **kwargs: Any) -> Any:
            reads.where = name
            if not cuda:
                with reads:
                    return fn(*args, **kwargs)
            with warnings.catch_warnings(record=True) as caught, reads:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    return fn(*args, **kwargs)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
                    synced = sum("synchroniz" in str(w.message) for w in caught)
                    if synced:
                        reads.counts[f"{name}: CUDA sync"] += synced
        return counted

    for name in POLICY_CALLS:
        setattr(policy, name, wrap(name, getattr(policy, name)))
    try:
        yield
    finally:
        for name, value in own.items():
            if value is None:
                delattr(policy, name)
            else:
                setattr(policy, name, value)


def policy_syncs(model: nn.Module, inputs: dict, method: str, budget: float | None = None,
                 **options: Any) -> Counter[str]:
    """Host reads inside `method`'s own calls during one prefill of `inputs` on `model`, by
    "<policy call>: <operation>" (empty: none)."""
    from ..api import apply

    reads = HostReads()
    cuda = inputs["input_ids"].device.type == "cuda"
    with apply(model, method, budget, **options) as handle, torch.inference_mode():
        with _counting(handle.policy, reads, cuda):
            model(**inputs)
    return reads.counts
