"""FasterVLM: the CLS top-k by hand, against an eager CLIP pass of the parity model, budgets, LLaVA-NeXT per crop,
FLOPs, errors (parity with the official runs, tests/parity/fastervlm: tests/test_parity.py)."""
import pytest
import torch

import visiondrop
from baselines.fastervlm import cls_topk
from helpers import flops_by_formula_and_counter, inputs, kept_per_question, measure_counts
from parity import parity_inputs
from visiondrop.engine import EncoderView
from visiondrop.families import info_of
from visiondrop.families.llava import clip_encoder_view
from visiondrop.families.llava_next import packed_positions
from visiondrop.methods import policy_for
from visiondrop.testing.tiny import demo_image

QUESTIONS = ["What is in the image?", "Is there a red circle in the picture? Answer yes or no.", "Colour?"]


def test_cls_topk_by_hand():
    """Head-mean CLS row over 5 patches (token 0 is CLS, never ranked): patches 3, 0 and 4 score highest; they come
    back in raster order, as view indices (patch + 1)."""
    importance = torch.tensor([[[9.0, 0.5, 0.1, 0.2, 0.9, 0.3], [9.0, 0.3, 0.1, 0.0, 0.7, 0.5]]])  # [1, 2 heads, 6]
    view = EncoderView(hidden=torch.zeros(1, 6, 4), importance=importance, keys=torch.zeros(1, 2, 6, 2))
    assert cls_topk(view, 3).keep.tolist() == [[1, 4, 5]]
    view.valid = torch.tensor([[True, True, True, True, False, True]])  # patch 3 discarded by the layout
    assert cls_topk(view, 3).keep.tolist() == [[1, 3, 5]]
    no_cls = EncoderView(hidden=torch.zeros(1, 6, 4), importance=importance, keys=torch.zeros(1, 2, 6, 2),
                         has_cls=False)
    assert cls_topk(no_cls, 2).keep.tolist() == [[0, 4]]


@pytest.mark.parametrize("budget", [144, 58, 29])  # the README's 75%, 90%, 95% reductions
def test_keeps_the_eager_cls_topk_of_the_parity_model(parity_model, budget):
    """The kept patches are the top `budget` of layer 22's head-mean CLS attention from an eager CLIP pass (what
    `output_attentions` gives the official code), every decoder layer sees them, and the fast path agrees."""
    batch = parity_inputs()
    with torch.no_grad():
        view = clip_encoder_view(parity_model.model.vision_tower, batch["pixel_values"], 22, eager_encoder=True)
    expected = view.importance[0, :, 1:].mean(0).topk(budget).indices.sort().values.tolist()
    for exact in (True, False):
        with visiondrop.apply(parity_model, "fastervlm", budget=budget, eager_encoder=exact) as handle, torch.no_grad():
            parity_model(**batch)
        assert handle.trace.kept[0][0].tolist() == expected
        assert handle.trace.tokens_per_layer == [[budget] * 32]


@pytest.mark.parametrize("budget", [288, 144, 58, 29, 1])
def test_measured_tokens_per_layer_equal_budget(tiny, budget):
    model, processor = tiny
    measured, handle = measure_counts(model, inputs(processor, QUESTIONS[:1]), "fastervlm", budget)
    assert measured == [budget] * 32 == handle.trace.tokens_per_layer[0]
    assert handle.policy.describe() == {"method": "fastervlm", "encoder_layer": 22, "keep": budget,
                                        "eager_encoder": True,
                                        "equivalent_tokens": budget}


def test_selection_never_depends_on_the_question(tiny):
    model, processor = tiny
    kept = kept_per_question(model, processor, "fastervlm", 58, QUESTIONS)
    assert kept[0] == kept[1] == kept[2] and len(kept[0][0]) == 58


@pytest.mark.parametrize("newlines", ["keep", "drop"])
def test_next_keeps_budget_over_crops_on_every_crop(tiny_next, newlines):
    """README: 29 per crop on LLaVA-NeXT, 145 in all (plus the newline tokens in the model's own layout)."""
    model, processor = tiny_next
    batch = inputs(processor, QUESTIONS[:1], [demo_image(0, (500, 400))])  # 5 crops, with unpadding
    with visiondrop.apply(model, "fastervlm", budget=145, newlines=newlines) as handle, torch.no_grad():
        model(**batch)
    patches = handle.trace.kept[0][0]
    n_layer0 = handle.trace.tokens_per_layer[0][0]
    if newlines == "drop":  # compact: 29 of every crop's 576, padding included (the layout has no place for it)
        assert n_layer0 == 145 and len(patches) <= 145
    else:
        newline_at = packed_positions(model.model, 5, batch["image_sizes"][0], 576)[2]
        assert int((~torch.isin(patches, newline_at)).sum()) == 145 and len(patches) == n_layer0 > 145


@pytest.mark.parametrize("options", [{}, {"eager_encoder": False}])
def test_overhead_formula_matches_torch_flop_counter(tiny, options):
    model, processor = tiny
    batch = inputs(processor, QUESTIONS[:1])
    formula, counted = flops_by_formula_and_counter(model, batch, "fastervlm", 144, **options)
    assert formula == counted


def test_clear_errors(tiny):
    model, _ = tiny
    info = info_of(model)
    assert policy_for(info, "fastervlm", 144.4).describe() == policy_for(info, "fastervlm", 144).describe()
    with pytest.raises(ValueError, match="newlines must be 'drop'"):
        visiondrop.apply(model, "fastervlm", budget=64, newlines="no")
    with pytest.raises(ValueError, match="needs a budget"):
        visiondrop.apply(model, "fastervlm")

