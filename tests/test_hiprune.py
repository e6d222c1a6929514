"""HiPrune: anchors, buffers and registers by hand, the received attention against an eager pass and the official
scores, budgets, options, LLaVA-NeXT, Qwen2.5-VL, FLOPs, errors (parity with the official runs, tests/parity/hiprune:
tests/test_parity.py)."""
import pytest
import torch

import visiondrop
from baselines.hiprune import hiprune_selection
from helpers import flops_by_formula_and_counter, inputs, measure_counts
from parity import load_case, parity_inputs
from visiondrop.core import EncoderView
from visiondrop.families import info_of
from visiondrop.families.llava import clip_encoder_view
from visiondrop.families.llava_next import packed_positions
from visiondrop.methods import policy_for
from visiondrop.testing.tiny import demo_image

QUESTIONS = ["What is in the image?", "Is there a red circle in the picture? Answer yes or no.", "Colour?"]


def by_hand_view(shallow: list[float], deep: list[float], width: int) -> EncoderView:
    """A CLS-less view whose received attention is `shallow` at layer 0 and `deep` at layer 1."""
    scores = {0: torch.tensor([shallow]), 1: torch.tensor([deep])}
    n = len(shallow)
    return EncoderView(hidden=torch.zeros(1, n, 2), importance=torch.zeros(1, 1, n), keys=torch.zeros(1, 1, n, 2),
                       has_cls=False, received=scores.__getitem__, grid=(n // width, width))


def test_anchors_buffers_and_registers_by_hand():
    """A 4x4 grid; keep 8 at alpha 0.5: round(8 x 0.5 / 5) = 1 anchor, the shallow maximum at patch 5, buffers 4, 6, 1
    and 9; the 3 registers are the deep maxima among the others (patch 6's high deep score does not count twice)."""
    shallow = [0.0] * 16
    shallow[5] = 1.0
    deep = [0.0] * 16
    deep[6], deep[15], deep[0], deep[12], deep[3] = 0.9, 0.8, 0.7, 0.6, 0.1
    assert hiprune_selection(by_hand_view(shallow, deep, 4), 8, 0.5, 0, 1).keep.tolist() == [[0, 1, 4, 5, 6, 9, 12, 15]]


def test_buffers_wrap_at_row_ends_and_clamp_at_the_image_edge():
    """Anchor 4 starts row 1 of a 4-wide grid: its left buffer is patch 3 (the previous row's end), as the official
    index arithmetic does; anchor 0's buffers -1 and -4 clamp to 0 (one token, kept once)."""
    shallow = [0.0] * 16
    shallow[4] = 1.0
    deep = [float(i) for i in range(16)]
    kept = hiprune_selection(by_hand_view(shallow, deep, 4), 6, 0.9, 0, 1).keep.tolist()
    assert kept == [[0, 3, 4, 5, 8, 15]]  # anchor 4, buffers 3, 5, 0, 8; one register: 15
    shallow = [1.0] + [0.0] * 15
    kept = hiprune_selection(by_hand_view(shallow, deep, 4), 5, 0.9, 0, 1).keep.tolist()
    assert kept == [[0, 1, 4, 14, 15]]  # anchor 0, buffers {0, 1, 4}: two registers


def test_received_attention_eager_and_recomputed_agree(parity_model):
    """The eager tower's probabilities (the official `attentions[l].mean(1).mean(1)`) and the SDPA path's recomputed
    ones agree at the object and feature layers; the eager ones match the official run's stored scores closely."""
    pixels = parity_inputs()["pixel_values"]
    tower = parity_model.model.vision_tower
    with torch.no_grad():
        eager = clip_encoder_view(tower, pixels, 22, eager_encoder=True, received=True)
        recomputed = clip_encoder_view(tower, pixels, 22, received=True)
        _, logits = load_case("hiprune", "hp128")
        for layer in (8, 22):
            assert torch.allclose(eager.received(layer), recomputed.received(layer), rtol=1e-4, atol=1e-8)
            assert torch.allclose(eager.received(layer)[0, 1:], logits[f"received_attention_mean_layer{layer}"],
                                  rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("budget,options", [(192, {}), (128, {}), (64, {}), (30, {"alpha": 0.5}),
                                            (128, {"object_layer": 5}), (1, {})])
def test_measured_tokens_per_layer_equal_budget(tiny, budget, options):
    model, processor = tiny
    measured, handle = measure_counts(model, inputs(processor, QUESTIONS[:1]), "hiprune", budget, **options)
    assert measured == [budget] * 32 == handle.trace.tokens_per_layer[0]
    assert len(set(handle.trace.kept[0][0].tolist())) == budget


def test_object_layer_and_alpha_change_the_selection(tiny):
    model, processor = tiny
    batch = inputs(processor, QUESTIONS[:1], [demo_image(3)])
    kept = {}
    for key, options in {"default": {}, "layer": {"object_layer": 3}, "alpha": {"alpha": 0.5}}.items():
        with visiondrop.apply(model, "hiprune", budget=64, **options) as handle, torch.no_grad():
            model(**batch)
        kept[key] = handle.trace.kept[0][0].tolist()
    assert kept["default"] != kept["layer"] and kept["default"] != kept["alpha"]


def test_next_keeps_budget_over_crops_on_every_crop(tiny_next):
    model, processor = tiny_next
    batch = inputs(processor, QUESTIONS[:1], [demo_image(0, (500, 400))])  # 5 crops, with unpadding
    with visiondrop.apply(model, "hiprune", budget=320) as handle, torch.no_grad():
        model(**batch)
    patches = handle.trace.kept[0][0]
    newline_at = packed_positions(model.model, 5, batch["image_sizes"][0], 576)[2]
    # 64 a crop; a buffer can fall on padding the layout drops
    assert 300 <= int((~torch.isin(patches, newline_at)).sum()) <= 320
    assert len(patches) == handle.trace.tokens_per_layer[0][0]


def test_qwen_keeps_its_share_of_a_dynamic_resolution_image(tiny_qwen):
    """Retention 0.223 (an official Qwen setting) is budget 128.4 of the nominal 576: 128 kept, scaled to this
    10 x 7-token image: round(128 x 70 / 576) = 16; the object layer is block 16, the buffers' rows 10 wide."""
    from test_qwen import batch_of

    model, processor = tiny_qwen
    processor.tokenizer.padding_side = "left"
    batch = batch_of(processor, QUESTIONS[:1], [demo_image(0, (280, 196))])
    with visiondrop.apply(model, "hiprune", ratio=0.223) as handle, torch.no_grad():
        model(**batch)
    assert handle.trace.tokens_per_layer[0] == [16] * 28
    assert len(set(handle.trace.kept[0][0].tolist())) == 16
    assert handle.policy.describe()["object_layer"] == 16


@pytest.mark.parametrize("options", [{}, {"eager_encoder": False}])
def test_overhead_formula_matches_torch_flop_counter(tiny, options):
    model, processor = tiny
    batch = inputs(processor, QUESTIONS[:1])
    formula, counted = flops_by_formula_and_counter(model, batch, "hiprune", 128, **options)
    assert formula == counted


def test_clear_errors(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="cannot reach budget 0.5: .* the smallest reachable budget is 1 "):
        visiondrop.apply(model, "hiprune", budget=0.5)
    info = info_of(model)
    assert policy_for(info, "hiprune", 128.4).describe() == policy_for(info, "hiprune", 128).describe()
    with pytest.raises(ValueError, match="alpha is the share"):
        visiondrop.apply(model, "hiprune", budget=64, alpha=2)
    with pytest.raises(ValueError, match="object_layer is a vision-tower layer, 1-based, from 1 to the feature layer"):
        visiondrop.apply(model, "hiprune", budget=64, object_layer=30)
    with pytest.raises(ValueError, match="lower alpha or raise the budget"):
        visiondrop.apply(model, "hiprune", budget=3, alpha=1.0)
    with pytest.raises(ValueError, match="needs a budget"):
        visiondrop.apply(model, "hiprune")
