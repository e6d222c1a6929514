"""What the decode steps after a prefill attend to, chosen by the policy: the engine's decode-time KV selection
(`Policy.decode_layers`: DyCoke's dynamic KV pruning, layers >= 3 attending to the video tokens with the top layer-2
attention of each decode query; keys masked in a cache that keeps them) and its pruned caches
(`Policy.pruned_cache_layers`: PruneVid's in-LLM stage, whose layers up to the selected one (10 of 32) keep in their
caches only the tokens its cut after that layer kept, the others removed).

On two Qwen2.5-VL videos of different lengths in one left-padded batch (tests/test_video_methods.py): the stage
changes the decode steps and nothing of the prefill; switched off (or dropping nothing) it is the method without it;
the visual keys each layer attends to at each decode step, counted from the attention masks the layers receive
(forward pre-hooks), are the trace's and the official counts; each video alone equals the batch; a cached decode
equals a no-cache replay of its selections, which a replay that forgets them does not. The pruned caches hold the
kept tokens' rows only (measured on the cache tensors) and decode as masking the dropped keys does, greedy and in
beam search. A toy policy whose decode
layers span two cuts (as MustDrop's cache stage) is asked once per segment, with the tokens that survive both cuts.
DyCoke's selection function against the official `PrunableDynamicCache` (tests/parity/dycoke/kv_fixture.pt).
"""
import copy

import pytest
import torch

import visiondrop
from helpers import KeyCounter
from test_video_methods import OFFICIAL, qwen, videos  # noqa: F401 (fixtures)
from visiondrop.api import Handle
from visiondrop.core import ModelInfo
from visiondrop.efficiency.properties import greedy
from visiondrop.engine import Policy, Selection
from visiondrop.engine import decoder
from visiondrop.engine.compat import CACHE_ARG
from visiondrop.engine.replay import Replay

RATIO = 0.5
NEW_TOKENS = 5


def generate(model, batch, name, **options):
    """(tokens, logits, trace, keys counted per decode step, row and layer)."""
    counter = KeyCounter(model)
    try:
        with visiondrop.apply(model, name, **options) as handle, torch.no_grad():
            tokens, logits = run_steps(model, batch)
    finally:
        counter.close()
    return tokens, logits, handle.trace, counter.steps


def run_steps(model, batch):
    out = model.generate(**batch, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, batch["input_ids"].shape[1]:], torch.stack(out.logits, 1)


CASES = {  # method -> (options with the stage, options without it, options whose stage keeps every token)
    "dycoke": ({"ratio": RATIO}, {"ratio": RATIO, "dycoke_p": None}, {"ratio": RATIO, "dycoke_p": 0.0}),
    "prunevid": (OFFICIAL["prunevid"], {**OFFICIAL["prunevid"], "prune_cache": False}, None),
}


@pytest.mark.parametrize("name", CASES)
def test_the_stage_changes_decode_steps_only(qwen, videos, name):
    model, _ = qwen
    batch, _ = videos
    on, off, keeps_all = CASES[name]
    tokens, logits, trace, keys = generate(model, batch, name, **on)
    _, logits_off, trace_off, keys_off = generate(model, batch, name, **off)
    assert trace.tokens_per_layer == trace_off.tokens_per_layer  # the prefill is the method's without the stage
    torch.testing.assert_close(logits[:, 0], logits_off[:, 0], atol=0, rtol=0)
    assert not torch.allclose(logits[:, 1:], logits_off[:, 1:], atol=1e-6), f"{name}: the stage changed nothing"
    assert len(keys) == len(trace.decode_tokens) == NEW_TOKENS - 1 and not trace_off.decode_tokens
    for step, (counted, counted_off, recorded) in enumerate(zip(keys, keys_off, trace.decode_tokens)):
        for row, (n, n_off, attended) in enumerate(zip(counted, counted_off, recorded)):
            cached_visual = trace.tokens_per_layer[row]
            # the keys a layer drops are the visual tokens its decode-time selection left out, and only those
            assert [a - b for a, b in zip(n_off, n)] == [v - a for v, a in zip(cached_visual, attended)], (step, row)
            if name == "prunevid":  # the layers before the cut (0-9 of 28) attend to what the cut keeps
                cut = cached_visual.index(cached_visual[-1])
                assert cut == 10 and attended == [cached_visual[cut]] * cut + cached_visual[cut:]
            elif trace.decode_steps[step][3][row] is not None:  # layers >= 3: the official count of the scored tokens
                scored = cached_visual[3] - 1
                assert attended[:3] == cached_visual[:3]
                assert attended[3:] == [int(scored * (1 - 0.8)) + 1] * 25, (step, row)
    if keeps_all is not None:
        same_tokens, same_logits, _, _ = generate(model, batch, name, **keeps_all)
        assert torch.equal(same_tokens, run_steps_off(model, batch, name, off)[0])
        torch.testing.assert_close(same_logits, logits_off, atol=0, rtol=0)


