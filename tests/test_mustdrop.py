"""MustDrop: the window similarity, the spatial merge, the key set and the dual filter by hand; budgets and
thresholds; the key set protected at every cut; the merge inside the tower measured with hooks; the decode-time
cache stage (keys counted from the layers' masks, batch == alone, cache == replay with its shifted positions).
Parity with the official code on the prefill and every decode step: tests/test_parity.py, fixtures
tests/parity/mustdrop."""
import math

import pytest
import torch

import visiondrop
from baselines.mustdrop import dual_filter, key_set, policy, spatial_merge, window_similarity
from helpers import (KeyCounter, assert_equal_up_to_reordering, demo_image, greedy_with_logits, inputs,
                     measure_counts)
from parity import load_case, parity_inputs
from visiondrop.api import Handle
from visiondrop.core import ModelInfo
from visiondrop.efficiency.properties import greedy as greedy_run
from visiondrop.engine.replay import Replay
from visiondrop.families import info_of
from visiondrop.families.llava import tower_layers

E0, E1 = [1.0, 0.0], [0.0, 1.0]


def grid(*windows: list[list[float]]) -> torch.Tensor:
    """A 6 x 6 grid of 2-d tokens [1, 36, 2] from four 3 x 3 windows (row-major), each given as its 9 tokens."""
    tiles = torch.tensor(windows).view(2, 2, 3, 3, 2)  # tile row, tile col, row in tile, col in tile
    return tiles.permute(0, 2, 1, 3, 4).reshape(1, 36, 2)


SAME = [E0] * 9
MIXED = [E0, E1] * 4 + [E0]  # five E0, four E1


def test_window_similarity_by_hand():
    """Mean cosine of the 72 ordered pairs: 1 for identical tokens; five E0 and four E1 give (5*4 + 4*3) / 72."""
    similarity = window_similarity(grid(SAME, MIXED, MIXED, MIXED), side=6)
    torch.testing.assert_close(similarity, torch.tensor([[1.0, 32 / 72, 32 / 72, 32 / 72]]))


def test_spatial_merge_by_hand():
    """Only the first window reaches 0.8: it becomes the mean of its 9 tokens right after CLS, then the other 27
    patches in raster order; scaled tokens show the mean."""
    patches = grid([[2.0, 0.0]] * 8 + [[5.0, 0.0]], MIXED, MIXED, MIXED)  # window 0: parallel, similarity 1
    cls = torch.full((1, 1, 2), 7.0)
    out = spatial_merge(torch.cat([cls, patches], 1), first=1)
    assert out.shape == (1, 1 + 1 + 27, 2)
    assert out[0, 0].tolist() == [7.0, 7.0]
    torch.testing.assert_close(out[0, 1], torch.tensor([(8 * 2.0 + 5.0) / 9, 0.0]))
    window0 = {r * 6 + c for r in range(3) for c in range(3)}
    rest = [i for i in range(36) if i not in window0]
    assert torch.equal(out[0, 2:], patches[0, rest])


def test_spatial_merge_takes_the_fewest_windows_over_the_crops_in_similarity_order():
    """Crop 0 has two mergeable windows (similarities 1 and ~0.98), crop 1 one: each merges one, its most similar."""
    near = [E0] * 8 + [[1.0, 0.5]]
    crops = torch.cat([grid(near, SAME, MIXED, MIXED), grid(MIXED, MIXED, SAME, MIXED)])
    out = spatial_merge(crops, first=0)
    assert out.shape == (2, 36 - 8, 2)
    torch.testing.assert_close(out[:, 0], torch.tensor([E0, E0]))  # crop 0: window 1 (1.0) before window 0
    assert spatial_merge(grid(MIXED, MIXED, MIXED, MIXED), first=0).shape == (1, 36, 2)  # none: unchanged


