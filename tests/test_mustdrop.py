"""MustDrop: the window similarity, the spatial merge, the key set and the dual filter by hand; budgets and
thresholds; the key set protected at every cut; the merge inside the tower measured with hooks (parity with the
official code on the prefill: tests/test_parity.py, fixtures tests/parity/mustdrop)."""
import math

import pytest
import torch

import visiondrop
from baselines.mustdrop import dual_filter, key_set, policy, spatial_merge, window_similarity
from helpers import inputs, measure_counts
from parity import load_case, parity_inputs
from visiondrop.core import ModelInfo
from visiondrop.families import info_of
from visiondrop.families.llava import tower_layers

E0, E1 = [1.0, 0.0], [0.0, 1.0]


def grid(*windows: list[list[float]]) -> torch.Tensor:
    """A 6 x 6 grid of 2-d tokens [1, 36, 2] from four 3 x 3 windows (row-major), each given as its 9 tokens."""
    tiles = torch.tensor(windows).view(2, 2, 3, 3, 2)  # tile row, tile col, row in tile, col in tile
    return tiles.permute(0, 2, 1, 3, 4).reshape(1, 36, 2)


SAME = [E0] * 9
MIXED = [E0, E1] * 4 + [E0]  # five E0, four E1


def test_window_similarity_by_hand():
    """Mean cosine of the 72 ordered pairs: 1 for identical tokens; five E0 and four E1 give (5*4 + 4*3) / 72."""
    similarity = window_similarity(grid(SAME, MIXED, MIXED, MIXED), side=6)
    torch.testing.assert_close(similarity, torch.tensor([[1.0, 32 / 72, 32 / 72, 32 / 72]]))


def test_spatial_merge_by_hand():
    """Only the first window reaches 0.8: it becomes the mean of its 9 tokens right after CLS, then the other 27
    patches in raster order; scaled tokens show the mean."""
    patches = grid([[2.0, 0.0]] * 8 + [[5.0, 0.0]], MIXED, MIXED, MIXED)  # window 0: parallel, similarity 1
    cls = torch.full((1, 1, 2), 7.0)
    out = spatial_merge(torch.cat([cls, patches], 1), first=1)
    assert out.shape == (1, 1 + 1 + 27, 2)
    assert out[0, 0].tolist() == [7.0, 7.0]
    torch.testing.assert_close(out[0, 1], torch.tensor([(8 * 2.0 + 5.0) / 9, 0.0]))
    window0 = {r * 6 + c for r in range(3) for c in range(3)}
    rest = [i for i in range(36) if i not in window0]
    assert torch.equal(out[0, 2:], patches[0, rest])


def test_spatial_merge_takes_the_fewest_windows_over_the_crops_in_similarity_order():
    """Crop 0 has two mergeable windows (similarities 1 and ~0.98), crop 1 one: each merges one, its most similar."""
    near = [E0] * 8 + [[1.0, 0.5]]
    crops = torch.cat([grid(near, SAME, MIXED, MIXED), grid(MIXED, MIXED, SAME, MIXED)])
    out = spatial_merge(crops, first=0)
    assert out.shape == (2, 36 - 8, 2)
    torch.testing.assert_close(out[:, 0], torch.tensor([E0, E0]))  # crop 0: window 1 (1.0) before window 0
    assert spatial_merge(grid(MIXED, MIXED, MIXED, MIXED), first=0).shape == (1, 36, 2)  # none: unchanged


def test_key_set_is_the_top_eight_percent_by_the_head_mean_cls_row():
    """25 patches: ceil(0.08 * 25) = 2 keys, by the mean over 2 heads, CLS column left out, topk order."""
    importance = torch.zeros(1, 2, 26)
    importance[0, 0, 0] = 9.0  # CLS's own column never counts
    importance[0, :, 1 + 7] = torch.tensor([0.2, 0.4])  # mean 0.3
    importance[0, :, 1 + 3] = torch.tensor([0.9, 0.1])  # mean 0.5
    importance[0, :, 1 + 20] = torch.tensor([0.5, 0.0])  # mean 0.25
    assert key_set(importance, first=1).tolist() == [[3, 7]]