def run_steps_off(model, batch, name, options):
    with visiondrop.apply(model, name, **options), torch.no_grad():
        return run_steps(model, batch)


@pytest.mark.parametrize("name", CASES)
def test_each_video_alone_equals_the_batch(qwen, videos, name):
    model, _ = qwen
    batch, singles = videos
    tokens, logits, trace, _ = generate(model, batch, name, **CASES[name][0])
    for i, single in enumerate(singles):
        alone_tokens, alone_logits, alone, _ = generate(model, single, name, **CASES[name][0])
        assert torch.equal(tokens[i], alone_tokens[0])
        width = single["input_ids"].shape[1]
        torch.testing.assert_close(logits[i], alone_logits[0], atol=1e-8, rtol=1e-8)
        assert [step[i] for step in trace.decode_tokens] == [step[0] for step in alone.decode_tokens], width
        for step, step_alone in zip(trace.decode_steps, alone.decode_steps):
            assert step.keys() == step_alone.keys()
            for batched, single in zip((s[i] for s in step.values()), (s[0] for s in step_alone.values())):
                assert (batched is None) == (single is None) and (batched is None or torch.equal(batched, single))


@pytest.mark.parametrize("name", CASES)
def test_cached_decoding_equals_replaying_its_selections(qwen, videos, name):
    """Replay: the prompt and the generated tokens in one prefill, each generated token attending at the decode
    layers to the visual tokens its own decode step chose. Forgetting the recorded steps gives other logits."""
    model, _ = qwen
    batch, _ = videos
    with visiondrop.apply(model, name, **CASES[name][0]) as handle, torch.no_grad():
        cached = greedy(model, batch, NEW_TOKENS)
    trace = handle.trace
    assert len(trace.decode_steps) == NEW_TOKENS - 1
    with Handle(model, Replay(handle.policy, trace)), torch.no_grad():
        replayed = greedy(model, batch, NEW_TOKENS, use_cache=False)
    assert torch.equal(cached[0], replayed[0])
    torch.testing.assert_close(cached[1], replayed[1], atol=1e-8, rtol=1e-8)
    # every step attending to everything
    trace.decode_steps = [{first: [None] * len(rows) for first, rows in step.items()} for step in trace.decode_steps]
    trace.pruned_cache = {first: [None] * len(rows) for first, rows in trace.pruned_cache.items()}
    with Handle(model, Replay(handle.policy, trace)), torch.no_grad():
        forgetful = greedy(model, batch, NEW_TOKENS, use_cache=False)
    assert not torch.allclose(cached[1][:, 1:], forgetful[1][:, 1:], atol=1e-6)


def test_dycoke_decode_stage_alone_and_its_options():
    """`temporal_merging=False` runs the decode-time stage alone (no budget); bad settings are refused."""
    from baselines.dycoke import policy
    from visiondrop.methods import policy_for

    info = ModelInfo(n_visual=6272, n_layers=28, vision_layer=25, cls_kept=False, crops=32, video=True)
    with pytest.raises(ValueError, match="give no budget"):
        policy(info, budget=100, temporal_merging=False)
    with pytest.raises(ValueError, match="method='none'"):
        policy(info, temporal_merging=False, dycoke_p=None)
    with pytest.raises(ValueError, match="dycoke_p is the share"):
        policy(info, budget=3000, dycoke_p=1.0)
    with pytest.raises(ValueError, match="dycoke_l is the first decoder layer"):
        policy(info, budget=3000, dycoke_l=0)
    alone = policy_for(info, "dycoke", temporal_merging=False)
    assert alone.cut_layers == () and alone.decode_layers == tuple(range(3, 28)) and alone.decode_scoring_layer == 2
    assert policy_for(info, "dycoke", 3000).describe()["kv_selection"] == {"dycoke_l": 3, "dycoke_p": 0.8}


