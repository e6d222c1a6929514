"""DART: the official rule transcribed and fed the official scores (the run itself: tests/test_parity.py), its
selection by hand, budgets, options."""
from dataclasses import replace

import pytest
import torch
from torch import nn

import visiondrop
from baselines.dart import DART, policy, smallest_budget, truncation_for_budget
from helpers import flops_and_counter, inputs, kept_per_question, measure_counts, prompt
from parity import load_case, parity_inputs
from visiondrop.engine import DecoderCut
from visiondrop.families import ModelInfo, flops_dims, info_of
from visiondrop.testing.tiny import demo_image

LLAVA_7B = ModelInfo(n_visual=576, n_layers=32, vision_layer=22, cls_kept=False)
IMAGE_START, N_IMAGE = 35, 576  # the fixture's image block, in sequence positions


def official_selection(scores: dict, pivot_image: int, pivot_text: int, truncation: int, order=list) -> list[int]:
    """The official `get_retained_image_token`, transcribed step for step (sets, lists, topk), fed the official
    run's scores instead of its own: key L1 norms and, per pivot position, -cos against the 576 image tokens."""
    token_topk = truncation // (pivot_image + pivot_text)
    image = (scores["image_norms"].topk(pivot_image).indices + IMAGE_START).tolist()
    text = (scores["text_norms"].topk(pivot_text).indices + IMAGE_START + N_IMAGE).tolist()
    indices = set(image + text)
    valid = set(range(IMAGE_START, IMAGE_START + N_IMAGE)) - set(image)
    valid_list = list(valid)
    for item in order(indices):
        cos = scores["neg_cos"][item][[v - IMAGE_START for v in valid_list]]
        picks = [valid_list[i] for i in cos.topk(token_topk).indices]
        indices.update(picks)
        valid.difference_update(picks)
        valid_list = list(valid)
    indices.difference_update(text)
    return sorted(i - IMAGE_START for i in indices)


@pytest.fixture(scope="module")
def official_scores() -> dict:
    official, logits = load_case("dart", "dart128")
    rows = logits["pivot_neg_cos_over_image"]  # one row per official pivot, in processing order
    return {"image_norms": logits["image_key_l1_norms"], "text_norms": logits["text_key_l1_norms"],
            "neg_cos": dict(zip(official["cut"]["pivot_processing_order_positions"], rows))}


def test_transcription_reproduces_the_official_kept_set(official_scores):
    official, _ = load_case("dart", "dart128")
    assert official_selection(official_scores, 4, 4, 128) == official["cut"]["kept_indices_sorted"]


@pytest.mark.parametrize("truncation,pivot_image,pivot_text", [(192, 4, 4), (64, 4, 4), (128, 2, 2), (96, 4, 0),
                                                                   (64, 0, 4)])
