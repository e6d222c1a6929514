"""SparseVLM v1.5: the official run's noise (the run itself: tests/test_parity.py), its rules on crafted tensors, and
its behaviour on a tiny LLaVA."""
import pytest
import torch

import visiondrop
from baselines.sparsevlm import (KEEP_LISTS, LAYERS, SparseVLM, cluster_and_merge, official_mean, policy,
                                 reference_lists, schedule, tokens_per_layer)
from helpers import inputs, kept_per_question, measure_counts, prompt
from parity import load_case, parity_inputs
from visiondrop.engine import DecoderCut
from visiondrop.families import ModelInfo
from visiondrop.methods import policy_for
from visiondrop.testing.tiny import demo_image

QUESTIONS = ["What is in the image?", "Is there a red circle in the picture? Answer yes or no.", "Colour?"]
INFO = ModelInfo(n_visual=576, n_layers=32, vision_layer=22, cls_kept=False)


def runs(*pairs: tuple[int, int]) -> list[int]:
    return [n for n, times in pairs for _ in range(times)]


# -- parity with the official code (../shared/reference/parity/sparsevlm) -----------------------------------------

def test_clustering_noise_decides_later_cuts_on_this_model(parity_model):
    """As the fixture notes: another seed keeps the same first cut but recycles (and so keeps) differently later."""
    official, _ = load_case("sparsevlm", "sparsevlm192")
    with visiondrop.apply(parity_model, "sparsevlm", budget=192, seed=1) as handle, torch.no_grad():
        parity_model(**parity_inputs())
    kept = [selections[0][0].tolist() for selections in handle.trace.selections]
    assert kept[0] == official["cuts"][0]["kept_stage_local_sorted"]
    assert kept[1] != official["cuts"][1]["kept_stage_local_sorted"]
    assert handle.trace.tokens_per_layer == [official["visual_tokens_per_layer"]]


# -- rules on crafted tensors ---------------------------------------------------------------------------------------

class FakeCut(DecoderCut):
    """A cut whose attention rows come from a given [G, H, L, L] tensor, recording how it was asked."""

    def attention(self, layer_idx, queries, hidden=None, keys=None):
        self.calls.append((layer_idx, queries.tolist(), hidden is self.prev_hidden))
        return torch.stack([self.probs[g][:, queries[g]] for g in range(len(queries))])


def fake_cut(hidden: torch.Tensor, visual: list[list[int]], layer_idx: int = 3, probs=None) -> FakeCut:
    batch, length, _ = hidden.shape
    cut = FakeCut(layer_idx=layer_idx, layers=None, hidden=hidden, prev_hidden=hidden + 1000.0,
                  mask=torch.ones(batch, length, dtype=torch.bool), cos=None, sin=None,
                  visual=torch.tensor(visual), original_visual=576,  # a 576-token image, as the keep lists assume
                  samples=list(range(batch)), scratch={})
    cut.probs, cut.calls = probs, []
    return cut


def test_raters_are_text_tokens_above_mean_relevance_on_raw_dot_products():
    # prefix token 0, visual tokens 1-2, text tokens 3-6. Visual . text: [3.2, 2, 0, 0] and [0, 0, 1, -1];
    # softmax over text, mean over the two visual rows: r = [0.459, 0.207, 0.282, 0.051], mean 0.25 -> raters 0, 2.
    # (With 1/sqrt(D) scaling text token 1 would pass too: the official code does not scale.)
    hidden = torch.tensor([[[5.0, 5.0], [1.0, 0.0], [0.0, 1.0], [3.2, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, -1.0]]])
    cut = fake_cut(hidden, [[1, 2]], layer_idx=0)
    SparseVLM(INFO, (2,), (1,), True, seed="global").prepare(cut)
    raters, generator = cut.scratch[0]
    assert raters.tolist() == [0, 2] and generator is None  # relative to the first token after the image


def test_single_text_token_rates_alone():
    cut = fake_cut(torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]]]), [[0, 1]], layer_idx=0)
    SparseVLM(INFO, (2,), (1,), True, seed=3).prepare(cut)
    assert cut.scratch[0][0].tolist() == [0] and isinstance(cut.scratch[0][1], torch.Generator)
    with pytest.raises(ValueError, match="needs text after the image"):
        SparseVLM(INFO, (2,), (1,), True, seed="global").prepare(fake_cut(torch.ones(1, 3, 2), [[1, 2]], layer_idx=0))


