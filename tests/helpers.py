"""Small helpers shared by the tests."""
from __future__ import annotations

import torch

from visiondrop.methods import METHODS, method
from visiondrop.testing.tiny import demo_image

#: the registered methods that take images (video-only ones refuse them: tests/test_contract.py)
IMAGE_METHODS = [name for name in METHODS if not method(name).video_only]
#: the image methods whose budget is a count, so that a ratio keeps that share of every image
SHARE_METHODS = [name for name in IMAGE_METHODS if name != "none" and not method(name).counts_follow_content]

#: How far float32 reordering moves one computation done two ways (SDPA or eager attention, in a batch or alone, with
#: or without a cache, AVX-512, AVX2 or scalar kernels): the rounding of every sum enters each layer at the last bit
#: of its values and the depth amplifies it, so the bound is a count of float32 ulps of the outputs' scale (their
#: largest magnitude). Measured on the tiny models across those kernels: up to about 300 ulps; the bound leaves 7x.
REORDERING_ULPS = 2**11

SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the human's questions.")


def prompt(question: str, image: bool = True) -> str:
    return f"{SYSTEM} USER: {'<image>' + chr(10) if image else ''}{question} ASSISTANT:"


def inputs(processor, questions: list[str], images: list | None = None) -> dict:
    """Left-padded batch; images default to one demo image per question."""
    images = [demo_image(i) for i in range(len(questions))] if images is None else images
    text = [prompt(q, image=img is not None) for q, img in zip(questions, images)]
    present = [img for img in images if img is not None]
    return dict(processor(text=text, images=present or None, padding=True, return_tensors="pt"))


def assert_equal_up_to_reordering(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """`actual` and `expected` are one float32 computation done two ways (see REORDERING_ULPS): they differ by no more
    than float32 reordering can produce at `expected`'s scale. Tokens and kept sets are compared exactly apart."""
    scale = expected.abs().max().item()
    tolerance = REORDERING_ULPS * torch.finfo(torch.float32).eps * scale
    torch.testing.assert_close(actual, expected, atol=tolerance, rtol=0,
                               msg=lambda m: f"{what}: more than float32 reordering at scale {scale:.3g}: {m}")


def greedy(model, batch: dict, new_tokens: int = 8, **kwargs) -> torch.Tensor:
    out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, **kwargs)
    return out[:, batch["input_ids"].shape[1]:]