def test_key_set_is_the_top_eight_percent_by_the_head_mean_cls_row():
    """25 patches: ceil(0.08 * 25) = 2 keys, by the mean over 2 heads, CLS column left out, topk order."""
    importance = torch.zeros(1, 2, 26)
    importance[0, 0, 0] = 9.0  # CLS's own column never counts
    importance[0, :, 1 + 7] = torch.tensor([0.2, 0.4])  # mean 0.3
    importance[0, :, 1 + 3] = torch.tensor([0.9, 0.1])  # mean 0.5
    importance[0, :, 1 + 20] = torch.tensor([0.5, 0.0])  # mean 0.25
    assert key_set(importance, first=1).tolist() == [[3, 7]]


def test_dual_filter_drops_only_tokens_below_both_thresholds():
    """Columns' sums 0.3, 0.02, 0.05, 0.63 (total 1): global bar 0.1 x 1; individual bar 0.04. Token 1 is below
    both (dropped); token 2 is below the global bar but one row gives it 0.045 (kept)."""
    probs = torch.tensor([[0.2, 0.01, 0.005, 0.285], [0.1, 0.01, 0.045, 0.345]])
    assert dual_filter(probs, 0.1, 0.04).tolist() == [True, False, True, True]
    assert dual_filter(probs, 0.0, 1.0).all()  # nothing under a zero global bar


def test_budget_rows_choose_the_scripts_thresholds(tiny):
    info = info_of(tiny[0])
    for budget, thresholds in ((192, (0.001, 0.001)), (128, (0.0012, 0.001)), (64, (0.011, 0.01))):
        built = policy(info, budget)
        assert (built.global_thr, built.individual_thr) == thresholds
        assert built.cut_layers == (3, 7, 11, 15)
    assert policy(info, global_thr=0.005, individual_thr=0.001).global_thr == 0.005
    shallow = ModelInfo(576, 4, 22, False)  # the demo's 4 layers: the first three filters, after layers 0, 1, 2
    assert policy(shallow, 64).cut_layers == (1, 2, 3)
    with pytest.raises(ValueError, match="rows 64, 128, 192.*global_thr="):
        policy(info, 100)
    with pytest.raises(ValueError, match="together"):
        policy(info, global_thr=0.005)


def test_key_set_survives_every_cut(tiny):
    """Thresholds no token clears (global_thr=1, individual_thr=1) drop all but the key set: ceil(0.08 n) tokens
    from the first cut on, for the n tokens the merge left, measured with hooks."""
    model, processor = tiny
    measured, handle = measure_counts(model, inputs(processor, ["What is in the image?"]), "mustdrop", None,
                                      global_thr=1.0, individual_thr=1.0)
    n = measured[0]
    assert measured == [n] * 3 + [math.ceil(0.08 * n)] * 29 == handle.trace.tokens_per_layer[0]
    assert handle.policy.describe()["tokens_per_layer"] == measured


def test_merge_runs_inside_the_tower_after_layer_zero(parity_model):
    """On the parity image, the tower's layers 1-23 see the merged tokens (CLS + 368), as the official run did."""
    official = load_case("mustdrop", "md192")[0]
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, k: seen.append(k.get("hidden_states", a[0] if a else None)
                                                                          .shape[1]), with_kwargs=True)
             for layer in tower_layers(parity_model.model.vision_tower)]
    try:
        with visiondrop.apply(parity_model, "mustdrop", 192), torch.no_grad():
            parity_model(**parity_inputs())
    finally:
        for hook in hooks:
            hook.remove()
    assert seen == official["tower_tokens_per_layer"] == [577] + [369] * 23


def test_next_keeps_its_base_images_key_set(tiny_next):
    """LLaVA-NeXT: with thresholds no token clears, each cut keeps the key set of the base image (the first crop,
    laid out first as it is): ceil(0.08 x its merged patches) tokens, whatever the sub-crops hold."""
    model, processor = tiny_next
    processor.tokenizer.padding_side = "left"
    batch = inputs(processor, ["What is in the image?"])
    with visiondrop.apply(model, "mustdrop", global_thr=1.0, individual_thr=1.0) as handle, torch.no_grad():
        model(**batch)
    base = handle.policy._keys[0]
    assert base.numel() > 0 and int(base.max()) < handle.trace.tokens_per_layer[0][0]
    assert handle.trace.tokens_per_layer[0][3:] == [base.numel()] * 29