def test_other_official_settings_select_as_the_official_rule(parity_model, official_scores, truncation, pivot_image,
                                                            pivot_text):
    """No official run exists for these settings; the official rule on the official run's scores stands in (every
    pivot of a smaller count is among the official 8, whose rows the fixture holds)."""
    options = dict(truncation=truncation, pivot_image=pivot_image, pivot_text=pivot_text)
    with visiondrop.apply(parity_model, "dart", **options) as handle, torch.no_grad():
        parity_model(**parity_inputs())
        kept = handle.trace.kept[0][0].tolist()
        assert handle.trace.tokens_per_layer[0] == [576] * 2 + [handle.policy.describe()["keep"]] * 30
    assert kept == official_selection(official_scores, pivot_image, pivot_text, truncation)
    assert len(kept) == pivot_image + (pivot_image + pivot_text) * (truncation // (pivot_image + pivot_text))


def test_pivot_order_position_is_the_sorted_rule(parity_model, official_scores):
    """The fixture records what sorting the pivots by position changes: 6 of the 132 kept tokens."""
    official, _ = load_case("dart", "dart128")
    with visiondrop.apply(parity_model, "dart", truncation=128, pivot_order="position") as handle, torch.no_grad():
        parity_model(**parity_inputs())
        kept = handle.trace.kept[0][0].tolist()
    assert kept == official_selection(official_scores, 4, 4, 128, order=sorted)
    changed = official["cut"]["pivot_order_sensitivity"]["sorted_ascending"]["kept_tokens_changed"]
    assert len(set(kept) - set(official["cut"]["kept_indices_sorted"])) == changed == 6


class CraftedCut(DecoderCut):
    """A cut with given keys (post-RoPE, of layer K-1) and hidden states; the final norm stretches channel 2."""

    def __init__(self, keys: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor, visual: torch.Tensor):
        norm = nn.Linear(3, 3, bias=False)
        norm.weight.data = torch.diag(torch.tensor([1.0, 1.0, 10.0]))
        super().__init__(layer_idx=2, layers=None, hidden=hidden, prev_hidden=hidden - 1, mask=mask, cos=None,
                         sin=None, visual=visual, original_visual=visual.shape[1], samples=[0],
                         final_norm=norm)
        self.given_keys, self.calls = keys, []

    def keys(self, layer_idx, hidden=None):
        self.calls.append((layer_idx, hidden))
        return self.given_keys


CRAFTED = replace(LLAVA_7B, n_visual=4)  # the crafted image has 4 visual tokens


def crafted_cut(pad: int = 0) -> CraftedCut:
    """One sample: [padding x pad, t0, v0, v1, v2, v3, t5, t6]; one key head of 2 channels, hidden width 3."""
    key_l1 = torch.tensor([0.0] * pad + [0, 5, 1, 2, 3, 9, 1])
    keys = (key_l1.view(-1, 1) * torch.tensor([0.5, -0.5])).view(1, 1, -1, 2)
    vectors = [[1, 1, 1], [1, 0, 0], [.1, 1, 0], [.2, 0, 1], [1, .1, 0], [0, 1, 0], [1, 1, 1]]
    hidden = torch.tensor([[0.0, 0, 0]] * pad + vectors).unsqueeze(0)
    mask = torch.tensor([False] * pad + [True] * 7).unsqueeze(0)
    return CraftedCut(keys, hidden, mask, torch.arange(pad + 1, pad + 5).unsqueeze(0))


@pytest.mark.parametrize("pad", [0, 3])
def test_selection_by_hand(pad):
    """Pivots by key L1 norm; each pivot in turn takes the remaining image tokens least similar to it."""
    cut = crafted_cut(pad)
    dart = DART(CRAFTED, k=2, truncation=2, pivot_image=1, pivot_text=1, pivot_order="position", similarity="hidden")
    image, text = dart.pivots(cut)
    assert cut.calls[0] == (1, cut.prev_hidden)  # layer K-1's keys, of what entered it
    assert image.tolist() == [[0]] and text.tolist() == [[pad + 5]]  # v0, and t5 of the text after the image
    # v0 = (1,0,0) takes v1 (cos 0.0995; v2: 0.196), then t5 = (0,1,0) takes v2 (cos 0; v3: 0.0995)
    assert dart.select_decoder(cut).keep.tolist() == [[0, 1, 2]]
    dart.similarity = "final_norm"  # x10 on channel 2: v0 now takes v2 (cos 0.02), t5 then v3 (v1: 0.995)
    assert dart.select_decoder(cut).keep.tolist() == [[0, 2, 3]]
    dart.truncation = 4  # two picks each do not fit in the 3 candidates: one each
    assert dart.select_decoder(cut).keep.tolist() == [[0, 2, 3]]
    assert dart.kept(4, 4) == 3


def test_set_order_counts_positions_from_the_first_real_token():
    """Left padding must not change the order: the official sequence has none. Unpadded, the pivots are at
    positions 1, 4 (v0, v3) and 5, 6 (t5, t6); padded by 5, a set of the raw indices would visit 9, 10, 11, 6."""
    dart = DART(CRAFTED, k=2, truncation=4, pivot_image=2, pivot_text=2, pivot_order="set", similarity="hidden")
    orders = []
    for pad in (0, 5):
        cut = crafted_cut(pad)
        orders.append((dart.processing_order(cut, *dart.pivots(cut)) - pad).tolist())
    assert orders[0] == orders[1] == [list({1, 4, 5, 6})]
    assert list({6, 9, 10, 11}) == [9, 10, 11, 6]


@pytest.mark.parametrize("budget,truncation,keep", [(192, 160, 164), (128, 96, 100), (64, 24, 28), (39.75, 0, 4),
                                                    (219.75, 192, 196), (159.75, 128, 132), (99.75, 64, 68)])
def test_budget_to_truncation(budget, truncation, keep):
    assert truncation_for_budget(budget, LLAVA_7B, 2, 4, 4) == truncation
    described = policy(LLAVA_7B, budget).describe()
    assert (described["truncation"], described["keep"]) == (truncation, keep)
    assert abs(described["equivalent_tokens"] - budget) <= 30 * 4 / 32  # within half a step of 8 picks


def test_measured_tokens_per_layer_follow_schedule(tiny):
    model, processor = tiny
    measured, handle = measure_counts(model, inputs(processor, ["What is in the image?"]), "dart", 128)
    assert measured == [576] * 2 + [100] * 30
    assert handle.policy.describe()["equivalent_tokens"] == sum(measured) / 32 == 129.75


def test_next_counts_follow_each_samples_own_grid(tiny_next):
    """Truncation is a share of the nominal 2880, scaled to each sample's tokens: 144 at budget 320."""
    model, processor = tiny_next
    assert policy(info_of(model), 320).describe()["truncation"] == 144
    for size, n0 in (((672, 336), 1752), ((500, 400), 2438)):
        batch = dict(processor(text=[prompt("What is in the image?")], images=[demo_image(0, size)],
                               return_tensors="pt"))
        measured, _ = measure_counts(model, batch, "dart", 320)
        assert measured == [n0] * 2 + [4 + 8 * (round(144 * n0 / 2880) // 8)] * 30


def test_flops_count_the_scoring_as_torch_counts_it(tiny):
    """The formula with DART's overhead (keys of every token, pivots x image tokens) is what FlopCounterMode counts
    on a real pruned forward, the policy's own products included."""
    model, processor = tiny
    batch = inputs(processor, ["What is in the image?"])
    formula, counter = flops_and_counter(model, batch, "dart", 64)
    dims = flops_dims(model.config)
    n = batch["input_ids"].shape[1]  # every token, the 576 visual ones and the text
    assert formula.overhead == 2 * (n * dims.hidden * dims.n_kv_heads * dims.head_dim + 8 * 576 * dims.hidden)
    assert formula.total == counter.get_total_flops()


def test_question_changes_the_kept_set(tiny):
    model, processor = tiny
    kept = kept_per_question(model, processor, "dart", 64)
    assert len(kept[0][0]) == len(kept[1][0]) == 28 and kept[0] != kept[1]


def test_k_maps_by_relative_depth():
    four_layers = ModelInfo(n_visual=576, n_layers=4, vision_layer=22, cls_kept=False)
    assert policy(four_layers, 192).describe()["k"] == 1
    assert smallest_budget(four_layers) == (576 + 3 * 4) / 4
    assert policy(LLAVA_7B, 64, k=3).cut_layers == (3,)


def test_clear_errors(tiny):
    model, processor = tiny
    with pytest.raises(ValueError, match="k=3 .* cannot reach budget 50.*smallest reachable budget is 57.625"):
        visiondrop.apply(model, "dart", budget=50, k=3)
    with pytest.raises(ValueError, match="DART k .* must be one or more increasing layers from 1 to 31"):
        visiondrop.apply(model, "dart", budget=64, k=0)
    with pytest.raises(ValueError, match="pivot_order must be one of"):
        visiondrop.apply(model, "dart", budget=64, pivot_order="random")
    with pytest.raises(ValueError, match="similarity must be one of"):
        visiondrop.apply(model, "dart", budget=64, similarity="attention")
    with pytest.raises(ValueError, match="truncation .* between 0 and 576"):
        visiondrop.apply(model, "dart", truncation=600)
    with pytest.raises(ValueError, match="at least one pivot"):
        visiondrop.apply(model, "dart", budget=64, pivot_image=0, pivot_text=0)
    with pytest.raises(ValueError, match="budget= or truncation="):
        visiondrop.apply(model, "dart")
    batch = dict(processor(text=["USER: What is this? <image>"], images=[demo_image(0)], return_tensors="pt"))
    with visiondrop.apply(model, "dart", budget=64), pytest.raises(ValueError, match="only 0 there"):
        model(**batch)
