"""The random control: exact counts in every layer, seeded kept sets, text independence, errors."""
import pytest
import torch

import visiondrop
from baselines.random import random_keep
from helpers import inputs, measure_counts
from visiondrop.families import info_of
from visiondrop.methods import policy_for
from visiondrop.testing.tiny import demo_image

QUESTIONS = ["What is in the image?", "Is there a red circle in the picture? Answer yes or no.", "Colour?"]


def test_random_keep_is_seeded_sorted_and_distinct():
    kept = random_keep(576, 64, seed=0)
    assert kept.tolist() == sorted(set(kept.tolist())) and len(kept) == 64 and 0 <= kept.min() <= kept.max() < 576
    assert torch.equal(kept, random_keep(576, 64, seed=0))
    assert not torch.equal(kept, random_keep(576, 64, seed=1))


@pytest.mark.parametrize("budget", [192, 128, 64, 32])
def test_measured_tokens_per_layer_equal_budget(tiny, budget):
    model, processor = tiny
    measured, handle = measure_counts(model, inputs(processor, QUESTIONS[:1]), "random", budget)
    assert measured == [budget] * 32
    assert handle.trace.tokens_per_layer == [measured]
    assert handle.trace.cuts == ["layer 0"]
    assert handle.trace.kept[0][0].tolist() == random_keep(576, budget, seed=0).tolist()
    assert handle.policy.describe()["equivalent_tokens"] == budget


def kept_set(model, processor, question: str, **options) -> list[int]:
    with visiondrop.apply(model, "random", budget=64, **options) as handle, torch.no_grad():
        model(**inputs(processor, [question], [demo_image(5)]))
    return handle.trace.kept[0][0].tolist()


def test_seed_decides_the_kept_set_and_the_question_does_not(tiny):
    model, processor = tiny
    first = kept_set(model, processor, "What is in the image?")
    assert kept_set(model, processor, "How many red shapes are on the left side of the picture?") == first
    assert kept_set(model, processor, "What is in the image?", seed=0) == first
    assert kept_set(model, processor, "What is in the image?", seed=7) != first


def test_clear_errors(tiny):
    model, _ = tiny
    for budget, kept in ((64.4, 64), (64.6, 65), (575.7, 575)):  # a ratio's budget keeps the nearest whole count
        assert policy_for(info_of(model), "random", budget).describe()["equivalent_tokens"] == kept
    with pytest.raises(ValueError, match="budget must be a finite number of visual tokens above 0, got 0"):
        visiondrop.apply(model, "random", budget=0)  # refused by visiondrop.api before the method
    with pytest.raises(ValueError, match="needs a budget"):
        visiondrop.apply(model, "random")
