"""The contract every registered method keeps, on a tiny model of every registered family (LLaVA-1.5, LLaVA-NeXT
with mixed crop grids, Qwen2.5-VL and Qwen3-VL (and its MoE) with images of different sizes and M-RoPE, Qwen3-VL's
DeepStack, Video-LLaVA's images, whose budgets count against a video's 2,056 tokens, so every method meets budgets
between whole counts; counts on its nominal 8-frame video); Video-LLaVA's batches of videos keep it in
tests/test_video_llava.py. Six properties, each on every family: the full budget is the stock model, a batch equals
each sample alone, cached decoding equals replay (checked on the same batch's run), counts measured with hooks equal
`describe()`, `remove()` restores the model, an unreachable budget names the smallest reachable one.

Methods and families come from their registries, each method at the settings it declares (`Method.examples`: its
example budget with its default options, then a second budget or option set), each family with the image sizes it
declares (`Family.sample_sizes`, `nominal_size`), so a new method or family is tested here without editing this file.
The per-method files test what is the method's own. Video-only methods (`Method.video_only`) refuse these images,
clearly; their contract on videos is in tests/test_video_llava.py and tests/test_video_methods.py.
"""
import functools
import re

import pytest
import torch

import visiondrop
from helpers import IMAGE_METHODS, assert_equal_up_to_reordering, greedy, measure_counts
from visiondrop.api import Handle
from visiondrop.engine import Policy
from visiondrop.engine.replay import Replay
from visiondrop.harness.prompting import build_prompt
from visiondrop.methods import METHODS, method, policy_for
from visiondrop.families import FAMILIES, family_by_type, family_of, info_of
from visiondrop.harness.video import read_frames
from visiondrop.testing.tiny import demo_image

QUESTIONS = ["What is in the image?", "Is there a red circle in the picture? Answer yes or no.", "Colour?",
             "How many shapes are there?"]
TEXT_ONLY = 1  # a text-only sample in the middle of every batch passes untouched
MODELS = list(FAMILIES)  # every registered family (config.model_type)


def batch_images(model_type: str) -> list:
    """A batch's images: the family's sample sizes (different token counts or layouts), a text-only sample at
    TEXT_ONLY."""
    images = [demo_image(i, size) for i, size in enumerate(family_by_type(model_type).sample_sizes)]
    return images[:TEXT_ONLY] + [None] + images[TEXT_ONLY:]


BATCH_IMAGES = {model_type: batch_images(model_type) for model_type in MODELS}


def encode(model, processor, questions: list[str], images: list) -> dict:
    """A left-padded batch in the family's own prompt format (`Family.conv_template`); None: a text-only sample."""
    template = family_of(model).conv_template
    text = [build_prompt(processor, q, img is not None, template) for q, img in zip(questions, images)]
    present = [img for img in images if img is not None]
    return dict(processor(text=text, images=present or None, padding=True, return_tensors="pt"))


def tiny_model(request, family: str) -> tuple:
    model, processor = request.getfixturevalue("tiny_of")(family)
    processor.tokenizer.padding_side = "left"
    return model, processor


SAMPLES = {}  # (family, frames divisor) -> its nominal sample, encoded


def nominal_sample(request, family: str, shorter: int = 1) -> dict:
    """The family's nominal sample, asking a question, encoded once; where it is a video, `shorter` divides its
    frame count."""
    if (family, shorter) not in SAMPLES:
        SAMPLES[family, shorter] = encode_nominal(request, family, *tiny_model(request, family), shorter)
    return SAMPLES[family, shorter]


