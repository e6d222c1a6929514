"""VScan (its parity cases: tests/test_parity.py): the scans against the official run's and by hand, the merge by
hand, the 3:1 budgets, options and FLOPs."""
import pytest
import torch

import visiondrop
from baselines.vscan import merge_into_nearest, window_picks
from helpers import inputs, measure_counts
from parity import load_case, parity_inputs
from visiondrop.efficiency.flops import method_flops
from visiondrop.families.llava import clip_encoder_view


def test_local_and_global_scans_as_official(parity_model):
    """Layer 5's head-mean CLS row, 3 a window in 16 row-major 6x6 windows; layer 22's for the other 48."""
    official, _ = load_case("vscan", "vscan64")
    encoder = official["encoder_stage"]
    with torch.no_grad():
        view = clip_encoder_view(parity_model.model.vision_tower, parity_inputs()["pixel_values"], 22, eager_encoder=True,
                                 scan_layers=(5,))
    local = window_picks(view.importance_at[5][:, :, 1:].mean(1), (24, 24), 3)
    assert local[0].tolist() == encoder["local_indices_window_order"]
    deep = view.importance[:, :, 1:].mean(1).scatter(1, local, 0.0)
    assert set(deep.topk(48, dim=1).indices[0].tolist()) == set(encoder["global_indices_topk_order"])


def test_window_picks_by_hand():
    """A 4x4 grid: 4x4 windows of one patch each (every patch once); an 8x8 grid: the best of each 2x2 window, the
    windows row-major."""
    scores = torch.arange(16.0)[None]
    assert sorted(window_picks(scores, (4, 4), 1)[0].tolist()) == list(range(16))
    grid = torch.arange(64.0)[None] / 100
    grid[0, 0] = 1.0  # window (0, 0) = patches 0, 1, 8, 9: 0 beats 9
    picks = window_picks(grid, (8, 8), 1)[0].tolist()
    assert picks[:4] == [0, 11, 13, 15] and picks[-1] == 63 and len(picks) == 16
    assert window_picks(grid, (8, 8), 2)[0, :2].tolist() == [0, 9]


def test_merge_into_nearest_by_hand():
    """Kept 0 and 2; 1 is nearest 0 (cosine 0.9), 3 nearest 2: each kept token the mean of itself and members."""
    x = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 2.0]]])
    merged = merge_into_nearest(x, torch.tensor([[0, 2]]))
    torch.testing.assert_close(merged, torch.tensor([[[0.95, 0.05], [0.05, 1.5]]]))
    torch.testing.assert_close(merge_into_nearest(x, torch.tensor([[0, 2]]), official_cosine=False), merged)
    assert torch.equal(merge_into_nearest(x, torch.arange(4)[None]), x)
    # each crop merges among its own rows: the second keeps 1 and 3 (0 joins 1, 2 joins 3)
    two = merge_into_nearest(torch.cat([x, x]), torch.tensor([[0, 2], [1, 3]]))
    torch.testing.assert_close(two[0], merged[0])
    torch.testing.assert_close(two[1], torch.tensor([[0.95, 0.05], [0.05, 1.5]]))


@pytest.mark.parametrize("budget,tokens,keep", [(64, 96, 32), (128, 192, 64), (192, 288, 96)])
def test_budgets_follow_the_three_to_one_rule(tiny, budget, tokens, keep):
    """1.5 x budget out of the encoder, budget / 2 from layer 16: the mean over the 32 layers is the budget."""
    model, processor = tiny
    measured, handle = measure_counts(model, inputs(processor, ["What is in the image?"]), "vscan", budget)
    assert measured == [tokens] * 16 + [keep] * 16
    assert handle.policy.describe()["equivalent_tokens"] == budget


def test_fill_and_the_official_arithmetic(tiny):
    """At budget 32 (T = 48: 24 local, 1 a window = 16) the official code keeps 16 + 24 = 40; fill keeps 48."""
    model, processor = tiny
    batch = inputs(processor, ["What is in the image?"])
    filled, _ = measure_counts(model, batch, "vscan", 32)
    official, handle = measure_counts(model, batch, "vscan", 32, fill=False)
    assert filled == [48] * 16 + [16] * 16
    assert official[:16] == [40] * 16 and official[16:] == [round(16 * 40 / 40)] * 16
    assert handle.policy.describe()["equivalent_tokens"] == (16 * 40 + 16 * 16) / 32


def test_explicit_counts_and_fast_path(tiny):
    model, processor = tiny
    batch = inputs(processor, ["What is in the image?"])
    measured, handle = measure_counts(model, batch, "vscan", tokens=96, keep=32)
    assert measured == [96] * 16 + [32] * 16
    fast, _ = measure_counts(model, batch, "vscan", 64, eager_encoder=False)
    assert fast == measured
    with pytest.raises(ValueError, match="smallest reachable budget is 2"):
        visiondrop.apply(model, "vscan", budget=1)
    with pytest.raises(ValueError, match="shallow_layer"):
        visiondrop.apply(model, "vscan", budget=64, shallow_layer=30)


def test_flops_count_the_merge_and_the_last_token_row():
    flops = method_flops("llava-1.5-7b", "vscan", 64)
    assert 0 < flops.overhead < 0.05 * flops.decoder
    dropped, kept, d = 480, 96, 4096
    merge = dropped * kept * d + dropped * d + dropped * (1024 * d + d * d)
    assert flops.overhead > 2 * merge
