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

A case may be stored twice, in the shared folder and among the fixtures made here (the same setting run again by the
same official code, on another CPU): the robust part is checked against the shared run, the strict part against the
first run whose quantities this CPU reproduces (`official_runs`). VScan's vscan64 is so: the shared run was made on a
CPU whose eager CLIP tower differs in the last bits (its stored layer-22 CLS row differs from the shared VisPruner
fixture's row of the same tower and input in 548 of 576 values, by up to 2.4e-8, while the VisPruner row reproduces
bit for bit on AVX-512), so its merge cosines reproduce on no AVX-512 machine; the official code run here on AVX-512
(tests/parity/vscan) stored exactly the cosines the harness computes, and the same merge assignments as the shared run.
CDPruner's cd32 likewise: the shared run's projected tokens and CLIP embeds differ from AVX-512's in the last bits (up
to 8.6e-5), the run made here (tests/parity/cdpruner) stored the harness's bit for bit, with the same picks.
"""
from __future__ import annotations

import dataclasses
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


def official_runs(method: str, case: str) -> list[tuple[Path, dict, dict]]:
    """Every stored official run of a case, the shared folder's first, then the one made here (tests/parity/<method>):
    (its folder, the case in official.json, its official logits and stored quantities)."""
    runs = []
    for folder in (PARITY / method, OWN / method):
        cases = json.loads((folder / "official.json").read_text())["cases"] if folder.exists() else {}
        if case in cases:
            runs.append((folder, cases[case], torch.load(folder / "official_logits.pt")[case]))
    if not runs:
        raise KeyError(f"no parity case {method}/{case} in {PARITY / method} or {OWN / method}")
    return runs


def load_case(method: str, case: str) -> tuple[dict, dict]:
    """(official.json case, official logits and stored quantities of that case): from the shared folder, else from
    the fixtures made here (tests/parity/<method>)."""
    _, official, stored = official_runs(method, case)[0]
    return official, stored


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


def not_reproduced(stored: dict, quantities: dict[str, torch.Tensor]) -> str | None:
    """None where every quantity equals the one stored under its name in `stored` (an official run's) bit for bit;
    otherwise what differs, and by how much."""
    differing = []
    for name, value in quantities.items():
        reference = stored.get(name)
        if reference is None:
            differing.append(f"{name} (not stored)")
        elif not torch.equal(value, reference):
            if value.shape != reference.shape:
                raise AssertionError(f"{name}: shape {tuple(value.shape)}, stored {tuple(reference.shape)}")
            n = int((value != reference).sum())
            diff = (value.double() - reference.double()).abs().max().item()
            differing.append(f"{name} ({n} of {value.numel()} values differ, by up to {diff:.2g})")
    return "; ".join(differing) or None


def require_bit_exact(fixture: str, quantities: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """The official run of `fixture` ('method/case') whose stored unpruned quantities that decide its fragile steps
    reproduce bit for bit on this machine, as (official.json case, stored logits and quantities), for the calling
    test's strict part; skip that part where no stored run's do."""
    differing = []
    for folder, official, stored in official_runs(*fixture.split("/")):
        difference = not_reproduced(stored, quantities)
        if difference is None:
            return official, stored
        differing.append(f"{'the shared run' if folder.parent == PARITY else 'the run made here'}: {difference}")
    pytest.skip(f"strict part of {fixture} does not apply on this CPU ({this_cpu()}): its precondition, the "
                f"stored {', '.join(quantities)} reproducing bit for bit, fails for every stored official run: "
                f"{' | '.join(differing)}; the official code would choose differently here too (the robust part "
                "passed)")


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
    official, stored = require_bit_exact(case.fixture, quantities)  # the official run this CPU reproduces
    run = dataclasses.replace(run, official=official, stored=stored)
    diff = (logits - stored["step_logits"]).abs().max().item()
    assert diff < LOGITS_TOLERANCE, f"logits differ from the official run by {diff}"
    assert tokens == official["greedy_tokens"]
    if case.kept:
        assert run.kept() == case.kept(official)
    if case.check:
        case.check(run)
