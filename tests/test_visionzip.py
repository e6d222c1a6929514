"""VisionZip: the official scores and merge (the run itself: tests/test_parity.py), hand-checked selection,
schedules, options."""
import pytest
import torch

from visiondrop.methods.shared import encoder_selection
from baselines.visionzip import split_budget
from baselines.visionzip import policy as visionzip_policy
from helpers import inputs, kept_per_question, measure_counts
from parity import load_case, parity_inputs
from visiondrop.engine import EncoderView
from visiondrop.families.llava import clip_encoder_view as encoder_view
from visiondrop.families import ModelInfo

QUESTIONS = ["What is in the image?", "Is there a red circle in the picture? Answer yes or no.", "Colour?"]
LLAVA15 = ModelInfo(n_visual=576, n_layers=32, vision_layer=22, cls_kept=False)


def test_vz64_scores_and_merge_match_official(parity_model):
    """The CLS scores, the kept set and the contextual tokens, rebuilt from the official anchors and members."""
    official, logits = load_case("visionzip", "vz64")
    enc = official["encoder"]
    with torch.no_grad():
        view = encoder_view(parity_model.model.vision_tower, parity_inputs()["pixel_values"], enc["clip_layer_index"])
        sel = encoder_selection(view, enc["dominant_incl_cls"], enc["contextual"])
    torch.testing.assert_close(view.importance[0, :, 1:].sum(0), logits["encoder_cls_attention_sum"],
                               atol=1e-6, rtol=1e-4)
    assert sel.keep[0].tolist() == enc["kept_dominant_indices_sorted"]
    h = view.hidden[0]
    expected = torch.stack([h[a] + (h[m].mean(0) if m else 0)
                            for a, m in zip(enc["contextual_anchor_indices"], enc["contextual_members"])])
    torch.testing.assert_close(sel.merged[0], expected, atol=1e-4, rtol=1e-4)


def crafted_view() -> EncoderView:
    """CLS + 6 patches, 2 heads: summed-over-heads CLS scores 0.1, 0, 0.2, 0.3, 0.35, 0.05 for patches 1..6."""
    cls_attention = torch.tensor([[[0.5, 0.05, 0.0, 0.10, 0.30, 0.00, 0.05],  # head 0 alone would pick 4, 3
                                   [0.5, 0.05, 0.0, 0.10, 0.00, 0.35, 0.00]]])  # head 1 alone would pick 5, 3
    # per-head keys whose head average (not head 0, not the concatenation) sends 2 -> 3 and 4, 6 -> 1
    head0 = torch.tensor([[1, 1], [2, 0], [2, 0], [0, 2], [1, 0.1], [1, 1], [0, 0.4]])
    head1 = torch.tensor([[1, 1], [0, 0], [-1.8, 2], [0, 0], [1, 0.1], [1, 1], [2, 0]])
    hidden = torch.arange(7.0).unsqueeze(-1) * torch.tensor([1.0, 10.0, 100.0])
    return EncoderView(hidden.unsqueeze(0), cls_attention, torch.stack([head0, head1]).unsqueeze(0))


def test_cls_row_summed_over_heads_keeps_cls_then_raster_order():
    sel = encoder_selection(crafted_view(), dominant=3, contextual=0)
    assert sel.keep.tolist() == [[0, 4, 5]]  # top-2 patches are 5 (0.35) then 4 (0.3): kept in raster order
    assert sel.merged.shape == (1, 0, 3)


def test_contextual_merge_on_head_averaged_keys():
    view = crafted_view()
    sel = encoder_selection(view, dominant=2, contextual=2)
    assert sel.keep.tolist() == [[0, 5]]
    # rest 1, 2, 3, 4, 6 -> stride 5 // 2 = 2: anchors 1 and 3; 4, 6 join 1 and 2 joins 3 (head-averaged keys)
    h = view.hidden[0]
    torch.testing.assert_close(sel.merged[0], torch.stack([h[1] + (h[4] + h[6]) / 2, h[3] + h[2]]))


@pytest.mark.parametrize("budget,split", [(192, (162, 30)), (128, (108, 20)), (64, (54, 10)), (32, (27, 5)),
                                          (2, (2, 0)), (575, (485, 90))])
def test_budget_split(budget, split):
    assert split_budget(budget, LLAVA15) == split


@pytest.mark.parametrize("budget", [192, 128, 64, 32])
def test_measured_tokens_per_layer_equal_budget(tiny, budget):
    model, processor = tiny
    measured, handle = measure_counts(model, inputs(processor, QUESTIONS[:1]), "visionzip", budget)
    assert measured == [budget] * 32
    assert handle.trace.tokens_per_layer == [[budget] * 32]
    dominant, contextual = split_budget(budget, LLAVA15)
    assert len(handle.trace.kept[0][0]) == dominant - 1  # CLS and merged tokens are not original patches
    assert handle.policy.describe() == {"method": "visionzip", "encoder_layer": 22, "dominant": dominant,
                                        "contextual": contextual, "equivalent_tokens": budget}


def test_selection_never_depends_on_the_question(tiny):
    model, processor = tiny
    kept = kept_per_question(model, processor, "visionzip", 64, QUESTIONS)
    assert kept[0] == kept[1] == kept[2] and len(kept[0][0]) == 53


def test_budgets_and_options():
    build = lambda **options: visionzip_policy(LLAVA15, **options)  # noqa: E731
    assert build(dominant=100, contextual=0).describe()["equivalent_tokens"] == 100
    assert build(budget=64, dominant=60, contextual=4).describe()["dominant"] == 60
    for budget in (1, 0, 1.9):
        with pytest.raises(ValueError, match=f"cannot reach budget {budget:g}: .* smallest reachable budget is 2 "):
            build(budget=budget)
    assert build(budget=64.4).describe() == build(budget=64).describe()  # a ratio's budget: the nearest whole count
    with pytest.raises(ValueError, match="budget=64 disagrees with \\(dominant \\+ contextual\\) x crops = 70"):
        build(budget=64, dominant=60, contextual=10)
    with pytest.raises(ValueError, match="both dominant= and contextual="):
        build(budget=64, dominant=54)
    with pytest.raises(ValueError, match="needs budget= or dominant= and contextual="):
        build()
    with pytest.raises(ValueError, match="dominant \\+ contextual <= 576"):
        build(dominant=500, contextual=100)

