"""The ordinary ways of calling `generate` (and forward) on a pruned tiny LLaVA-1.5: they work or say why not."""
import math

import pytest
import torch

import visiondrop
from helpers import greedy, inputs, prompt
from visiondrop.api import policy_for
from visiondrop.engine.compat import CACHE_ARG, cache_kwargs
from visiondrop.families import info_of
from visiondrop.methods import METHODS as REGISTERED, method as registered
from visiondrop.testing.tiny import demo_image

QUESTIONS = ["What is in the image?", "Is there a red circle in the picture? Answer yes or no."]
#: every registered method that takes images at the budget the contract runs it at
METHODS = [(name, None if name == "none" else registered(name).example_budget) for name in REGISTERED
           if not registered(name).video_only]


def sample(model, batch: dict, seed: int, new_tokens: int = 6, **kwargs) -> torch.Tensor:
    torch.manual_seed(seed)
    out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=True, **kwargs)
    return out[:, batch["input_ids"].shape[1]:]


def repeated(batch: dict, n: int) -> dict:
    """Each sample n times in a row, as generate() expands the batch for num_return_sequences / num_beams."""
    return {k: v.repeat_interleave(n, dim=0) for k, v in batch.items()}


@pytest.mark.parametrize("method,budget", METHODS)
def test_sampling_several_sequences_equals_the_repeated_batch(tiny, method, budget):
    """generate() encodes the images once and repeats them per returned sequence: the engine must map each
    repeat to its image. Sampling draws one token per row from the global RNG at every step, so with the same seed
    num_return_sequences=2 must equal the batch with each prompt written out twice."""
    model, processor = tiny
    batch = inputs(processor, QUESTIONS)
    assert batch["attention_mask"].min() == 0, "prompts must differ in length to test padding"
    with visiondrop.apply(model, method, budget, **registered(method).example_options(model.config)) as handle:
        several = sample(model, batch, seed=3, num_return_sequences=2)
        counts = handle.trace.tokens_per_layer
        written_out = sample(model, repeated(batch, 2), seed=3)
        assert handle.trace.tokens_per_layer == counts
    assert several.shape[0] == 4 and torch.equal(several, written_out)
    assert not torch.equal(several[0], several[1]), "the two sequences of a prompt should differ when sampling"


@pytest.mark.parametrize("method,budget,options", [("visiondrop", 320, {}), ("visiondrop", 160, {"newlines": "keep"}),
                                                    ("visionzip", 320, {})])
def test_sampling_several_sequences_on_next_grids(tiny_next, method, budget, options):
    """LLaVA-NeXT, two grids (3 and 5 crops) in one batch: each repeat keeps its own image's reduced layout."""
    model, processor = tiny_next
    images = [demo_image(0, (672, 336)), demo_image(1, (500, 400))]
    batch = dict(processor(text=[prompt(q) for q in QUESTIONS], images=images, padding=True, return_tensors="pt"))
    with visiondrop.apply(model, method, budget, **options):
        several = sample(model, batch, seed=1, new_tokens=4, num_return_sequences=2)
        written_out = sample(model, repeated(batch, 2), seed=1, new_tokens=4)
    assert several.shape[0] == 4 and torch.equal(several, written_out)


def test_sampling_several_sequences_of_top1_equal_greedy_alone(tiny):
    """With top_k=1 sampling is greedy: both returned sequences of each prompt equal that prompt's greedy run alone."""
    model, processor = tiny
    with visiondrop.apply(model, "visiondrop", 64):
        several = sample(model, inputs(processor, QUESTIONS), seed=0, num_return_sequences=2, top_k=1)
        alone = [greedy(model, inputs(processor, [q], [demo_image(i)]), 6)[0] for i, q in enumerate(QUESTIONS)]
    assert torch.equal(several, torch.stack([alone[0], alone[0], alone[1], alone[1]]))


def test_beam_search_with_cache_equals_without(tiny):
    model, processor = tiny
    batch = inputs(processor, QUESTIONS)
    with visiondrop.apply(model, "visiondrop", 64):  # its selections do not depend on the text after the image
        cached = greedy(model, batch, num_beams=4, num_return_sequences=2)
        uncached = greedy(model, batch, num_beams=4, num_return_sequences=2, use_cache=False)
        plain = greedy(model, batch)
    assert cached.shape[0] == 4 and torch.equal(cached, uncached)
    assert not torch.equal(cached[::2], plain), "beam search should find other tokens than greedy on this model"


def test_cache_reorder_moves_the_pruned_bookkeeping(tiny):
    """Beam search reorders the cache's rows: decoding after a reorder equals decoding the reordered batch."""
    model, processor = tiny
    batch = inputs(processor, QUESTIONS)  # different lengths: the rows' masks and positions differ
    step = torch.tensor([[5], [7]])
    mask = torch.cat([batch["attention_mask"], torch.ones(2, 1, dtype=torch.long)], dim=1)
    flip = torch.tensor([1, 0])
    with visiondrop.apply(model, "visiondrop", 64), torch.no_grad():
        logits = []
        for reorder in (False, True):
            cache = getattr(model(**batch, use_cache=True), CACHE_ARG)
            if reorder:
                cache.reorder_cache(flip)
            rows = flip if reorder else torch.arange(2)
            logits.append(model(input_ids=step[rows], attention_mask=mask[rows], **cache_kwargs(cache)).logits)
    torch.testing.assert_close(logits[1], logits[0][flip], atol=1e-5, rtol=1e-5)