def test_dycoke_kv_selection_equals_the_official_cache():
    """baselines.dycoke.kv_selection lets each decode step attend to exactly the tokens DyCoke's own
    `PrunableDynamicCache` gives layer dycoke_l (tests/parity/dycoke/kv_fixture.pt): the top int((n - 1)(1 - P)) of
    the first n - 1 frame tokens by the head-averaged layer-2 attention, every other token, and the whole cache at a
    step whose attention changed little (cosine >= 0.9) since the step before."""
    from pathlib import Path

    from baselines.dycoke import kv_selection

    fixture = torch.load(Path(__file__).parent / "parity" / "dycoke" / "kv_fixture.pt")
    start, whole = fixture["start"], 0
    for case in fixture["cases"]:
        n, previous, kept = case["ttm_tokens"], None, None
        for step, (rows, official) in enumerate(zip(case["rows"], case["attended"])):
            kv = rows.shape[-1]
            kept, previous = kv_selection(rows.mean(0)[start:start + n], previous, kept, case["dycoke_p"], False)
            ours = torch.arange(kv) if kept is None else torch.cat(
                [torch.arange(start), start + kept.nonzero()[:, 0], torch.arange(start + n, kv)])
            assert torch.equal(ours, official.sort().values), (n, step)
            whole += kept is None
    assert whole == 13  # the steps whose attention repeats the step before's


def test_beam_search_carries_the_selection_state_along(qwen, videos):
    """Beam search reorders the cache's rows between steps, and the engine reorders each row's decode-time state with
    them: DyCoke's stage runs on every beam, and where it drops nothing the beams are those without the stage."""
    model, _ = qwen
    batch, _ = videos
    beams = {"num_beams": 2, "num_return_sequences": 2}
    with visiondrop.apply(model, "dycoke", ratio=RATIO) as handle, torch.no_grad():
        pruned = greedy(model, batch, NEW_TOKENS, **beams)[0]
    assert len(handle.trace.decode_steps) == NEW_TOKENS - 1
    assert all(list(step) == [3] and len(step[3]) == 4 for step in handle.trace.decode_steps)
    outs = []
    for p in (0.0, None):
        with visiondrop.apply(model, "dycoke", ratio=RATIO, dycoke_p=p), torch.no_grad():
            outs.append(greedy(model, batch, NEW_TOKENS, **beams))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert pruned.shape == outs[0][0].shape


def prefill_cache(model, inputs, **options):
    """The KV cache after one prefill under PruneVid (official alpha), the trace, and the layer of its cut in the
    language model (after its selected layer)."""
    with visiondrop.apply(model, "prunevid", **OFFICIAL["prunevid"], **options) as handle, torch.no_grad():
        out = model(**inputs, use_cache=True)
    return getattr(out, CACHE_ARG), handle.trace, handle.policy.cut_layers[-1]


def test_prunevid_caches_up_to_the_selected_layer_hold_the_kept_tokens_only(qwen, videos):
    """After the prefill, the KV caches of the layers up to the selected one (10 of 32; 9 of Qwen2.5-VL's 28) hold as
    many rows as the layer after the cut (the text and the tokens stage 2 kept; in a batch the longest row's count,
    the other rows left-padded), measured on the cache tensors: fewer than with `prune_cache=False`, whose layers
    there cache every stage-1 token. A video alone: its pruned caches are the unpruned caches' rows of its text and
    kept tokens, in order; in the batch, each row ends with them."""
    model, _ = qwen
    batch, singles = videos
    lengths = lambda cache: [layer.keys.shape[2] for layer in cache.layers]  # noqa: E731
    alone = []
    for inputs in [*singles, batch]:
        pruned, trace, cut = prefill_cache(model, inputs)
        whole, _, _ = prefill_cache(model, inputs, prune_cache=False)
        assert lengths(pruned)[:cut] == [lengths(pruned)[cut]] * cut and lengths(pruned)[cut:] == lengths(whole)[cut:]
        assert all(layer.values.shape == layer.keys.shape for layer in pruned.layers)
        assert lengths(whole)[:cut] == [lengths(whole)[0]] * cut and lengths(whole)[0] > lengths(whole)[cut]
        if inputs is batch:
            reals = [lengths(cache)[0] for cache in alone]
            assert lengths(pruned)[0] == max(reals) and len(set(reals)) > 1
            for row, (cache, real) in enumerate(zip(alone, reals)):
                for i in range(cut):
                    for part in ("keys", "values"):
                        torch.testing.assert_close(getattr(pruned.layers[i], part)[row, :, -real:],
                                                   getattr(cache.layers[i], part)[0], atol=1e-8, rtol=1e-8)
            continue
        kept = trace.pruned_cache[0][0]
        first = int(inputs["input_ids"][0].tolist().index(model.config.video_token_id))  # the video's first row
        rows = torch.cat([torch.arange(first), first + kept.nonzero()[:, 0],
                          torch.arange(first + len(kept), lengths(whole)[0])])
        assert len(rows) == lengths(pruned)[cut] and trace.tokens_per_layer[0][cut] == int(kept.sum())
        for i in range(cut):
            assert torch.equal(pruned.layers[i].keys, whole.layers[i].keys[:, :, rows])
            assert torch.equal(pruned.layers[i].values, whole.layers[i].values[:, :, rows])
        alone.append(pruned)


