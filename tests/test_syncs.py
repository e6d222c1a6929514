"""No method reads device values on the host inside its own calls during a pruned prefill (`.item()`, `.tolist()`,
`int(t)`, `if t:`, a boolean-mask index, `nonzero`...), so that its selection runs on a GPU without stalls and the
overhead share measured on a CPU is not a CPU artefact. Counted on the tiny model of every family
(`efficiency.syncs.policy_syncs`; on a GPU `make gpu-check` also counts the CUDA runtime's own syncs).

The few reads left are named here with their reason, each once per forward, sample or crop, never in a loop over
tokens. CDPruner runs here with its example options' guard; its official default (no guard) reads the count of its
distinct picks, which the NaN quirk makes data-dependent, once per forward (tested below).
"""
import pytest
import torch

from visiondrop.efficiency.gpu_check import family_models
from visiondrop.efficiency.latency import build_model, make_inputs
from visiondrop.efficiency.syncs import HostReads, policy_syncs
from visiondrop.families import checkpoint_config, info_of
from visiondrop.methods import METHODS, Unreachable, method, policy_for

BATCH = 2
#: method -> {"<policy call>: <operation>": (reads allowed, per "forward" / "sample" / "crop" (of every sample))}
REMAINING = {
    # one per cut: that every prompt has pivot_text tokens after the image (a clear error otherwise), and the
    # official pivot order, which is Python's iteration order of a set of ints (emulated on the host; inherent to
    # the official order: pivot_order="position" sorts on the device)
    "dart": {"select_decoder: __int__": (1, "forward"), "select_decoder: tolist": (1, "forward")},
    # per sample, once per forward: its raters, the text tokens after its image whose relevance is above their mean
    # (a count that differs per sample; a mask instead would change the float order of the official raters' mean,
    # on which the parity case's kept sets hang)
    "sparsevlm": {"prepare: __int__": (1, "sample"), "prepare: nonzero": (1, "sample")},
    # once per image batch on LLaVA-NeXT: its crops grouped by their count of valid (unpadded) patches, the length
    # of the list its diverse rounds thin (a padded list would pair other tokens than the official rounds)
    "vispruner": {"select_encoder: tolist": (1, "forward")},
    # per sample: the patches its image kept (its key set's size), and at each of the 4 cuts where its text starts
    # (the filter's rows) and the tokens it keeps (thresholds: a count that differs per sample)
    "mustdrop": {"select_encoder: __int__": (1, "sample"), "select_decoder: __int__": (4, "sample"),
                 "select_decoder: nonzero": (4, "sample")},
    # per sample: the frames' static-place counts for its windows' dynamic programme (run on the host, as the
    # official one), the static places of each window, and the inner merge's rounds (its most members of a target)
    "holitom": {"select_decoder: tolist": (2, "sample"), "select_decoder: __int__": (1, "sample")},
}


@pytest.fixture(scope="module", params=family_models())
def tiny_batch(request):
    config = checkpoint_config(request.param, "tiny")
    model = build_model(config, torch.device("cpu"), torch.float32)
    return model, make_inputs(config, torch.device("cpu"), torch.float32, batch=BATCH)


@pytest.mark.parametrize("name", [m for m in METHODS if m != "none"])
def test_no_host_reads_in_the_policy_calls(tiny_batch, name):
    model, inputs = tiny_batch
    info = info_of(model)
    if method(name).video_only and not info.video:
        pytest.skip(f"{name} takes videos only, and this family's example input is an image")
    # video methods at the video papers' 25% (PruneVid's first stage alone keeps more than the image budget 64/576)
    budget = info.n_visual / 4 if method(name).video_only else method(name).example_budget * info.n_visual / 576
    try:
        policy_for(info, name, budget)
    except Unreachable as err:  # DyCoke keeps some frames whole: its smallest reachable budget
        budget = err.floor
    try:
        counts = policy_syncs(model, inputs, name, budget, **method(name).example_options(model.config))
    except NotImplementedError as refusal:  # the family refuses it on this input (tested where it is refused)
        pytest.skip(f"{name} is refused on this family's example input: {refusal}")
    per = {"forward": 1, "sample": BATCH, "crop": BATCH * info.crops}
    allowed = {op: n * per[unit] for op, (n, unit) in REMAINING.get(name, {}).items()}
    excess = {op: n for op, n in counts.items() if n > allowed.get(op, 0)}
    assert not excess, f"{name} reads device values on the host in its hot path: {excess}"


def test_the_counter_sees_each_kind_of_host_read():
    x = torch.arange(6.0)
    with HostReads() as reads:
        reads.where = "probe"
        x[0].item(), x.tolist(), int(x[1]), bool(x[2]), x[x > 2], x.nonzero(), torch.tensor([x[0], x[1]])
        x.topk(2).indices.sort().values, x[torch.tensor([0, 2])], x.argsort(stable=True)  # these stay on the device
    assert reads.counts == {"probe: item": 1, "probe: tolist": 1, "probe: __int__": 1, "probe: __bool__": 1,
                            "probe: __getitem__": 1, "probe: nonzero": 1, "probe: tensor": 1}


def test_cdpruner_official_quirk_reads_its_kept_count_once():
    """Without the guard a spent kernel repeats picks, so the count kept is known only on the device: one read per
    forward sizes it (the guard's picks are distinct, and it reads nothing: the test above)."""
    config = checkpoint_config("llava-1.5-7b", "tiny")
    model = build_model(config, torch.device("cpu"), torch.float32)
    options = {**method("cdpruner").example_options(model.config), "guard": False}
    counts = policy_syncs(model, make_inputs(config, torch.device("cpu"), torch.float32, batch=BATCH), "cdpruner",
                          32, **options)
    assert counts == {"select_encoder: __int__": 1}
