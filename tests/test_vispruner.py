"""VisPruner (bit-exact parity with the official run: tests/test_parity.py): the diverse rounds by hand, the fast
path, budgets and the important ratio, LLaVA-NeXT, FLOPs, errors."""
import pytest
import torch

import visiondrop
from baselines.vispruner import diverse_rounds, split_budget
from helpers import flops_and_counter, inputs, kept_per_question, measure_counts
from parity import load_case, parity_inputs
from visiondrop.families import ModelInfo, info_of
from visiondrop.families.llava_next import packed_positions
from visiondrop.methods import policy_for
from visiondrop.testing.tiny import demo_image

QUESTIONS = ["What is in the image?", "Is there a red circle in the picture? Answer yes or no.", "Colour?"]
LLAVA15 = ModelInfo(n_visual=576, n_layers=32, vision_layer=22, cls_kept=False)


def kept(model, batch: dict, budget: int, **options) -> list[int]:
    with visiondrop.apply(model, "vispruner", budget=budget, **options) as handle, torch.no_grad():
        model(**batch)
    return handle.trace.kept[0][0].tolist()


def test_fast_path_keeps_the_important_set_and_changes_diverse_ones(parity_model):
    """eager_encoder=False (SDPA tower, recomputed CLS row): the same important tokens and counts, other diverse tokens."""
    official, _ = load_case("vispruner", "vp128")
    with visiondrop.apply(parity_model, "vispruner", budget=128, eager_encoder=False) as handle, torch.no_grad():
        parity_model(**parity_inputs())
    fast = set(handle.trace.kept[0][0].tolist())
    assert handle.trace.tokens_per_layer == [[128] * 32]
    assert set(official["important_indices_sorted"]) <= fast
    assert len(fast - set(official["kept_indices_sorted"])) > 0  # the documented price of the fast path


def test_diverse_rounds_by_hand():
    """Residual list at 0, 10, 90, 180, 95, 270 degrees: a = 0, 90, 95 scored by their best cosine to a b (10, 180,
    270): 0.98, 0.17, 0.09; keeping 4 drops the two highest a's in one round, and the list becomes [a's kept, b's]."""
    angles = torch.tensor([0.0, 10, 90, 180, 95, 270]).deg2rad()
    unit = torch.stack([angles.cos(), angles.sin()], -1).unsqueeze(0)
    assert diverse_rounds(unit, torch.arange(6).unsqueeze(0), 4).tolist() == [[4, 1, 3, 5]]
    residual = torch.tensor([[5, 4, 3, 2, 1, 0]])  # indices into the features, in another order
    assert diverse_rounds(unit.flip(1), residual, 4).tolist() == [[1, 4, 2, 0]]
    assert diverse_rounds(unit, torch.arange(6).unsqueeze(0), 0).shape == (1, 0)


@pytest.mark.parametrize("budget,ratio,split", [(128, 0.5, (64, 64)), (64, 0.75, (48, 16)), (192, 0.5, (96, 96)),
                                                (1, 0.5, (0, 1)), (99, 0.5, (49, 50)), (64, 1.0, (64, 0))])
def test_budget_split(budget, ratio, split):
    assert split_budget(budget, ratio, LLAVA15) == split


@pytest.mark.parametrize("budget,options", [(192, {}), (128, {}), (64, {"important_ratio": 0.75}), (32, {}),
                                            (99, {})])  # 99: an odd residual list, where the official code fails
def test_measured_tokens_per_layer_equal_budget(tiny, budget, options):
    model, processor = tiny
    measured, handle = measure_counts(model, inputs(processor, QUESTIONS[:1]), "vispruner", budget, **options)
    assert measured == [budget] * 32
    assert handle.trace.tokens_per_layer == [measured]
    assert len(set(handle.trace.kept[0][0].tolist())) == budget


def test_selection_never_depends_on_the_question(tiny):
    model, processor = tiny
    sets = kept_per_question(model, processor, "vispruner", 64, QUESTIONS)
    assert sets[0] == sets[1] == sets[2] and len(sets[0][0]) == 64


@pytest.mark.parametrize("newlines", ["keep", "drop"])
def test_next_selects_per_crop_among_real_patches(tiny_next, newlines):
    model, processor = tiny_next
    batch = inputs(processor, QUESTIONS[:1], [demo_image(0, (500, 400))])  # 5 crops, with unpadding
    with visiondrop.apply(model, "vispruner", budget=320, newlines=newlines) as handle, torch.no_grad():
        model(**batch)
    patches = handle.trace.kept[0][0]
    n_layer0 = handle.trace.tokens_per_layer[0][0]
    if newlines == "drop":  # compact layout: 64 of every crop's 576 patches, padding included (not in the trace:
        assert n_layer0 == 320 and len(patches) < 320  # the model's own layout has no place for them)
    else:  # the model's layout: only patches that survive unpadding, 64 per crop, plus the rows' newline tokens
        newline_at = packed_positions(model.model, 5, batch["image_sizes"][0], 576)[2]
        is_newline = torch.isin(patches, newline_at)
        assert int((~is_newline).sum()) == 320 and len(patches) == n_layer0 > 320


@pytest.mark.parametrize("options", [{}, {"eager_encoder": False}])
def test_overhead_formula_matches_torch_flop_counter(tiny, options):
    """Counted by the formula (keys, the CLS row where it is recomputed, the diverse rounds' products) as
    FlopCounterMode counts a real forward."""
    model, processor = tiny
    batch = inputs(processor, QUESTIONS[:1])
    formula, counter = flops_and_counter(model, batch, "vispruner", 128, **options)
    assert formula.total == counter.get_total_flops()
    assert formula.overhead > 0


def test_clear_errors(tiny):
    model, _ = tiny
    info = info_of(model)
    assert policy_for(info, "vispruner", 64.4).describe() == policy_for(info, "vispruner", 64).describe()
    with pytest.raises(ValueError, match="important_ratio is the important share of the budget, in \\[0, 1\\]"):
        visiondrop.apply(model, "vispruner", budget=64, important_ratio=1.5)
    with pytest.raises(ValueError, match="newlines must be 'drop'"):
        visiondrop.apply(model, "vispruner", budget=64, newlines="no")
    with pytest.raises(ValueError, match="needs a budget"):
        visiondrop.apply(model, "vispruner")
