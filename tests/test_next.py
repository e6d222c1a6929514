"""Every method on a tiny LLaVA-NeXT, with images of different aspect ratios (different crop grids) in one batch."""
import copy

import pytest
import torch
from transformers import MistralConfig

import visiondrop
from helpers import assert_equal_up_to_reordering, cached_and_replayed, measure_counts, prompt
from visiondrop.api import Handle
from visiondrop.engine.replay import Replay
from visiondrop.methods import method as registered
from visiondrop.testing.tiny import demo_image

QUESTIONS = ["What is in the image?", "Is there a red square in the picture? Answer yes or no."]
IMAGES = [demo_image(0, (672, 336)), demo_image(1, (500, 400))]  # 3 crops (1752 tokens) and 5 crops (2438)
CROPS = [3, 5]
#: the contract (tests/test_contract.py) runs every method on NeXT grids with its defaults; these are NeXT options
LAYOUT_OPTIONS = [("visiondrop", 160, {"newlines": "keep"})]  # the other methods: the contract (tests/test_contract.py)


def batch(processor, questions=QUESTIONS, images=IMAGES):
    return dict(processor(text=[prompt(q) for q in questions], images=images, padding=True, return_tensors="pt"))


def greedy(model, inputs, **kwargs):
    return model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False, **kwargs)[:, -5:]


@pytest.mark.parametrize("method,budget,options", LAYOUT_OPTIONS)
def test_batch_of_grids_equals_each_alone_and_cache_is_consistent(tiny_next, method, budget, options):
    model, processor = tiny_next
    inputs = batch(processor)
    with visiondrop.apply(model, method, budget, **options) as handle:
        together = greedy(model, inputs)
        policy, trace = handle.policy, handle.trace
        alone = [greedy(model, batch(processor, [q], [img]))[0] for q, img in zip(QUESTIONS, IMAGES)]
    assert torch.equal(together, torch.stack(alone))
    with Handle(model, Replay(policy, trace)):
        assert torch.equal(greedy(model, inputs, use_cache=False), together)


def measured(model, processor, image, method, budget, **options):
    counts, handle = measure_counts(model, batch(processor, QUESTIONS[:1], [image]), method, budget, **options)
    assert handle.trace.tokens_per_layer == [counts]
    return counts, handle


@pytest.mark.parametrize("image,crops,n0", [(IMAGES[0], 3, 1752), (IMAGES[1], 5, 2438)])
def test_counts_follow_each_samples_own_grid(tiny_next, image, crops, n0):
    model, processor = tiny_next
    runs = lambda counts: [counts[0], counts[8], counts[16], counts[24]]  # noqa: E731
    counts, _ = measured(model, processor, image, "visiondrop", 320)  # per crop 84+12, then x 70/96, 52/96, 38/96
    assert runs(counts) == [96 * crops, 70 * crops, 52 * crops, 38 * crops]
    counts, _ = measured(model, processor, image, "visionzip", 640)  # 108+20 per crop, no decoder cut
    assert set(counts) == {128 * crops}
    counts, _ = measured(model, processor, image, "fastv", 320)  # 149 of 2880 kept after layer 2, as a fraction
    assert counts[:2] == [n0, n0] and set(counts[2:]) == {round(149 * n0 / 2880)}
    counts, handle = measured(model, processor, image, "pyramiddrop", 320)  # int(N0 * lambda^s), actual N0
    decay = handle.policy.describe()["decay"]
    assert [counts[0], counts[2], counts[8], counts[16]] == [n0] + [int(n0 * decay ** s) for s in (1, 2, 3)]


def test_encoder_cut_is_text_independent_and_reports_the_samples_own_indices(tiny_next):
    model, processor = tiny_next
    for method in ("visiondrop", "visionzip"):
        kept = []
        for question in QUESTIONS:
            with visiondrop.apply(model, method, 320) as handle, torch.no_grad():
                model(**batch(processor, [question], IMAGES[1:]))
            kept.append([k.tolist() for k in handle.trace.kept[0]])
        assert kept[0] == kept[1]
        assert all(0 <= i < 2438 for cut in kept[0] for i in cut)