def test_scores_use_the_previous_layer_rater_rows_mean_over_heads_then_raters():
    # Two samples of one group: visual block 1..3, text 4..6; raters [0, 2] (rows 4, 6) and [1] (row 5).
    length = 7
    probs = torch.full((2, 2, length, length), 9.0)  # rows that are not raters must not matter
    probs[0, 0, 4, 1:4] = torch.tensor([0.1, 0.2, 0.3])
    probs[0, 1, 4, 1:4] = torch.tensor([0.3, 0.0, 0.1])  # head mean of row 4: [0.2, 0.1, 0.2]
    probs[0, :, 6, 1:4] = torch.tensor([0.0, 0.5, 0.4])  # row 6: [0.0, 0.5, 0.4]
    probs[1, 0, 5, 1:4] = torch.tensor([0.6, 0.2, 0.0])
    probs[1, 1, 5, 1:4] = torch.tensor([0.2, 0.0, 0.4])  # row 5: [0.4, 0.1, 0.2]
    cut = fake_cut(torch.zeros(2, length, 4), [[1, 2, 3], [1, 2, 3]], layer_idx=7, probs=probs)
    cut.scratch.update({0: (torch.tensor([0, 2]), None), 1: (torch.tensor([1]), None)})
    scores = SparseVLM(INFO, (6,), (2,), True, seed="global").scores(cut)
    torch.testing.assert_close(scores, torch.tensor([[0.1, 0.3, 0.3], [0.4, 0.1, 0.2]]))
    assert cut.calls == [(6, [[4, 6], [5, 5]], True)]  # layer that just ran, its input, padded rater rows


def test_selection_keeps_top_k_in_order_and_recycles_the_best_pruned():
    # 12 visual tokens at 0..11, text at 12; one rater. Keep 4 -> 8 pruned -> top int(2.4)+1 = 3 -> one cluster.
    length, n = 13, 12
    scores = torch.tensor([0.5, 9.0, 0.1, 8.0, 4.0, 0.2, 7.0, 3.0, 0.3, 6.0, 0.4, 2.0])
    probs = torch.zeros(1, 1, length, length)
    probs[0, 0, 12, :n] = scores
    hidden = torch.randn(1, length, 5)
    cut = fake_cut(hidden, [list(range(n))], probs=probs)
    cut.scratch[0] = (torch.tensor([0]), None)
    sel = SparseVLM(INFO, (2,), (4,), True, seed="global").select_decoder(cut)
    assert sel.keep.tolist() == [[1, 3, 6, 9]]  # top 4 by score, in sequence order
    expected = hidden[0, [4, 7, 11]].sum(0) / (3 + 1e-6)  # the 3 best pruned tokens of the layer OUTPUT
    torch.testing.assert_close(sel.merged, expected.view(1, 1, -1))
    # K >= n keeps n - 1; without recycling nothing is merged
    assert SparseVLM(INFO, (2,), (50,), True, seed="global").select_decoder(cut).keep.shape[1] == n - 1
    assert SparseVLM(INFO, (2,), (4,), False, seed="global").select_decoder(cut).merged is None


def test_dpc_knn_by_hand():
    # 1-D points 0, 0.1, 0.3 | 5, 5.2; 2 clusters, densities exp(-(0 + d_nn^2)/2) tie in pairs, noise breaks ties.
    x = torch.tensor([[0.0], [0.1], [0.3], [5.0], [5.2]])
    merged, weights = cluster_and_merge(x, 2, torch.tensor([0.5, 0.0, 0.0, 0.9, 0.1]))
    # centres: token 0 (densest, delta = max distance) then token 3 (delta 4.9); 1, 2 -> centre 0, 4 -> centre 3
    torch.testing.assert_close(merged, torch.tensor([[0.4 / (3 + 1e-6)], [10.2 / (2 + 1e-6)]]))
    third, half = 1 / (3 + 1e-6), 1 / (2 + 1e-6)
    torch.testing.assert_close(weights, torch.tensor([[third] * 3 + [0, 0], [0, 0, 0, half, half]]))


def test_dpc_knn_noise_decides_centres_when_densities_tie():
    x = torch.tensor([[0.0], [1.0], [10.0], [11.0]])  # equal densities: the noise alone orders the peaks
    torch.testing.assert_close(cluster_and_merge(x, 2, torch.tensor([1.0, 0.0, 0.0, 0.5]))[0],
                               torch.tensor([[0.5], [10.5]]), rtol=1e-5, atol=0)
    torch.testing.assert_close(cluster_and_merge(x, 2, torch.tensor([0.0, 0.0, 1.0, 0.5]))[0],
                               torch.tensor([[10.5], [0.5]]), rtol=1e-5, atol=0)


# -- the tiny LLaVA ------------------------------------------------------------------------------------------------

SCHEDULES = {  # visual tokens entering the 32 layers; SparseVLM's own count averages what each layer outputs
    192: (runs((576, 3), (309, 4), (204, 9), (113, 16)), 192.03125),
    128: (runs((576, 3), (312, 4), (117, 9), (39, 16)), 128.625),
    96: (runs((576, 3), (249, 4), (55, 9), (27, 16)), 96.9375),
    64: (runs((576, 3), (82, 4), (32, 9), (18, 16)), 64.8125),
}


