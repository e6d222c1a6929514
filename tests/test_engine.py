"""The engine and VisionDrop on a tiny full-depth LLaVA-1.5: counts, caches, backends, errors (the contract every
method keeps is in tests/test_contract.py)."""
import pytest
import torch

import visiondrop
from helpers import greedy, inputs, kept_per_question, measure_counts
from visiondrop.testing.tiny import demo_image, load_tiny

QUESTIONS = ["What is in the image?", "Is there a red circle in the picture? Answer yes or no.", "Colour?"]


@pytest.mark.parametrize("budget,segments", [(32, [48, 35, 26, 19]), (64, [96, 70, 52, 38]),
                                             (128, [192, 140, 104, 76]), (192, [288, 210, 156, 114])])
def test_measured_tokens_per_layer_follow_schedule(tiny, budget, segments):
    model, processor = tiny
    measured, handle = measure_counts(model, inputs(processor, QUESTIONS[:1]), "visiondrop", budget)
    assert measured == [n for n in segments for _ in range(8)]
    assert sum(measured) / len(measured) == budget
    assert handle.trace.tokens_per_layer == [measured]
    assert handle.trace.mean_tokens == [budget]


def test_selection_ignores_the_question(tiny):
    model, processor = tiny
    kept = kept_per_question(model, processor, "visiondrop", 64)
    assert kept[0] == kept[1]
    assert len(kept[0]) == 4 and len(kept[0][0]) == 83  # encoder: 84 dominant incl. CLS -> 83 patches


def test_sdpa_and_eager_give_the_same_tokens(tiny_dir):
    results = []
    for impl in ("sdpa", "eager"):
        model, processor = load_tiny(tiny_dir, attn_implementation=impl)
        batch = inputs(processor, QUESTIONS, [demo_image(0), demo_image(1), demo_image(2)])
        with visiondrop.apply(model, "visiondrop", budget=64) as handle:
            results.append((greedy(model, batch), [[k.tolist() for k in s] for s in handle.trace.kept]))
    assert torch.equal(results[0][0], results[1][0])
    assert results[0][1] == results[1][1]


def test_clear_errors(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="unknown method 'fastvv'.*visiondrop"):
        visiondrop.apply(model, "fastvv", budget=64)
    with pytest.raises(ValueError, match="cannot reach budget 500.*between 1 and 384"):
        visiondrop.apply(model, "visiondrop", budget=500)
    with pytest.raises(ValueError, match="exactly one of budget= or schedule="):
        visiondrop.apply(model, "visiondrop")
    with pytest.raises(ValueError, match="malformed VisionDrop schedule"):
        visiondrop.apply(model, "visiondrop", schedule={"encoder": [42], "layers": [8], "decoder": [[30, 5]]})
    with pytest.raises(TypeError, match="unsupported model type LlamaForCausalLM"):
        from transformers import LlamaForCausalLM
        visiondrop.apply(LlamaForCausalLM(model.config.text_config), "visiondrop", budget=64)
    with visiondrop.apply(model, "none"), pytest.raises(RuntimeError, match="already applied"):
        visiondrop.apply(model, "visiondrop", budget=64)


def test_generated_image_token_id_is_plain_text(tiny):
    """A (random) model may emit the image token id while decoding: it carries no image and must not re-prune."""
    from transformers import LogitsProcessor, LogitsProcessorList

    model, processor = tiny

    class ForceImageTokenFirst(LogitsProcessor):
        def __call__(self, input_ids, scores):
            if input_ids.shape[1] == start:
                scores[:, :] = -float("inf")
                scores[:, model.config.image_token_id] = 0
            return scores

    batch = inputs(processor, QUESTIONS[:2])
    start = batch["input_ids"].shape[1]
    forced = LogitsProcessorList([ForceImageTokenFirst()])
    reference = greedy(model, batch, logits_processor=forced)
    assert (reference[:, 0] == model.config.image_token_id).all()
    with visiondrop.apply(model, "none"):
        assert torch.equal(greedy(model, batch, logits_processor=forced), reference)
    with visiondrop.apply(model, "visiondrop", budget=64) as handle:
        pruned = greedy(model, batch, logits_processor=forced)
        assert (pruned[:, 0] == model.config.image_token_id).all() and pruned.shape == reference.shape
        assert handle.trace.tokens_per_layer == [[96] * 8 + [70] * 8 + [52] * 8 + [38] * 8] * 2  # the prefill's