def greedy_with_logits(model, batch: dict, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens [B, T] and the logits of every step [B, T, V] (as many steps for every sample)."""
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, batch["input_ids"].shape[1]:], torch.stack(out.logits, 1)


class LayerCounter:
    """Counts the tokens entering each decoder layer with forward pre-hooks, independently of the trace."""

    def __init__(self, model):
        self.lengths: list[int] = []
        self._hooks = [layer.register_forward_pre_hook(self._record)
                       for layer in model.model.language_model.layers]

    def _record(self, module, args):
        self.lengths.append(args[0].shape[1])

    def close(self) -> None:
        for h in self._hooks:
            h.remove()


class KeyCounter:
    """The keys each decoder layer's attention may see from the last query row, at every decode step (q = 1), read
    from the attention mask the layer receives: [step][row][layer]."""

    def __init__(self, model):
        self.steps: list[list[list[int]]] = []
        layers = model.model.language_model.layers
        self._hooks = [layer.self_attn.register_forward_pre_hook(self._record, with_kwargs=True) for layer in layers]
        self._first = layers[0].self_attn

    def _record(self, module, args, kwargs):
        hidden, mask = kwargs.get("hidden_states", args[0] if args else None), kwargs["attention_mask"]
        if hidden.shape[1] != 1:
            return
        if module is self._first:
            self.steps.append([[] for _ in range(hidden.shape[0])])
        if mask is None:  # SDPA's causal fast path: every cached key and the new one
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            counts = [cache.get_seq_length(module.layer_idx) + 1] * hidden.shape[0]
        else:
            counts = (mask[:, 0, -1] if mask.dtype == torch.bool else mask[:, 0, -1] == 0).sum(-1).tolist()
        for row, count in zip(self.steps[-1], counts):
            row.append(count)

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()


#: two questions about one image that lead text-guided methods to other tokens
TWO_QUESTIONS = ["What is in the image?", "How many red shapes are on the left side of the picture?"]


def kept_per_question(model, processor, method: str, budget=None, questions: list[str] = TWO_QUESTIONS,
                      **options) -> list[list[list[int]]]:
    """Per question, the original visual tokens each cut keeps of one image (`demo_image(5)`) asked it alone."""
    import visiondrop

    kept = []
    with visiondrop.apply(model, method, budget, **options) as handle, torch.no_grad():
        for question in questions:
            model(**inputs(processor, [question], [demo_image(5)]))
            kept.append([k.tolist() for k in handle.trace.kept[0]])
    return kept


def measure_counts(model, batch: dict, method: str, budget=None, **options):
    """Visual tokens entering each decoder layer of a one-sample batch, counted with pre-hooks (not the trace)."""
    import visiondrop

    from visiondrop.families import family_of

    n_text = int((~family_of(model).image_token_mask(model, batch["input_ids"], None)).sum())
    counter = LayerCounter(model)
    try:
        with visiondrop.apply(model, method, budget, **options) as handle, torch.no_grad():
            model(**batch)
    finally:
        counter.close()
    return [n - n_text for n in counter.lengths], handle


def cached_and_replayed(model, batch: dict, method: str, budget=None, new_tokens: int = 6, **options):
    """Greedy tokens with the KV cache, and without it while replaying the cached run's prefill decisions."""
    from visiondrop.efficiency.properties import cached_and_replayed as run_both

    (cached, _), (replayed, _) = run_both(model, batch, method, budget, new_tokens, **options)
    return cached, replayed


def videos_batch_equals_alone(model, name: str, run, batch: dict, singles: list[dict], new_tokens: int | None = None,
                              atol: float = 1e-8, during_alone=None, **given):
    """Method `name` applied with `given` (a budget, `ratio=` or options; its example options added): the batch of
    videos equals each video alone (`singles`, run through `run(model, inputs) -> (tokens, logits)`) in kept tokens,
    counts per layer, logits and greedy tokens; the visual tokens entering the decoder layers of each alone prefill,
    counted with forward pre-hooks, are the trace's; with `new_tokens`, cached decoding of the batch equals re-running
    the prompt with the prefill's decisions (`Replay`). `during_alone(single, handle)`: a context manager around each
    alone run, for a test's own checks. Returns the handle (removed) and the batch's trace."""
    from contextlib import nullcontext

    import visiondrop
    from visiondrop.api import Handle
    from visiondrop.engine.replay import Replay
    from visiondrop.families import family_of
    from visiondrop.methods import method

    n_layers = len(model.model.language_model.layers)
    with visiondrop.apply(model, name, **{**method(name).example_options(model.config), **given}) as handle:
        tokens, logits = run(model, batch)
        trace = handle.trace
        for i, single in enumerate(singles):
            counter = LayerCounter(model)
            try:
                with during_alone(single, handle) if during_alone else nullcontext():
                    alone_tokens, alone_logits = run(model, single)
            finally:
                counter.close()
            assert [k.tolist() for k in trace.kept[i]] == [k.tolist() for k in handle.trace.kept[0]]
            assert trace.tokens_per_layer[i] == handle.trace.tokens_per_layer[0]
            torch.testing.assert_close(logits[i], alone_logits[0], atol=atol, rtol=atol,
                                       msg=lambda m: f"{name}: video {i} in the batch vs alone: {m}")
            assert torch.equal(tokens[i], alone_tokens[0]), f"{name}: video {i} generates other tokens in a batch"
            n_text = int((~family_of(model).image_token_mask(model, single["input_ids"], None)).sum())
            assert [n - n_text for n in counter.lengths[:n_layers]] == trace.tokens_per_layer[i]  # prefill
    if new_tokens is not None and name != "none":  # none makes no decisions: its cached decoding is the stock model's
        with Handle(model, Replay(handle.policy, trace)):
            assert torch.equal(greedy(model, batch, new_tokens, use_cache=False), tokens), f"{name}: cached vs replayed"
    return handle, trace


def none_is_the_stock_model(model, run, inputs: dict, tokens_per_layer: list[list[int]]) -> None:
    """`none` applied: `run(model, inputs) -> (tokens, logits)` gives the stock model's tokens, and its logits within
    1e-9; the trace's visual tokens entering each decoder layer, per sample, are `tokens_per_layer`."""
    import visiondrop

    reference, reference_logits = run(model, inputs)
    with visiondrop.apply(model, "none") as handle:
        tokens, logits = run(model, inputs)
    assert torch.equal(tokens, reference)
    torch.testing.assert_close(logits, reference_logits, atol=1e-9, rtol=1e-9)
    assert handle.trace.tokens_per_layer == tokens_per_layer


def stock_and_pruned_means(model, video: dict, ratio: float) -> dict[str, float]:
    """On one `video`: `none` gives the stock model's last logits (asserted); returns the mean visual tokens per
    decoder layer that VisionDrop, FastV, VisionZip and random keep at `ratio` (each test knows its tolerance)."""
    import visiondrop

    with torch.no_grad():
        reference = model(**video).logits[:, -1]
    with visiondrop.apply(model, "none"), torch.no_grad():
        assert torch.equal(model(**video).logits[:, -1], reference)
    means = {}
    for name in ("visiondrop", "fastv", "visionzip", "random"):
        with visiondrop.apply(model, name, ratio=ratio) as handle, torch.no_grad():
            model(**video)
        means[name] = handle.trace.mean_tokens[0]
    return means


def beams_equal_alone(model, batch: dict, singles: list[dict], new_tokens: int) -> None:
    """Beam search (2 beams) on `batch` gives each sample's tokens alone (`singles`), under the applied method."""
    with torch.no_grad():
        beams = model.generate(**batch, max_new_tokens=new_tokens, num_beams=2, do_sample=False)
        for i, single in enumerate(singles):
            alone = model.generate(**single, max_new_tokens=new_tokens, num_beams=2, do_sample=False)
            assert torch.equal(beams[i, -new_tokens:], alone[0, -new_tokens:])


def flops_and_counter(model, batch: dict, method: str, budget=None, **options):
    """A one-image prefill's FLOPs by the analytic count (schedule, overhead, a tower that merges inside), as its
    parts (`Flops`), and torch's FlopCounterMode after counting the real forward (its total and per-module counts)."""
    from visiondrop.efficiency.flops import (flop_counter, measure_schedule, overhead_flops, prefill_flops,
                                             tower_flops)
    from visiondrop.families import flops_dims

    with flop_counter() as counter:
        sched = measure_schedule(model, batch, method, budget, **options)
    dims = flops_dims(model.config)
    text = batch["input_ids"].shape[1] - dims.n_visual
    overhead = overhead_flops(dims, method, sched.cuts, text, **options)
    formula = prefill_flops(dims, sched.tokens_per_layer, text, projected_tokens=sched.projected, overhead=overhead,
                            tower_tokens=tower_flops(dims, method, sched.cuts, **options))
    return formula, counter


def flops_by_formula_and_counter(model, batch: dict, method: str, budget=None, **options) -> tuple[float, int]:
    """A one-image prefill's FLOPs by the analytic count and as torch's FlopCounterMode counts the real forward."""
    formula, counter = flops_and_counter(model, batch, method, budget, **options)
    return formula.total, counter.get_total_flops()
