"""Comparing a run of the harness with a run of an official implementation (../shared/reference/parity).

Every official run is one `Case` in the table of tests/test_parity.py; `check_case` applies the method to the parity
model with the case's options, generates, and compares counts, cuts, `describe()`, greedy tokens, logits and kept
tokens with the fixture, then runs the case's own `check`.

Fragile cases (../shared/reference/methods.md 11.3). Some selections turn on differences at float32 noise
(VisPruner's diverse rounds, CDPruner's late picks, VScan's tightest merges): only a bit-exact computation reproduces
them, and float32 CPU kernels are bit-exact only on the vector unit they ran on (AVX-512, AVX2, none). Such a case
declares its `precondition`: a function of the unpruned parity model and inputs that returns the stored quantities
deciding its fragile steps, under their names in the fixture's official_logits.pt (VisPruner: the head-mean CLS row;
CDPruner: the kernel's inputs; VScan: the merge cosines), e.g.

    Case("vispruner/vp128", "vispruner", {"budget": 128},
         precondition=lambda model, inputs: {"cls_attention_head_mean": cls_row(vispruner_view(model, inputs))},
         robust=vispruner_important_kept)  # what holds on any CPU: the important set

Where every quantity equals the stored one bit for bit the case is checked in full. Where one does not, the official
code itself would have chosen differently on this CPU: only the robust part (counts, cuts, `describe()`, the case's
`robust` check) is asserted, and the test is skipped with a reason naming the quantities and the CPU. A test outside
the table calls `require_bit_exact` itself between its robust and its strict assertions.
"""
from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

import visiondrop

SHARED = Path(os.environ.get("VISIONDROP_SHARED", Path(__file__).resolve().parents[2] / "shared"))
PARITY = SHARED / "reference" / "parity"
#: official and harness logits of the same case: unpruned they agree within 2e-5, pruned within this
LOGITS_TOLERANCE = 1e-3


#: fixtures made in this repository from the official code, for cases the shared folder does not hold
OWN = Path(__file__).resolve().parent / "parity"


def load_case(method: str, case: str) -> tuple[dict, dict]:
    """(official.json case, official logits and stored quantities of that case): from the shared folder, else from
    the fixtures made here (tests/parity/<method>)."""
    for folder in (PARITY / method, OWN / method):
        cases = json.loads((folder / "official.json").read_text())["cases"] if folder.exists() else {}
        if case in cases:
            return cases[case], torch.load(folder / "official_logits.pt")[case]
    raise KeyError(f"no parity case {method}/{case} in {PARITY / method} or {OWN / method}")


def parity_inputs() -> dict:
    raw = torch.load(PARITY / "visiondrop" / "inputs.pt")
    return {k: raw[k] for k in ("input_ids", "attention_mask", "pixel_values")}


def greedy_with_logits(model, inputs: dict, new_tokens: int = 8) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and the logits of the prefill's last position and of every decode step: [new_tokens, V]."""
    out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences[0, inputs["input_ids"].shape[1]:].tolist(), torch.stack(out.logits)[:, 0]


def this_cpu() -> str:
    """The processor and the vector unit torch's kernels use here, e.g. 'AMD EPYC, torch kernels AVX2'."""
    model = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, torch kernels {torch.backends.cpu.get_cpu_capability()}"


def not_reproduced(fixture: str, quantities: dict[str, torch.Tensor]) -> str | None:
    """None where every quantity equals the one stored under its name in `fixture` ('method/case') bit for bit;
    otherwise what differs, and by how much."""
    stored = load_case(*fixture.split("/"))[1]
    differing = []
    for name, value in quantities.items():
        reference = stored[name]
        if not torch.equal(value, reference):
            if value.shape != reference.shape:
                raise AssertionError(f"{name}: shape {tuple(value.shape)}, stored {tuple(reference.shape)}")
            n = int((value != reference).sum())
            diff = (value.double() - reference.double()).abs().max().item()
            differing.append(f"{name} ({n} of {value.numel()} values differ, by up to {diff:.2g})")
    return "; ".join(differing) or None