@pytest.mark.parametrize("budget", sorted(SCHEDULES))
def test_measured_tokens_per_layer_follow_schedule(tiny, budget):
    model, processor = tiny
    measured, handle = measure_counts(model, inputs(processor, QUESTIONS[:1]), "sparsevlm", budget, seed=0)
    expected, equivalent = SCHEDULES[budget]
    assert measured == expected
    assert handle.trace.tokens_per_layer == [expected]
    assert handle.policy.describe()["equivalent_tokens"] == equivalent
    assert handle.trace.mean_tokens == [sum(expected) / 32] == [handle.policy.describe()["mean_tokens_entering_layers"]]


def test_options_recycle_keep_lists_layers():
    assert tokens_per_layer(576, 32, (2, 6, 15), (300, 200, 110), False) == runs((576, 3), (300, 4), (200, 9), (110, 16))
    p = policy(INFO, keep_lists=[100, 50], layers=[1, 20], recycle=False)
    assert p.cut_layers == (2, 21)
    assert p.describe()["tokens_per_layer"] == runs((576, 2), (100, 19), (50, 11))


def test_the_question_changes_raters_and_kept_tokens(tiny):
    model, processor = tiny
    kept = kept_per_question(model, processor, "sparsevlm", 64, seed=0)
    assert kept[0][0] != kept[1][0]


def test_unsupported_budgets_and_bad_options(tiny):
    model, _ = tiny
    for budget in (32, 100):
        with pytest.raises(ValueError, match=f"only for budgets 64, 96, 128, 192.*got {budget}"):
            visiondrop.apply(model, "sparsevlm", budget=budget)
    with pytest.raises(ValueError, match="needs budget= or keep_lists="):
        visiondrop.apply(model, "sparsevlm")
    with pytest.raises(ValueError, match="one keep count >= 0 per pruning layer"):
        visiondrop.apply(model, "sparsevlm", keep_lists=[300, 200])
    with pytest.raises(ValueError, match="SparseVLM layers must be one or more increasing"):
        visiondrop.apply(model, "sparsevlm", budget=192, layers=[6, 2, 15])
    with pytest.raises(ValueError, match="SparseVLM layers must be one or more increasing"):
        visiondrop.apply(model, "sparsevlm", keep_lists=[10], layers=[31])


def test_seed_defaults_to_each_samples_own_generator_and_global_is_explicit(tiny):
    model, _ = tiny
    with visiondrop.apply(model, "sparsevlm", budget=64) as handle:
        assert handle.policy.seed == 0 and handle.policy.describe()["seed"] == 0
    with visiondrop.apply(model, "sparsevlm", budget=64, seed="global") as handle:
        assert handle.policy.seed == "global"
    for seed in (None, "0", 1.5, True):
        with pytest.raises(ValueError, match="seed must be an int .* or 'global'"):
            visiondrop.apply(model, "sparsevlm", budget=64, seed=seed)


# -- one rule for a budget on every model and depth -------------------------------------------------------------------

#: mean visual tokens entering LLaVA-1.5-7B's layers with the official lists, over the budget
RATIOS = {192: 206.5 / 192, 128: 145.40625 / 128, 96: 114.09375 / 96, 64: 82.25 / 64}


def test_official_lists_and_ratios_on_llava15_7b():
    assert {b: official_mean(b, True) / b for b in KEEP_LISTS} == RATIOS
    for budget, lists in KEEP_LISTS.items():
        for recycle in (True, False):
            assert schedule(budget, 576, 32, LAYERS, recycle) == lists
            assert policy(INFO, budget, recycle=recycle).keep_lists == lists


@pytest.mark.parametrize("n_layers", [6, 8, 16, 24, 40, 48, 80])
@pytest.mark.parametrize("n", [576, 1176, 2176, 2340, 2928])
def test_schedule_keeps_the_llava15_ratio_at_any_depth_and_image_size(n_layers, n):
    info = ModelInfo(n_visual=576, n_layers=n_layers, vision_layer=22, cls_kept=False)
    layers = info.relative_layers(LAYERS, "x", lowest=0, spare=1)
    reached = 0
    for budget in KEEP_LISTS:
        try:
            lists = schedule(budget, n, n_layers, layers, True)
        except ValueError:
            continue
        counts = tokens_per_layer(n, n_layers, layers, lists, True)
        assert sum(counts) / n_layers / (budget * n / 576) == pytest.approx(RATIOS[budget], rel=0.03)
        reached += 1
    assert reached >= 3  # 6 and 12 layers lose 64 only