def masked(policy: Policy) -> Policy:
    """The policy with its pruned cache as a decode-time KV selection instead: the keys the pruned cache removes
    masked in a cache that keeps them all (as the engine did before it pruned caches)."""
    twin = copy.copy(policy)
    twin.decode_layers, twin.pruned_cache_layers = policy.pruned_cache_layers, ()
    twin.select_cached = lambda step: step.kept_later
    return twin


@pytest.mark.parametrize("search", [{}, {"num_beams": 2, "num_return_sequences": 2}], ids=["greedy", "beams"])
def test_a_pruned_cache_decodes_as_masking_its_dropped_keys(qwen, videos, search):
    """PruneVid's pruned caches decode the batch as masking the keys they dropped in the whole caches does, greedy
    and in beam search (whose reorders move the compacted rows and their bookkeeping): the same tokens and logits."""
    model, _ = qwen
    batch, _ = videos
    with visiondrop.apply(model, "prunevid", **OFFICIAL["prunevid"]) as handle, torch.no_grad():
        pruned = greedy(model, batch, NEW_TOKENS, **search)
    assert len(handle.trace.decode_tokens) == NEW_TOKENS - 1
    assert handle.policy.pruned_cache_layers == tuple(range(handle.policy.cut_layers[-1]))
    with Handle(model, masked(handle.policy)) as masking, torch.no_grad():
        masks = greedy(model, batch, NEW_TOKENS, **search)
    assert masking.trace.decode_tokens == handle.trace.decode_tokens
    assert torch.equal(pruned[0], masks[0])
    torch.testing.assert_close(pruned[1], masks[1], atol=1e-6, rtol=1e-6)


def test_pruned_cache_layers_are_checked():
    """Pruned cache layers must exist and share no segment with a decode-time KV selection."""
    survivors = Survivors()
    survivors.pruned_cache_layers = (40,)
    with pytest.raises(ValueError, match="this decoder has 28"):
        decoder._check_pruned_cache(survivors, 28)
    survivors.pruned_cache_layers = (3,)
    with pytest.raises(NotImplementedError, match="between the same two cuts"):
        decoder._check_pruned_cache(survivors, 28)
    survivors.pruned_cache_layers = (5, 6)
    assert decoder._check_pruned_cache(survivors, 28) == {5, 6}


class Survivors(Policy):
    """A toy policy whose decode layers span cuts (as MustDrop's cache stage does): two cuts each keep the first half,
    and the decode steps of layers 0-3 attend to what survives both."""

    name = "survivors"
    cut_layers = (2, 4)
    decode_layers = (0, 1, 2, 3)

    def select_decoder(self, cut):
        return Selection(torch.arange(cut.n_visual // 2, device=cut.visual.device).expand(len(cut.samples), -1))

    def select_cached(self, step):
        return step.kept_later


def test_decode_layers_across_cuts_attend_to_the_tokens_that_survive_them(qwen, videos):
    """The engine asks once per segment of decode layers, each with its own cached tokens and which of them survive
    every later cut; a cached decode equals its replay."""
    model, _ = qwen
    batch, _ = videos
    with Handle(model, Survivors()) as handle, torch.no_grad():
        cached = greedy(model, batch, NEW_TOKENS)
    trace = handle.trace
    for step in trace.decode_steps:
        assert list(step) == [0, 2]  # the segments of layers 0-1 and 2-3
        for row, n in enumerate([128, 168]):
            assert torch.equal(step[0][row], torch.arange(n) < n // 4)
            assert torch.equal(step[2][row], torch.arange(n // 2) < n // 4)
    assert all(tokens == [n // 4] * 4 + [n // 4] * 24 for tokens, n in zip(trace.decode_tokens[0], [128, 168]))
    with Handle(model, Replay(handle.policy, trace)), torch.no_grad():
        replayed = greedy(model, batch, NEW_TOKENS, use_cache=False)
    assert torch.equal(cached[0], replayed[0])
    torch.testing.assert_close(cached[1], replayed[1], atol=1e-8, rtol=1e-8)