def test_output_attentions_and_hidden_states_are_refused(tiny):
    model, processor = tiny
    batch = inputs(processor, QUESTIONS[:1])
    with visiondrop.apply(model, "visiondrop", 64):
        with pytest.raises(ValueError, match=r"output_attentions .* not supported with visual-token pruning "
                                             r"\(visiondrop\).*handle\.trace.*remove\(\)"):
            model.generate(**batch, max_new_tokens=2, output_attentions=True, return_dict_in_generate=True)
        with pytest.raises(ValueError, match="output_hidden_states are not supported"), torch.no_grad():
            model(**batch, output_hidden_states=True)
        with torch.no_grad():  # a text-only forward is not pruned and keeps them
            text = model(**inputs(processor, QUESTIONS[:1], [None]), output_hidden_states=True)
    assert len(text.hidden_states) == 33


@pytest.mark.parametrize("method,budget", [("visiondrop", 64), ("fastv", 64)])
def test_labels_are_refused_when_the_sequence_shrinks(tiny, method, budget):
    model, processor = tiny
    batch = inputs(processor, QUESTIONS[:1])
    with visiondrop.apply(model, method, budget), torch.no_grad():
        with pytest.raises(ValueError, match=f"labels= is not supported with visual-token pruning: {method} removes "
                                             "visual tokens.*logits are shorter than the labels.*remove\\(\\)"):
            model(**batch, labels=batch["input_ids"])


def test_labels_work_with_the_unpruned_engine(tiny):
    model, processor = tiny
    batch = inputs(processor, QUESTIONS[:1])
    with torch.no_grad():
        reference = model(**batch, labels=batch["input_ids"]).loss
        with visiondrop.apply(model, "none"):
            loss = model(**batch, labels=batch["input_ids"]).loss
    torch.testing.assert_close(loss, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("budget,error,message", [
    (float("nan"), ValueError, "budget must be a finite number of visual tokens above 0, got nan"),
    (math.inf, ValueError, "finite number .* got inf"),
    (0, ValueError, "above 0, got 0"),
    (-64, ValueError, "above 0, got -64"),
    ("64", TypeError, "budget must be a number .* got str '64': pass the number 64, not a string"),
    ("lots", TypeError, "got str 'lots'$"),
    (True, TypeError, "got bool True"),
])
@pytest.mark.parametrize("method", ["visiondrop", "fastv", "sparsevlm", "random"])
def test_bad_budgets_are_refused_before_the_method(tiny, method, budget, error, message):
    model, _ = tiny
    with pytest.raises(error, match=message):
        visiondrop.apply(model, method, budget)
    assert getattr(model.model, "_visiondrop_pruner", None) is None


def test_unknown_option_names_the_valid_ones(tiny):
    model, _ = tiny
    with pytest.raises(TypeError, match=r"^method 'visiondrop' has no option 'foo'; its options \(with defaults\) "
                                        r"are: schedule=None, first_stage=None, contextual_fraction=None, "
                                        r"stages='both', newlines='drop'$"):
        visiondrop.apply(model, "visiondrop", 64, foo=1)
    info = info_of(model)  # the harness's path: policy_for with the options of its config
    with pytest.raises(TypeError, match=r"method 'fastv' has no option 'kk', 'x'; .* k=2, keep=None, "
                                        r"scoring='text'$"):
        policy_for(info, "fastv", 64, kk=3, x=1)
    with pytest.raises(TypeError, match="method 'none' has no option 'seed'; .* are: none$"):
        policy_for(info, "none", None, seed=0)
    assert policy_for(info, "random", 64, seed=1).describe()  # valid options still pass


@pytest.mark.parametrize("method", [name for name, _ in METHODS if name != "none"])  # the ones that take images
def test_ratio_is_the_budget_as_a_share_of_the_visual_tokens(tiny, method):
    model, processor = tiny
    batch = inputs(processor, QUESTIONS)
    options = registered(method).example_options(model.config)
    with visiondrop.apply(model, method, ratio=192 / 576, **options) as by_ratio:
        tokens = greedy(model, batch, 3)
        kept = by_ratio.trace.tokens_per_layer
    with visiondrop.apply(model, method, 192, **options) as by_budget:
        assert torch.equal(greedy(model, batch, 3), tokens)
        assert by_ratio.policy.describe() == by_budget.policy.describe()  # after the same forward (MustDrop's counts)
        assert by_budget.trace.tokens_per_layer == kept


def test_ratio_and_budget_together_or_above_one_are_refused(tiny):
    model, _ = tiny
    with pytest.raises(TypeError, match="budget= .* or ratio= .*not both"):
        visiondrop.apply(model, "visiondrop", 64, ratio=0.1)
    with pytest.raises(ValueError, match=r"ratio is the share .* in \(0, 1\]; got 1.5"):
        visiondrop.apply(model, "visiondrop", ratio=1.5)
    assert getattr(model.model, "_visiondrop_pruner", None) is None
