"""The scoring rule as a choice of its own: FastV and PyramidDrop with VisionDrop's visual-to-visual scoring."""
import pytest
import torch

import visiondrop
from baselines.pyramiddrop import policy as pyramiddrop_policy
from helpers import inputs, measure_counts
from visiondrop.engine import DecoderCut
from visiondrop.families import ModelInfo
from visiondrop.methods import method
from visiondrop.testing.tiny import demo_image

QUESTIONS = ["What is in the image?", "How many red shapes are on the left side of the picture?"]
INFO = ModelInfo(n_visual=576, n_layers=32, vision_layer=22, cls_kept=False)


def kept_and_counts(model, processor, name, question, **options):
    counts, handle = measure_counts(model, inputs(processor, [question], [demo_image(5)]), name, 64, **options)
    return [k.tolist() for k in handle.trace.kept[0]], counts


@pytest.mark.parametrize("name", ["fastv", "pyramiddrop"])
def test_visual_scoring_never_depends_on_the_question_and_keeps_the_counts(tiny, name):
    model, processor = tiny
    text = [kept_and_counts(model, processor, name, q) for q in QUESTIONS]
    visual = [kept_and_counts(model, processor, name, q, scoring="visual") for q in QUESTIONS]
    assert text[0][0] != text[1][0]  # the official text-guided rule follows the question ...
    assert visual[0][0] == visual[1][0]  # ... the visual one keeps the same tokens for every question
    assert visual[0][0] != text[0][0]
    assert visual[0][1] == visual[1][1] == text[0][1] == text[1][1]  # tokens per layer, counted with hooks


class CraftedCut(DecoderCut):
    """A cut whose attention rows are given, recording what the policy asked for."""

    def attention(self, layer_idx, queries, hidden=None, keys=None):
        self.scratch["asked"] = (layer_idx, queries.tolist(), hidden)
        return self.scratch["probs"]


def test_pyramiddrop_visual_scoring_by_hand():
    # sequence: 1 text token, 3 visual tokens (indices 1..3), 1 text token; queries are the visual rows
    probs = torch.zeros(1, 2, 3, 5)
    probs[0, 0] = torch.tensor([[0.5, 0.5, 0, 0, 0], [0.2, 0.1, 0.7, 0, 0], [0.1, 0.1, 0.1, 0.7, 0]])
    probs[0, 1] = torch.tensor([[0.0, 1.0, 0, 0, 0], [0.0, 0.2, 0.8, 0, 0], [0.4, 0.0, 0.5, 0.1, 0]])
    # visual columns, mean over heads and the 3 query rows (masked zeros included): 1.9/6, 2.1/6, 0.8/6
    cut = CraftedCut(layer_idx=8, layers=None, hidden=torch.randn(1, 5, 4), prev_hidden=None,
                     mask=torch.ones(1, 5, dtype=torch.bool), cos=None, sin=None,
                     visual=torch.tensor([[1, 2, 3]]), original_visual=4, samples=[0],
                     scratch={"probs": probs})
    pd = pyramiddrop_policy(INFO, layer_list=[2, 8, 16], decay=0.5, scoring="visual")
    torch.testing.assert_close(pd.scores(cut), torch.tensor([[1.9, 2.1, 0.8]]) / 6)
    assert cut.scratch["asked"] == (8, [[1, 2, 3]], None)  # the layer about to run, visual query rows
    assert pd.select_decoder(cut).keep.tolist() == [[1]]  # stage 2 keeps int(4 * 0.5**2) = 1 of the original 4


def test_scoring_options_and_overhead():
    assert method("fastv").overhead(scoring="visual").rows == "visual"
    assert method("fastv").overhead().rows == "text"  # the last prompt token (engine.scoring.RULES)
    assert method("pyramiddrop").overhead(scoring="visual").rows == "visual"
    assert method("pyramiddrop").options["scoring"] == method("fastv").options["scoring"] == "text"
    with pytest.raises(ValueError, match=r"PyramidDrop scoring must be one of \('text', 'visual'\)"):
        pyramiddrop_policy(INFO, budget=64, scoring="all_queries")


def test_visual_scoring_in_a_batch_equals_each_sample_alone(tiny):
    model, processor = tiny
    images = [demo_image(0), None, demo_image(2)]
    batch = inputs(processor, ["What is in the image?", "Colour?", QUESTIONS[1]], images)
    with visiondrop.apply(model, "pyramiddrop", 64, scoring="visual") as handle, torch.no_grad():
        model(**batch)
        together = [[k.tolist() for k in handle.trace.kept[b]] for b in (0, 2)]
        alone = []
        for q, img in (("Other question?", images[0]), ("And another?", images[2])):
            model(**inputs(processor, [q], [img]))
            alone.append([k.tolist() for k in handle.trace.kept[0]])
    assert together == alone