def test_dual_filter_drops_only_tokens_below_both_thresholds():
    """Columns' sums 0.3, 0.02, 0.05, 0.63 (total 1): global bar 0.1 x 1; individual bar 0.04. Token 1 is below
    both (dropped); token 2 is below the global bar but one row gives it 0.045 (kept)."""
    probs = torch.tensor([[0.2, 0.01, 0.005, 0.285], [0.1, 0.01, 0.045, 0.345]])
    assert dual_filter(probs, 0.1, 0.04).tolist() == [True, False, True, True]
    assert dual_filter(probs, 0.0, 1.0).all()  # nothing under a zero global bar


def test_budget_rows_choose_the_scripts_thresholds(tiny):
    info = info_of(tiny[0])
    for budget, thresholds in ((192, (0.001, 0.001)), (128, (0.0012, 0.001)), (64, (0.011, 0.01))):
        built = policy(info, budget)
        assert (built.global_thr, built.individual_thr) == thresholds
        assert built.cut_layers == (3, 7, 11, 15)
    assert policy(info, global_thr=0.005, individual_thr=0.001).global_thr == 0.005
    shallow = ModelInfo(576, 4, 22, False)  # the demo's 4 layers: the first three filters, after layers 0, 1, 2
    assert policy(shallow, 64).cut_layers == (1, 2, 3)
    with pytest.raises(ValueError, match="rows 64, 128, 192.*global_thr="):
        policy(info, 100)
    with pytest.raises(ValueError, match="together"):
        policy(info, global_thr=0.005)


def test_key_set_survives_every_cut(tiny):
    """Thresholds no token clears (global_thr=1, individual_thr=1) drop all but the key set: ceil(0.08 n) tokens
    from the first cut on, for the n tokens the merge left, measured with hooks."""
    model, processor = tiny
    measured, handle = measure_counts(model, inputs(processor, ["What is in the image?"]), "mustdrop", None,
                                      global_thr=1.0, individual_thr=1.0)
    n = measured[0]
    assert measured == [n] * 3 + [math.ceil(0.08 * n)] * 29 == handle.trace.tokens_per_layer[0]
    assert handle.policy.describe()["tokens_per_layer"] == measured


def test_merge_runs_inside_the_tower_after_layer_zero(parity_model):
    """On the parity image, the tower's layers 1-23 see the merged tokens (CLS + 368), as the official run did."""
    official = load_case("mustdrop", "md192")[0]
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, k: seen.append(k.get("hidden_states", a[0] if a else None)
                                                                          .shape[1]), with_kwargs=True)
             for layer in tower_layers(parity_model.model.vision_tower)]
    try:
        with visiondrop.apply(parity_model, "mustdrop", 192), torch.no_grad():
            parity_model(**parity_inputs())
    finally:
        for hook in hooks:
            hook.remove()
    assert seen == official["tower_tokens_per_layer"] == [577] + [369] * 23


def test_next_keeps_its_base_images_key_set(tiny_next):
    """LLaVA-NeXT: with thresholds no token clears, each cut keeps the key set of the base image (the first crop,
    laid out first as it is): ceil(0.08 x its merged patches) tokens, whatever the sub-crops hold."""
    model, processor = tiny_next
    processor.tokenizer.padding_side = "left"
    batch = inputs(processor, ["What is in the image?"])
    with visiondrop.apply(model, "mustdrop", global_thr=1.0, individual_thr=1.0) as handle, torch.no_grad():
        model(**batch)
    base = handle.policy._keys[0]
    assert base.numel() > 0 and int(base.max()) < handle.trace.tokens_per_layer[0][0]
    assert handle.trace.tokens_per_layer[0][3:] == [base.numel()] * 29