def test_newlines_option_keeps_the_models_layout(tiny_next):
    model, processor = tiny_next
    image = IMAGES[1]
    dropped, _ = measured(model, processor, image, "visiondrop", 320)
    kept, handle = measured(model, processor, image, "visiondrop", 320, newlines="keep")
    assert dropped[0] == 480 and kept[0] > 480  # the image-newline tokens of the rows with kept patches
    encoder_kept = handle.trace.kept[0][0]
    assert torch.equal(encoder_kept, encoder_kept.sort().values)  # transformers' packed order
    with pytest.raises(ValueError, match="newlines must be"):
        visiondrop.apply(model, "visiondrop", 320, newlines="maybe")


@pytest.fixture(scope="module")
def tiny_next_mistral(tiny_next):
    """The tiny LLaVA-NeXT on a Mistral decoder with grouped-query attention (llava-v1.6-mistral-7b-hf's layout:
    8 KV heads for 32 query heads; here 2 for 4), random weights."""
    model, processor = tiny_next
    config = copy.deepcopy(model.config)
    text = config.text_config
    config.text_config = MistralConfig(
        vocab_size=text.vocab_size, num_hidden_layers=text.num_hidden_layers, hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size, num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_attention_heads // 2, max_position_embeddings=4096, initializer_range=0.2,
        rms_norm_eps=text.rms_norm_eps, sliding_window=None, bos_token_id=text.bos_token_id,
        eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id)
    torch.manual_seed(0)
    return type(model)(config).eval(), processor


@pytest.mark.parametrize("method", ["visiondrop", "fastv", "sparsevlm", "dart"])
def test_a_mistral_decoder_with_grouped_query_attention(tiny_next_mistral, method):
    """Methods that score with attention rows or keys repeat the KV heads as the decoder does: on a batch of two
    crop grids each sample equals itself alone, cached decoding equals replay, and `none` is the stock model."""
    model, processor = tiny_next_mistral
    inputs = batch(processor)
    singles = [batch(processor, [q], [image]) for q, image in zip(QUESTIONS, IMAGES)]
    with torch.no_grad():
        stock = model(**singles[0]).logits
    with visiondrop.apply(model, "none"), torch.no_grad():
        torch.testing.assert_close(model(**singles[0]).logits, stock, atol=1e-5, rtol=1e-5)
    budget = registered(method).example_budget * 2880 / 576  # its contract budget, on NeXT's nominal 2880
    with visiondrop.apply(model, method, budget) as handle, torch.no_grad():
        together = model(**inputs).logits[:, -1]
        trace = handle.trace
        for i, single in enumerate(singles):
            assert_equal_up_to_reordering(together[i], model(**single).logits[0, -1], f"{method}: sample {i}")
            assert trace.tokens_per_layer[i] == handle.trace.tokens_per_layer[0]
    cached, replayed = cached_and_replayed(model, inputs, method, budget, new_tokens=4)
    assert torch.equal(cached, replayed)


def test_a_count_beyond_a_wide_images_own_layout_says_what_to_do(tiny_next):
    """A 1000x100 image fills a 1x3 grid mostly with padding, which the model's layout removes (1,160 tokens for 4
    crops of 576): per-crop counts that exceed it are refused with the most a crop may keep, and that count runs."""
    model, processor = tiny_next
    inputs = batch(processor, QUESTIONS[:1], [demo_image(1, (1000, 100))])
    with visiondrop.apply(model, "visionzip", ratio=0.9), torch.no_grad(), \
            pytest.raises(ValueError, match=r"keeps 2072 visual tokens \(518 a crop x 4 crops\) of an image that the "
                                            r"model lays out in 1160 tokens.*at most 290 tokens a crop"):
        model(**inputs)
    with visiondrop.apply(model, "visionzip", 290 * 5) as handle, torch.no_grad():
        model(**inputs)
    assert handle.trace.tokens_per_layer[0] == [1160] * 32