NEW_TOKENS = 5
QUESTIONS = ["What is in the image?", "Describe the colours of every object you can see in it."]


def generate(model, batch: dict, **options):
    """(tokens, logits, trace, visual keys counted per decode step, row and layer)."""
    counter = KeyCounter(model)
    try:
        with visiondrop.apply(model, "mustdrop", **options) as handle:
            tokens, logits = greedy_with_logits(model, batch, NEW_TOKENS)
    finally:
        counter.close()
    return tokens, logits, handle, counter.steps


def test_cache_stage_changes_the_decode_steps_only_and_batch_equals_alone(tiny):
    """The decode steps at layers 2-14 attend to the visual tokens the last filter kept (counted from the masks the
    layers receive), as the trace records; layers 0-1 to every visual token; the prefill is the stage's without it
    (`prune_cache=False`); each prompt alone equals the batch."""
    model, processor = tiny
    processor.tokenizer.padding_side = "left"
    batch = inputs(processor, QUESTIONS)
    tokens, logits, handle, keys = generate(model, batch, budget=64)
    _, logits_off, handle_off, keys_off = generate(model, batch, budget=64, prune_cache=False)
    trace = handle.trace
    assert handle.policy.decode_layers == tuple(range(2, 15)) and not handle_off.policy.decode_layers
    assert trace.tokens_per_layer == handle_off.trace.tokens_per_layer
    torch.testing.assert_close(logits[:, 0], logits_off[:, 0], atol=0, rtol=0)
    assert not torch.allclose(logits[:, 1:], logits_off[:, 1:], atol=1e-4)
    assert len(keys) == len(trace.decode_tokens) == NEW_TOKENS - 1 and not handle_off.trace.decode_tokens
    for step, (counted, counted_off, attended) in enumerate(zip(keys, keys_off, trace.decode_tokens)):
        for row, (n, n_off, visual) in enumerate(zip(counted, counted_off, attended)):
            cached, last = trace.tokens_per_layer[row], trace.tokens_per_layer[row][15]
            assert len(set(cached[3:15])) > 1, "the filters after layer 2 dropped nothing: the case tests too little"
            assert visual == cached[:2] + [last] * 30, (step, row)
            assert [a - b for a, b in zip(n_off, n)] == [c - v for c, v in zip(cached, visual)], (step, row)
    for i, question in enumerate(QUESTIONS):
        alone_tokens, alone_logits, alone, _ = generate(model, inputs(processor, [question], [demo_image(i)]),
                                                        budget=64)
        assert torch.equal(tokens[i], alone_tokens[0])
        assert_equal_up_to_reordering(logits[i], alone_logits[0], f"prompt {i} alone")
        assert [step[i] for step in trace.decode_tokens] == [step[0] for step in alone.trace.decode_tokens]


def test_cached_decoding_equals_replaying_its_cut_caches_and_positions(tiny):
    """Without a cache, each generated token attends at layers 2-14 to the last filter's tokens and takes there the
    position that follows them (`Policy.decode_evicts`), as with the cut cache; a replay that keeps every layer's
    positions gives other logits."""
    model, processor = tiny
    processor.tokenizer.padding_side = "left"
    batch = inputs(processor, QUESTIONS)
    with visiondrop.apply(model, "mustdrop", 64) as handle, torch.no_grad():
        cached = greedy_run(model, batch, NEW_TOKENS)
    with Handle(model, Replay(handle.policy, handle.trace)), torch.no_grad():
        replayed = greedy_run(model, batch, NEW_TOKENS, use_cache=False)
    assert torch.equal(cached[0], replayed[0])
    assert_equal_up_to_reordering(replayed[1], cached[1], "replay")
    unshifted = Replay(handle.policy, handle.trace)
    unshifted.decode_evicts = False
    with Handle(model, unshifted), torch.no_grad():
        forgetful = greedy_run(model, batch, NEW_TOKENS, use_cache=False)
    assert not torch.allclose(cached[1][:, 1:], forgetful[1][:, 1:], atol=1e-4)
