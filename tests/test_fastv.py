"""FastV: the official run without a cache (with one: tests/test_parity.py), scoring by hand, counts, its options."""
from dataclasses import replace

import pytest
import torch

import visiondrop
from baselines.fastv import FastV, keep_for_budget
from helpers import greedy, inputs, kept_per_question, measure_counts
from parity import load_case, parity_inputs
from visiondrop.engine import DecoderCut
from visiondrop.families import ModelInfo

QUESTIONS = ["What is in the image?", "Is there a red circle in the picture? Answer yes or no.", "Colour?"]
LLAVA_7B = ModelInfo(n_visual=576, n_layers=32, vision_layer=22, cls_kept=False)


def test_generation_without_cache_rescores_every_step_like_official(parity_model):
    """Without a KV cache every step re-runs the prompt and re-ranks with the newest token (official dynamic mode)."""
    official, _ = load_case("fastv", "fastv192")
    batch = parity_inputs()
    with visiondrop.apply(parity_model, "fastv", budget=192):
        tokens = greedy(parity_model, batch, use_cache=False)[0].tolist()
    assert tokens == official["no_kv_cache_variant_tokens_info"]["tokens"] != official["greedy_tokens"]


class CraftedCut(DecoderCut):
    """A cut whose attention probabilities are given: [G, H, L, L] over the whole sequence; records the calls."""

    def __init__(self, probs: torch.Tensor, mask: torch.Tensor, visual: torch.Tensor):
        g, _, length, _ = probs.shape
        hidden = torch.zeros(g, length, 1)
        super().__init__(layer_idx=2, layers=None, hidden=hidden, prev_hidden=hidden + 1, mask=mask, cos=None,
                         sin=None, visual=visual, original_visual=visual.shape[1],
                         samples=list(range(g)))
        self.probs, self.calls = probs, []

    def attention(self, layer_idx, queries, hidden=None, keys=None):
        self.calls.append((layer_idx, queries, hidden))
        return self.probs.gather(2, queries[:, None, :, None].expand(-1, self.probs.shape[1], -1, self.probs.shape[3]))


CRAFTED = replace(LLAVA_7B, n_visual=4)  # the crafted image has 4 visual tokens


def crafted_cut() -> CraftedCut:
    """One sample, 2 heads, 6 tokens: [text, v0, v1, v2, v3, text]; rows are queries."""
    probs = torch.zeros(1, 2, 6, 6)
    probs[0, 0, 5] = torch.tensor([.1, .4, .1, .2, .0, .2])  # last token, head 0
    probs[0, 1, 5] = torch.tensor([.1, .0, .1, .2, .4, .2])  # last token, head 1: v0 and v3 tie on the mean
    probs[0, :, 4] = torch.tensor([.0, .0, .9, .0, .1, .0])  # another query row, only "all_queries" sees it
    return CraftedCut(probs, torch.ones(1, 6, dtype=torch.bool), torch.arange(1, 5).unsqueeze(0))


def test_last_token_scoring_by_hand():
    cut = crafted_cut()
    policy = FastV(CRAFTED, k=2, keep=2, scoring="text")
    torch.testing.assert_close(policy.scores(cut), torch.tensor([[.2, .1, .2, .2]]))  # head mean, visual columns
    layer, queries, hidden = cut.calls[0]
    assert layer == 1 and queries.tolist() == [[5]] and hidden is cut.prev_hidden  # layer K-1, last prompt row
    cut.probs[0, :, 5, 3], cut.probs[0, 1, 5, 4] = .25, .3  # v2 now ranks first, v0 second: kept in order
    assert policy.select_decoder(cut).keep.tolist() == [[0, 2]]


def test_all_queries_scoring_by_hand_ignores_padding():
    cut = crafted_cut()
    policy = FastV(CRAFTED, k=3, keep=1, scoring="all_queries")
    expected = torch.tensor([[.2, 1.0, .2, .3]]) / 6  # mean over the 6 query rows and the heads
    torch.testing.assert_close(policy.scores(cut), expected)
    assert cut.calls[0][0] == 2 and policy.select_decoder(cut).keep.tolist() == [[1]]
    cut.mask[0, 0] = False  # a padding row is not a query: the mean runs over the 5 real rows
    cut.probs[0, :, 0] = 1.0
    torch.testing.assert_close(policy.scores(cut), expected * 6 / 5)


@pytest.mark.parametrize("budget,k,keep", [(192, 2, 166), (128, 2, 98), (64, 2, 30), (36, 2, 0),
                                           (192, 3, 152), (128, 3, 82), (64, 3, 11)])
def test_budget_to_keep(budget, k, keep):
    assert keep_for_budget(budget, LLAVA_7B, k) == keep


@pytest.mark.parametrize("budget,keep", [(192, 166), (128, 98), (64, 30)])
def test_measured_tokens_per_layer_follow_schedule(tiny, budget, keep):
    model, processor = tiny
    measured, handle = measure_counts(model, inputs(processor, QUESTIONS[:1]), "fastv", budget)
    assert measured == [576] * 2 + [keep] * 30
    assert handle.trace.tokens_per_layer == [measured]
    assert abs(handle.trace.mean_tokens[0] - budget) < 0.5
    assert handle.policy.describe()["equivalent_tokens"] == handle.trace.mean_tokens[0]


def test_question_changes_the_kept_set(tiny):
    model, processor = tiny
    kept = kept_per_question(model, processor, "fastv", 64)
    assert len(kept[0][0]) == len(kept[1][0]) == 30 and kept[0] != kept[1]


def test_clear_errors(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="k=3 cannot reach budget 50.*smallest reachable budget is 54"):
        visiondrop.apply(model, "fastv", budget=50, k=3)
    with pytest.raises(ValueError, match="FastV k .* must be one or more increasing layers from 1 to 31"):
        visiondrop.apply(model, "fastv", budget=64, k=0)
    with pytest.raises(ValueError, match="scoring must be one of"):
        visiondrop.apply(model, "fastv", budget=64, scoring="first_token")
    with pytest.raises(ValueError, match="keep must be between 0 and 576"):
        visiondrop.apply(model, "fastv", keep=600)
    with pytest.raises(ValueError, match="budget= or keep="):
        visiondrop.apply(model, "fastv")