NEXT_IMAGES = [demo_image(0, (672, 336)), demo_image(1, (500, 400))]  # 3 crops (1752 tokens) and 5 crops (2438)


@pytest.mark.parametrize("budget", [960, 640, 480, 320])  # the 192 / 128 / 96 / 64 lists of a nominal 2880
def test_next_measured_tokens_follow_the_llava15_ratio(tiny_next, budget):
    model, processor = tiny_next
    for image, n0 in zip(NEXT_IMAGES, (1752, 2438)):
        batch = dict(processor(text=[prompt(QUESTIONS[0])], images=[image], return_tensors="pt"))
        counts, handle = measure_counts(model, batch, "sparsevlm", budget)
        assert counts[0] == n0 and len(counts) == 32 and handle.trace.tokens_per_layer == [counts]
        measured = sum(counts) / len(counts)
        assert measured / (budget * n0 / 2880) == pytest.approx(RATIOS[budget // 5], rel=0.03)


def test_four_layer_decoder_keeps_the_ratio_at_192_and_refuses_the_rest(tiny_shallow):
    model, processor = tiny_shallow
    counts, handle = measure_counts(model, inputs(processor, QUESTIONS[:1]), "sparsevlm", 192)
    assert counts == [576, 128, 78, 44] and handle.policy.keep_lists == (114, 76, 42)
    assert sum(counts) / 4 / 192 == pytest.approx(RATIOS[192], rel=0.03)  # 206.5, as on LLaVA-1.5-7B
    for budget in (128, 96, 64):  # targets 145.4, 114.1, 82.25: the first layer alone averages 144
        with pytest.raises(ValueError, match=f"cannot reach budget {budget} on this 4-layer decoder.* fewest it can "
                                             "feed here is 149.75.*smallest reachable budget is 192"):
            visiondrop.apply(model, "sparsevlm", budget)
    # explicit lists stay available, as given
    counts, _ = measure_counts(model, inputs(processor, QUESTIONS[:1]), "sparsevlm", keep_lists=[66, 30, 17])
    assert counts == [576, 82, 32, 18]  # as on LLaVA-1.5-7B, one layer each


# -- budgets between the official ones (lists="interpolated") ----------------------------------------------------------

def test_interpolated_lists_between_the_official_budgets():
    assert reference_lists(72) == (109, 35, 19)  # a quarter of the way from 64's (66, 30, 17) to 96's (238, 48, 26)
    assert reference_lists(144) == (302, 133, 55)  # from 128's (303, 110, 36) to 192's (300, 200, 110)
    for budget in KEEP_LISTS:  # the official budgets keep their lists, described as official
        described = policy(INFO, budget, lists="interpolated").describe()
        assert described["keep_lists"] == list(KEEP_LISTS[budget]) == described["official_keep_lists"]
    for budget in (72, 80, 112, 144, 160, 176):  # SparseVLM's own count lands within a token of the budget
        described = policy(INFO, budget, lists="interpolated").describe()
        assert described["keep_lists"] == described["interpolated_keep_lists"] == list(reference_lists(budget))
        assert 0 <= described["equivalent_tokens"] - budget < 1
    with pytest.raises(ValueError, match="keep lists only for budgets 64, 96, 128, 192 .* lists='interpolated'"):
        policy(INFO, 72)
    for budget in (50, 200):
        with pytest.raises(ValueError, match="interpolates keep lists between its official budgets, 64 to 192"):
            policy(INFO, budget, lists="interpolated")
    with pytest.raises(ValueError, match="lists must be one of"):
        policy(INFO, 64, lists="nearest")


def test_interpolated_lists_on_a_video_model_and_counted_with_hooks(tiny):
    """The video papers' 12.5% of Video-LLaVA's 2,056 tokens is 72/576 (and 25% 144/576); the lists follow the same
    rule on every model, and the tokens entering each layer of the tiny LLaVA are the described ones."""
    video = ModelInfo(n_visual=2056, n_layers=32, vision_layer=22, cls_kept=True, crops=8, video=True)
    for ratio, reference in ((0.125, 72), (0.25, 144)):
        described = policy_for(video, "sparsevlm", ratio=ratio, lists="interpolated").describe()
        assert described["interpolated_keep_lists"] == list(reference_lists(reference))
        target = official_mean(reference, True) * 2056 / 576
        assert abs(described["mean_tokens_entering_layers"] - target) < 1
    model, processor = tiny
    measured, handle = measure_counts(model, inputs(processor, QUESTIONS[:1]), "sparsevlm", 144, lists="interpolated")
    assert measured == handle.trace.tokens_per_layer[0] == handle.policy.describe()["tokens_per_layer"]
    assert handle.policy.keep_lists == reference_lists(144)
