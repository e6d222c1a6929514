"""DivPrune: the official pick order and its prefixes (the run itself: tests/test_parity.py), the max-min selection by
hand, counts, text independence, LLaVA-NeXT, errors."""
import pytest
import torch

import visiondrop
from baselines.divprune import max_min_diverse
from helpers import flops_and_counter, inputs, measure_counts
from parity import load_case, parity_inputs
from visiondrop.families import flops_dims, info_of
from visiondrop.methods import policy_for
from visiondrop.testing.tiny import demo_image

QUESTIONS = ["What is in the image?", "Is there a red circle in the picture? Answer yes or no.", "Colour?"]


def projected_and_kept(model, batch: dict, budget: int) -> tuple[torch.Tensor, list[int]]:
    """The visual rows DivPrune selects among (what enters decoder layer 0) and the kept original indices."""
    with visiondrop.apply(model, "divprune", budget=budget) as handle, torch.no_grad():
        seen = []
        select = handle.policy.select_decoder
        handle.policy.select_decoder = lambda cut: seen.append(cut.visual_rows(cut.hidden)) or select(cut)
        model(**batch)
    return seen[0], handle.trace.kept[0][0].tolist()


def test_pick_order_matches_official_and_smaller_budgets_are_its_prefixes(parity_model):
    """The greedy order itself; the official selection for k tokens is the first k picks of any larger k (the
    fixture's `selections_are_nested`), which checks budgets 1..64 against the official run."""
    official, logits = load_case("divprune", "dp64")
    order = logits["selected_order"].tolist()
    assert order == official["kept_indices_selection_order"]
    features, _ = projected_and_kept(parity_model, parity_inputs(), 64)
    assert max_min_diverse(features, 64)[0].tolist() == order
    for k in (1, 8, 32, 56):  # 56: the scripts' SUBSET_RATIO 0.098
        _, kept = projected_and_kept(parity_model, parity_inputs(), k)
        assert kept == sorted(order[:k])


def test_max_min_diversity_by_hand():
    """Unit directions at 0, ~8, 90 and 180 degrees (norms do not matter: cosine distance)."""
    features = torch.tensor([[5.0, 0.0], [0.99, 0.14], [0.0, 1.0], [-3.0, 0.0]]).unsqueeze(0)
    # first: 3, whose nearest other (2, at 90 degrees) is the farthest nearest neighbour; then 0 (opposite 3);
    # then 2 (distance 1 to both), and 1 last (next to 0)
    assert max_min_diverse(features, 4).tolist() == [[3, 0, 2, 1]]
    assert max_min_diverse(torch.cat([features, features.flip(1)]), 2).tolist() == [[3, 0], [0, 3]]


@pytest.mark.parametrize("budget", [192, 128, 64, 32])
def test_measured_tokens_per_layer_equal_budget(tiny, budget):
    model, processor = tiny
    measured, handle = measure_counts(model, inputs(processor, QUESTIONS[:1]), "divprune", budget)
    assert measured == [budget] * 32
    assert handle.trace.tokens_per_layer == [measured]
    assert len(handle.trace.kept[0][0]) == budget


def test_selection_never_depends_on_the_question(tiny):
    model, processor = tiny
    kept = [projected_and_kept(model, inputs(processor, [q], [demo_image(5)]), 64)[1] for q in QUESTIONS]
    assert kept[0] == kept[1] == kept[2] and len(kept[0]) == 64


def test_next_selects_among_each_images_whole_visual_block(tiny_next):
    """Base crop, grid crops and newline tokens together, the budget's share of each image's own tokens."""
    model, processor = tiny_next
    for size in ((672, 336), (500, 400)):
        batch = inputs(processor, QUESTIONS[:1], [demo_image(0, size)])
        n = int((batch["input_ids"] == model.config.image_token_id).sum())
        features, kept = projected_and_kept(model, batch, 320)
        assert features.shape[1] == n
        assert kept == sorted(max_min_diverse(features, round(320 * n / 2880))[0].tolist())


def test_clear_errors(tiny):
    model, _ = tiny
    for budget, kept in ((64.4, 64), (64.6, 65), (575.7, 575)):  # a ratio's budget keeps the nearest whole count
        assert policy_for(info_of(model), "divprune", budget).describe()["equivalent_tokens"] == kept
    with pytest.raises(ValueError, match="needs a budget"):
        visiondrop.apply(model, "divprune")


def test_overhead_formula_matches_torch_flop_counter(tiny):
    """The pairwise similarities (n^2 x d on the projected tokens) as FlopCounterMode counts a real forward."""
    model, processor = tiny
    batch = inputs(processor, QUESTIONS[:1])
    formula, counter = flops_and_counter(model, batch, "divprune", 64)
    assert formula.overhead == 2 * 576 * 576 * flops_dims(model.config).hidden
    assert formula.total == counter.get_total_flops()


def test_ties_within_rounding_go_to_the_first_token():
    """An image whose tokens repeat exactly (a square image on LLaVA-OneVision: its 1x1 grid crop is its base view):
    the host's features of the copies differ by rounding (in a batch and alone), and the picks do not follow it."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(1, 20, 16, generator=generator, dtype=torch.float64)
    noise = 1 + 4 * torch.finfo(torch.float64).eps * torch.randn(1, 20, 16, generator=generator, dtype=torch.float64)
    exact, rounded = torch.cat([tokens, tokens], 1), torch.cat([tokens, tokens * noise], 1)
    picks = max_min_diverse(exact, 10)
    assert (picks < 20).all()  # each repeated token's first copy
    assert torch.equal(max_min_diverse(rounded, 10), picks)