def require_bit_exact(fixture: str, quantities: dict[str, torch.Tensor]) -> None:
    """Skip the rest of the calling test (its strict part) unless the stored unpruned quantities that decide the
    fragile steps of `fixture` reproduce bit for bit on this machine."""
    differing = not_reproduced(fixture, quantities)
    if differing:
        pytest.skip(f"strict part of {fixture} does not apply on this CPU ({this_cpu()}): its precondition, the "
                    f"stored {', '.join(quantities)} reproducing bit for bit, fails: {differing}; the official code "
                    "would choose differently here too (the robust part passed)")


def record(obj, name: str) -> list:
    """Record, call by call, what the method `name` of `obj` returns (on the instance)."""
    calls, original = [], getattr(obj, name)
    setattr(obj, name, lambda *args: calls.append(original(*args)) or calls[-1])
    return calls


@dataclass
class Run:
    """A case's run, as its own checks see it."""
    model: torch.nn.Module
    official: dict  # the case in official.json
    stored: dict  # the case in official_logits.pt: logits and the official scores
    handle: visiondrop.api.Handle
    tokens: list[int]
    logits: torch.Tensor  # [steps, V]
    recorded: dict[str, list]  # the `record`ed policy methods' results, call by call

    def kept(self) -> list[list[int]]:
        """The kept original visual indices at every cut of the prefill."""
        return [k.tolist() for k in self.handle.trace.kept[0]]


@dataclass(frozen=True)
class Case:
    """An official run (`fixture`, 'folder/case' under PARITY) and the options that reach it."""
    fixture: str
    method: str
    options: dict | Callable[[dict], dict]  # visiondrop.apply's arguments, or a function of the official case
    variant: str = ""  # names the option set when several reach one case
    cuts: Callable[[dict], list[str]] = lambda official: []  # the trace's cuts
    kept: Callable[[dict], list[list[int]]] | None = None  # the official kept original indices at every cut
    described: Callable[[dict], dict] = lambda official: {}  # entries `describe()` states
    record: tuple[str, ...] = ()  # policy methods whose results `check` reads
    check: Callable[[Run], None] | None = None  # the method's own strict checks (its scores against the official)
    seed: int | None = None  # torch.manual_seed right before generating, as the official run did
    #: fragile cases: (unpruned model, inputs) -> the stored quantities that decide the fragile steps, by name
    precondition: Callable[[torch.nn.Module, dict], dict[str, torch.Tensor]] | None = None
    robust: Callable[[Run], None] | None = None  # fragile cases: what holds on any CPU beyond counts and cuts
    #: compare the logits and greedy tokens of the first `steps` forwards only (None: all): 1 for a method whose
    #: official decode-time stage the engine does not have (MustDrop's KV-cache stage), the prefill's
    steps: int | None = None

    def __str__(self) -> str:
        return self.fixture + (f"-{self.variant}" if self.variant else "")


def check_case(model, case: Case) -> None:
    """Run `case` on the parity model and compare it with the official run (see the module's docstring)."""
    official, stored = load_case(*case.fixture.split("/"))
    inputs = parity_inputs()
    quantities = case.precondition(model, inputs) if case.precondition else {}
    options = case.options(official) if callable(case.options) else case.options
    with visiondrop.apply(model, case.method, **options) as handle:
        recorded = {name: record(handle.policy, name) for name in case.record}
        if case.seed is not None:
            torch.manual_seed(case.seed)
        tokens, logits = greedy_with_logits(model, inputs, len(official["greedy_tokens"]))
    run = Run(model, official, stored, handle, tokens, logits, recorded)
    assert handle.trace.tokens_per_layer == [official["visual_tokens_per_layer"]]
    assert handle.trace.cuts == case.cuts(official)
    described = handle.policy.describe()
    assert {k: described.get(k) for k in case.described(official)} == case.described(official)
    if case.robust:
        case.robust(run)
    require_bit_exact(case.fixture, quantities)
    steps = case.steps or len(official["greedy_tokens"])
    diff = (logits[:steps] - stored["step_logits"][:steps]).abs().max().item()
    assert diff < LOGITS_TOLERANCE, f"logits differ from the official run by {diff}"
    assert tokens[:steps] == official["greedy_tokens"][:steps]
    if case.kept:
        assert run.kept() == case.kept(official)
    if case.check:
        case.check(run)
