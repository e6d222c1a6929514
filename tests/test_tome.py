"""ToMe: one bipartite step by hand, the schedule, budgets and r, merging inside the tower, other families, FLOPs,
errors (parity with LightCompress's ToMe on the original LLaVA, tests/parity/tome, fragile: tests/test_parity.py)."""
import pytest
import torch

import visiondrop
from baselines.tome import bipartite_merge, even_schedule, remaining, smallest_budget
from helpers import flops_by_formula_and_counter, inputs, measure_counts
from visiondrop.families import info_of
from visiondrop.families.llava import tower_layers

QUESTIONS = ["What is in the image?", "Is there a red circle in the picture? Answer yes or no.", "Colour?"]


def test_one_bipartite_step_by_hand():
    """Tokens 0..5 (0 = CLS): a = 0, 2, 4 and b = 1, 3, 5. By the metric's angles, a-token 2 matches b-token 3 best
    (cosine 1), a-token 4 matches 5 (0.98), CLS never merges; r = 1 merges 2 into 3: [0, 4, 1, mean(2, 3), 5]."""
    angles = torch.tensor([90.0, 0, 40, 40, 170, 180]).deg2rad()
    metric = torch.stack([angles.cos(), angles.sin()], -1)[None]
    x = torch.arange(6.0)[None, :, None]
    assert bipartite_merge(x, metric, 1, protect_first=True)[0, :, 0].tolist() == [0, 4, 1, 2.5, 5]
    assert bipartite_merge(x, metric, 2, protect_first=True)[0, :, 0].tolist() == [0, 1, 2.5, 4.5]
    assert bipartite_merge(x, metric, 9, protect_first=True).shape[1] == 4  # at most (6 - 1) // 2 merges
    assert bipartite_merge(x, metric, 0, protect_first=True) is x


def test_schedule_spreads_merges_evenly_under_the_cap():
    assert even_schedule(384, 23) == [17] * 16 + [16] * 7
    assert remaining(577, [16] * 23, 1)[-1] == 209  # LightCompress's r = 16: 208 patches reach the LLM
    assert remaining(9, [4, 4], 1) == [9, 5, 3]  # capped at (tokens - 1) // 2


@pytest.mark.parametrize("budget,options,tokens", [(192, {}, 192), (64, {}, 64), (None, {"r": 16}, 208),
                                                   (None, {"r": [20] * 10 + [0] * 13}, 376), (24, {}, 24)])
def test_measured_tokens_per_layer(tiny, budget, options, tokens):
    model, processor = tiny
    measured, handle = measure_counts(model, inputs(processor, QUESTIONS[:1]), "tome", budget, **options)
    assert measured == [tokens] * 32 == handle.trace.tokens_per_layer[0]
    assert handle.policy.describe()["equivalent_tokens"] == tokens


def test_tower_layers_run_fewer_tokens(tiny):
    """The merges happen inside the tower: each CLIP layer sees the schedule's count (counted with pre-hooks), and
    the layers are the stock ones again afterwards."""
    model, processor = tiny
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
             for layer in tower_layers(model.model.vision_tower)]
    try:
        with visiondrop.apply(model, "tome", r=16), torch.no_grad():
            model(**inputs(processor, QUESTIONS[:1]))
    finally:
        for hook in hooks:
            hook.remove()
    assert seen == remaining(577, [16] * 23, 1)
    assert all("forward" not in vars(layer) for layer in tower_layers(model.model.vision_tower))


def test_next_and_video_merge_per_crop(tiny_next, tiny_video):
    model, processor = tiny_next
    from visiondrop.testing.tiny import demo_image

    batch = inputs(processor, QUESTIONS[:1], [demo_image(0, (500, 400))])
    with visiondrop.apply(model, "tome", budget=640) as handle, torch.no_grad():
        model(**batch)
    assert handle.trace.tokens_per_layer[0][0] == 640  # 128 a crop, compact layout
    info = info_of(tiny_video[0])
    assert smallest_budget(info) % info.crops == 0 and info.crops == 8


def test_overhead_formula_matches_torch_flop_counter(tiny):
    """The tower's own shrinking layers and the matching's products, as FlopCounterMode counts a real forward."""
    model, processor = tiny
    formula, counted = flops_by_formula_and_counter(model, inputs(processor, QUESTIONS[:1]), "tome", 128)
    assert formula == counted


def test_clear_errors(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="r is one merge count >= 0 for every layer or a list of 23"):
        visiondrop.apply(model, "tome", r=[16, 16])
    with pytest.raises(ValueError, match="disagrees with r=16, which keeps 208"):
        visiondrop.apply(model, "tome", budget=192, r=16)
    with pytest.raises(ValueError, match="needs budget= or r="):
        visiondrop.apply(model, "tome")