def encode_nominal(request, family: str, model, processor, shorter: int = 1) -> dict:
    """The one sample the budgets count against (ModelInfo.n_visual visual tokens, LLaVA-NeXT's newline tokens
    besides): an image of the family's nominal size, or a video of its frames (the demo video) / `shorter`."""
    size = family_by_type(family).nominal_size
    if size is not None:
        return encode(model, processor, QUESTIONS[:1], [demo_image(5, size)])
    host = family_of(model)  # a video of the family's own frame count, in its prompt
    clip = read_frames(request.getfixturevalue("demo_videos")[0], host.frames(model.config) // shorter)
    text = build_prompt(processor, QUESTIONS[0], True, host.conv_template, kind="video")
    return dict(processor(text=[text], videos=[clip], return_tensors="pt"))


NEW_TOKENS = 4


#: (method, which of its settings): every image method at each setting it declares, the second named by its values
SETTINGS = [pytest.param(name, i, id=name if i == 0 else f"{name}@{budget:g}" + "".join(f"-{k}={v}" for k, v in
                                                                                      options.items()))
            for name in IMAGE_METHODS for i, (budget, options) in enumerate(method(name).examples)]


def setting(name: str, which: int, model) -> tuple[float, dict]:
    """The method's declared setting `which` (`Method.examples`): its budget, scaled from a 576-token LLaVA-1.5 to
    this model's visual tokens, and its options with those it declares for tiny models (`Method.example_options`)."""
    budget, options = method(name).examples[which]
    return budget * info_of(model).n_visual / 576, {**method(name).example_options(model.config), **options}


def run(model, batch: dict, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens [B, T] and the logits of every step [B, T, V] (as many steps for every sample). A tiny random
    model may pick a visual placeholder token, which a run without the cache would take for an image's: never."""
    out = model.generate(**batch, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                         output_logits=True, return_dict_in_generate=True,
                         suppress_tokens=list(family_of(model).placeholder_ids(model.config)), **kwargs)
    return out.sequences[:, batch["input_ids"].shape[1]:], torch.stack(out.logits, 1)


def kept(trace, sample: int) -> list[list[int]]:
    return [k.tolist() for k in trace.kept[sample]]


STOCK = {}  # family -> (model, a left-padded batch, its first sample alone, the stock model's outputs)


@pytest.fixture(params=list(MODELS))
def family(request):
    """Two images of different sizes (on LLaVA-NeXT, different crop grids) with the stock model's greedy tokens on
    the batch and logits on the first alone, computed once per family."""
    if request.param not in STOCK:
        model, processor = tiny_model(request, request.param)
        images = [img for img in BATCH_IMAGES[request.param] if img is not None][:2]
        batch = encode(model, processor, QUESTIONS[:2], images)
        single = encode(model, processor, QUESTIONS[:1], images[:1])
        with torch.no_grad():
            stock = greedy(model, batch, NEW_TOKENS), model(**single).logits
        STOCK[request.param] = model, batch, single, stock
    return STOCK[request.param]


@pytest.mark.parametrize("name", METHODS)
def test_full_budget_is_the_stock_model(family, name):
    """Every method at a budget of all the visual tokens (or ratio 1) is the engine's unpruned policy, the one
    `none` runs, and that equals the stock model."""
    model, batch, single, (reference, reference_logits) = family
    info = info_of(model)
    originals = (batch["input_ids"] == model.config.image_token_id).sum(1).tolist()
    for given in ({"budget": None if name == "none" else info.n_visual}, {"ratio": 1.0}):
        with visiondrop.apply(model, name, **given) as handle, torch.no_grad():
            assert type(handle.policy) is Policy and handle.policy.describe() == {"method": "none"}
            if name != "none":
                continue  # the same policy as none's, which runs below: running it again would test nothing new
            assert torch.equal(greedy(model, batch, NEW_TOKENS), reference)
            assert handle.trace.tokens_per_layer == [[n] * info.n_layers for n in originals]
            torch.testing.assert_close(model(**single).logits, reference_logits, atol=1e-5, rtol=1e-5)
    if name != "none":  # above all the visual tokens too
        assert type(policy_for(info, name, info.n_visual + 24)) is Policy


@pytest.fixture(params=list(MODELS))
def host(request) -> tuple:
    """(a tiny model of each family, its processor, a batch's images)."""
    return *tiny_model(request, request.param), BATCH_IMAGES[request.param]


STOCK_TEXT_ONLY = {}  # model type -> the stock model's run of its batch's text-only sample


def refused(model, name: str, which: int, inputs: dict, modality: str = "image") -> bool:
    """Whether the family refuses the method's encoder cut on `modality` (`Family.unsupported`): then a forward
    raises NotImplementedError with the family's reason, and the model is left untouched."""
    budget, options = setting(name, which, model)
    policy = policy_for(info_of(model), name, budget, **options)
    reason = family_of(model).unsupported(policy, modality) if policy.encoder_layer is not None else None
    if reason is None:
        return False
    with visiondrop.apply(model, name, budget, **options), \
            pytest.raises(NotImplementedError, match=re.escape(reason)), torch.no_grad():
        model(**inputs)
    assert getattr(model.model, "_visiondrop_pruner", None) is None
    return True


@pytest.mark.parametrize("name, which", SETTINGS)
def test_batch_equals_each_sample_alone_and_cache_equals_replay(host, name, which):
    """Deterministic, and independent of the batch (left padding, a text-only sample, other images or crop grids);
    the batch's decode steps on the pruned cache give what re-running the prompt with the prefill's decisions gives
    (`engine.replay.Replay`; `none` makes no decisions, and its cached generation is the stock model's:
    test_full_budget_is_the_stock_model)."""
    model, processor, images = host
    questions = QUESTIONS[:len(images)]
    batch = encode(model, processor, questions, images)
    singles = [encode(model, processor, [q], [img]) for q, img in zip(questions, images)]
    assert batch["attention_mask"].min() == 0, "prompts must differ in length to test left padding"
    if refused(model, name, which, batch):
        return
    if model.config.model_type not in STOCK_TEXT_ONLY:
        STOCK_TEXT_ONLY[model.config.model_type] = run(model, singles[TEXT_ONLY])
    budget, options = setting(name, which, model)
    with visiondrop.apply(model, name, budget, **options) as handle:
        tokens, logits = run(model, batch)
        trace = handle.trace
        alone = []
        for single in singles:
            alone.append(run(model, single))
            alone_trace = handle.trace
            if single.get("pixel_values") is not None:  # the trace tells the last forward with an image
                i = len(alone) - 1
                assert kept(trace, i) == kept(alone_trace, 0), f"{name}: sample {i} keeps other tokens in the batch"
                assert trace.tokens_per_layer[i] == alone_trace.tokens_per_layer[0]
        again = run(model, singles[0])
    assert all(torch.equal(a, b) for a, b in zip(again, alone[0])), f"{name}: a second run differs"
    for i, (alone_tokens, alone_logits) in enumerate(alone):
        assert_equal_up_to_reordering(logits[i], alone_logits[0], f"{name}: sample {i} in the batch vs alone")
        assert torch.equal(tokens[i], alone_tokens[0]), f"{name}: sample {i} generates other tokens in the batch"
    assert trace.tokens_per_layer[TEXT_ONLY] == [0] * len(trace.tokens_per_layer[0])
    assert torch.equal(alone[TEXT_ONLY][0], STOCK_TEXT_ONLY[model.config.model_type][0]), \
        f"{name}: a text-only sample is not left untouched"
    if name != "none":
        with Handle(model, Replay(handle.policy, trace)):
            replayed, _ = run(model, batch, use_cache=False)
        assert torch.equal(replayed, tokens), f"{name}: decoding on the pruned cache differs from the replay"


def described_mean(described: dict, n_visual: int) -> float:
    """The mean visual tokens entering the decoder layers that a description states: the equivalent tokens, unless
    the method's own convention counts something else (SparseVLM: what the layers output) and states this apart."""
    return described.get("mean_tokens_entering_layers", described.get("equivalent_tokens", n_visual))


@pytest.fixture(params=list(MODELS))
def nominal(request) -> tuple:
    """(a tiny model of each family, a function of the setting giving its sample)."""
    return tiny_model(request, request.param)[0], functools.partial(nominal_sample, request, request.param)


@pytest.mark.parametrize("name, which", SETTINGS)
def test_counts_measured_with_hooks_match_describe(nominal, name, which):
    """The description's mean count is what enters the decoder layers, counted with forward pre-hooks; LLaVA-NeXT's
    newline tokens come on top of the patches it counts (as many as the image has, or fewer where pruned).
    The first setting runs on the nominal sample. The second, where that is a video, runs on a quarter of its
    frames: a budget is a share of each video's own tokens, so the description (of the nominal video) scales by the
    share, up to whole-count rounding (and a 32-frame OneVision tower pass per setting was the suite's largest
    cost)."""
    model, sample_of = nominal
    video = family_by_type(model.config.model_type).nominal_size is None
    shorter = 4 if which and video else 1
    sample = sample_of(shorter)
    if refused(model, name, which, sample, "video" if video else "image"):
        return
    info = info_of(model)
    n_visual = int(family_of(model).image_token_mask(model, sample["input_ids"], None).sum())
    budget, options = setting(name, which, model)
    measured, handle = measure_counts(model, sample, name, budget, **options)
    assert len(measured) == info.n_layers
    assert handle.trace.tokens_per_layer == [measured]
    described = described_mean(handle.policy.describe(), info.n_visual)
    mean = sum(measured) / len(measured)
    if shorter == 1:
        newlines = n_visual - info.n_visual  # LLaVA-NeXT's, beside the patches it counts
        assert described <= mean <= described + newlines
    else:
        share = described * n_visual / info.n_visual  # within whole-count rounding: per frame, DART's 8 pivots
        assert abs(mean - share) <= max(0.03 * share, 4), f"{name}: {mean} is not the budget's share {share}"


def state(model) -> tuple[dict, dict, set]:
    """The attributes apply() may patch: the model's, its decoder's, and which modules override their forward."""
    return (dict(model.model.__dict__), dict(model.model.language_model.__dict__),
            {name for name, module in model.named_modules() if "forward" in module.__dict__})


def same_attributes(before: dict, after: dict) -> bool:
    """The same attributes holding the same objects (or, for what the stock forward recomputes, equal tensors)."""
    return before.keys() == after.keys() and all(
        before[k] is after[k] or isinstance(before[k], torch.Tensor) and torch.equal(before[k], after[k])
        for k in before)


@pytest.mark.parametrize("name, which", SETTINGS)
def test_remove_restores_bit_identical_outputs(family, name, which):
    model, _, single, _ = family
    if refused(model, name, which, single):
        return
    with torch.no_grad():
        before = model(**single).logits
    patched = state(model)  # after the stock forward: the stock model keeps some of its inputs' (Qwen's rope_deltas)
    budget, options = setting(name, which, model)
    handle = visiondrop.apply(model, name, budget, **options)
    if name != "none":
        with torch.no_grad():
            assert not torch.equal(model(**single).logits[:, -1], before[:, -1])
    handle.remove()
    with torch.no_grad():
        assert torch.equal(model(**single).logits, before)
    restored = state(model)
    assert same_attributes(patched[0], restored[0]) and same_attributes(patched[1], restored[1]), name
    assert patched[2] == restored[2], f"{name}: forward still patched on {restored[2] - patched[2]}"
    with visiondrop.apply(model, name, budget, **options):  # can be applied again afterwards
        pass


def reaches(info, name: str, budget: float, **options) -> bool:
    try:
        return policy_for(info, name, budget, **options) is not None
    except ValueError:
        return False


#: how a refusal names the reachable budgets' lower bound
FLOOR = re.compile(r"smallest reachable budget is (\d+(?:\.\d+)?)|budgets above (\d+(?:\.\d+)?) are reachable")


@pytest.mark.parametrize("name", METHODS)
def test_unreachable_budget_names_the_smallest_reachable(family, name):
    model = family[0]
    info = info_of(model)
    smallest = method(name).smallest_budget(info)
    assert policy_for(info, name, smallest) is not None
    with pytest.raises(ValueError, match=rf"(?<![\d.]){re.escape(f'{smallest:g}')}(?![\d.])"):
        visiondrop.apply(model, name, smallest / 4)
    assert getattr(model.model, "_visiondrop_pruner", None) is None
    for _, options in method(name).examples[1:]:  # other options, other reach: the bound named is reachable with them
        options = {**method(name).example_options(model.config), **options}
        with pytest.raises(ValueError) as refusal:
            visiondrop.apply(model, name, smallest / 4, **options)
        floor = FLOOR.search(str(refusal.value))  # else a list of budgets (SparseVLM's official ones): the smallest
        assert floor or re.search(rf"(?<![\d.]){re.escape(f'{smallest:g}')}(?![\d.])", str(refusal.value))
        named = float(floor.group(1) or floor.group(2)) if floor else smallest
        assert reaches(info, name, named, **options) or reaches(info, name, named * (1 + 1e-5), **options), \
            f"{name}: {named:g} (as printed, to 6 digits) is out of reach with {options}"


@pytest.mark.parametrize("name", [name for name in METHODS if name not in IMAGE_METHODS])
def test_video_methods_refuse_images(host, name):
    model, processor, images = host
    single = encode(model, processor, QUESTIONS[:1], [img for img in images if img is not None][:1])
    with visiondrop.apply(model, name, method(name).example_budget * info_of(model).n_visual / 576), torch.no_grad():
        with pytest.raises(ValueError, match="reduces videos.*holds an image: run images with an image method"):
            model(**single)
