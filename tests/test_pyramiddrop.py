"""PyramidDrop (parity with the official run: tests/test_parity.py): the scoring rule by hand, schedules, text,
options and errors."""
import pytest
import torch

from baselines.pyramiddrop import policy as pyramiddrop_policy
from helpers import inputs, kept_per_question, measure_counts
from visiondrop.engine import DecoderCut
from visiondrop.families import ModelInfo

QUESTIONS = ["What is in the image?", "Is there a red circle in the picture? Answer yes or no.", "Colour?"]
INFO = ModelInfo(n_visual=576, n_layers=32, vision_layer=22, cls_kept=False)


class CraftedCut(DecoderCut):
    """A cut whose attention rows are given, recording what the policy asked for."""

    def attention(self, layer_idx, queries, hidden=None, keys=None):
        self.scratch["asked"] = (layer_idx, queries.tolist(), hidden)
        return self.scratch["probs"]


def test_score_is_last_token_row_of_the_next_layer_mean_over_heads_counts_from_original():
    # sequence: 2 text tokens, 5 visual tokens (indices 2..6), 1 text token (index 7, the last prompt token)
    probs = torch.zeros(1, 2, 1, 8)  # [G, heads, one query row, keys]
    probs[0, 0, 0, 2:7] = torch.tensor([0.30, 0.00, 0.10, 0.05, 0.20])
    probs[0, 1, 0, 2:7] = torch.tensor([0.00, 0.50, 0.10, 0.30, 0.00])
    # head means: .15 .25 .10 .175 .10 -> top-3 by score: visual 1, 3, 0; kept in block order 0, 1, 3
    # (head 0 alone would keep 0, 4, 2). Stage 2 keeps int(N0 * lambda**2) = int(10 * .3025) = 3 tokens of
    # the original 10, not int(5 * .55) = 2 of the 5 that stage 1 left.
    cut = CraftedCut(layer_idx=8, layers=None, hidden=torch.randn(1, 8, 4), prev_hidden=torch.randn(1, 8, 4),
                     mask=torch.ones(1, 8, dtype=torch.bool), cos=None, sin=None,
                     visual=torch.arange(2, 7).unsqueeze(0), original_visual=10, samples=[0],
                     scratch={"probs": probs})
    pd = pyramiddrop_policy(INFO, layer_list=[2, 8, 16], decay=0.55)
    sel = pd.select_decoder(cut)
    assert sel.keep.tolist() == [[0, 1, 3]] and sel.merged is None
    assert cut.scratch["asked"] == (8, [[7]], None)  # layer 8 itself, on the states entering it, last token


def expected_counts(describe: dict, n_layers: int = 32) -> list[int]:
    counts, layers = describe["keep_counts"], describe["layer_list"]
    return [counts[sum(i >= layer for layer in layers)] for i in range(n_layers)]


@pytest.mark.parametrize("options,segments", [
    ({"budget": 192}, [576, 322, 180, 100]),
    ({"budget": 128}, [576, 241, 101, 42]),
    ({"budget": 64}, [576, 110, 21, 4]),
    ({"budget": 36}, [576, 0, 0, 0]),  # the smallest reachable budget drops every visual token after layer 2
    ({"layer_list": [8, 16, 24], "decay": 0.5}, [576, 288, 144, 72]),  # the official default
])
def test_measured_tokens_per_layer_follow_schedule(tiny, options, segments):
    model, processor = tiny
    measured, handle = measure_counts(model, inputs(processor, QUESTIONS[:1]), "pyramiddrop", **options)
    describe = handle.policy.describe()
    assert describe["keep_counts"] == segments
    assert measured == expected_counts(describe)
    assert handle.trace.tokens_per_layer == [measured]
    assert handle.trace.mean_tokens == [describe["equivalent_tokens"]]
    if "budget" in options:
        assert options["budget"] - 1 < describe["equivalent_tokens"] <= options["budget"]


def test_selection_depends_on_the_question(tiny):
    model, processor = tiny
    kept = kept_per_question(model, processor, "pyramiddrop", 64)
    assert [len(k) for k in kept[0]] == [110, 21, 4]
    assert kept[0] != kept[1]


def test_budgets_and_options():
    assert pyramiddrop_policy(INFO, budget=64).describe()["decay"] == pytest.approx(0.1916, abs=1e-4)
    assert pyramiddrop_policy(INFO, budget=192, layer_list=[8, 16, 24]).describe()["keep_counts"] == [576, 145, 36, 9]
    shallow = ModelInfo(n_visual=576, n_layers=16, vision_layer=22, cls_kept=False)
    assert pyramiddrop_policy(shallow, budget=64).cut_layers == (1, 4, 8)  # relative depth
    four = ModelInfo(n_visual=576, n_layers=4, vision_layer=22, cls_kept=False)
    assert pyramiddrop_policy(four, budget=192).cut_layers == (1, 2, 3)  # 0.25, 1, 2 kept distinct
    with pytest.raises(ValueError, match=r"cannot reach budget 128.*smallest reachable budget is 144"):
        pyramiddrop_policy(four, budget=128)
    with pytest.raises(ValueError, match=r"layer_list \[8, 16, 24\] cannot reach budget 128.*is 144"):
        pyramiddrop_policy(INFO, budget=128, layer_list=[8, 16, 24])
    with pytest.raises(ValueError, match="needs budget= or decay="):
        pyramiddrop_policy(INFO)
    with pytest.raises(ValueError, match="must be between 0 and 1"):
        pyramiddrop_policy(INFO, decay=1.5)
    for bad in ([8, 2, 16], [0, 8, 16], [2, 8, 32], []):
        with pytest.raises(ValueError, match="layer_list must be one or more increasing"):
            pyramiddrop_policy(INFO, budget=64, layer_list=bad)
