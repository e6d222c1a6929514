"""Small helpers shared by the tests."""
from __future__ import annotations

import torch

from visiondrop.testing.tiny import demo_image

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
    import visiondrop
    from visiondrop.api import Handle
    from visiondrop.engine.replay import Replay

    # a random tiny model may generate an image (or video) placeholder, which re-running the prompt without a cache
    # would read as one more visual token: keep them out of both runs
    placeholders = [getattr(model.config, f"{kind}_token_id", None) for kind in ("image", "video")]
    no_placeholder = {"suppress_tokens": [i for i in placeholders if i is not None]}
    with visiondrop.apply(model, method, budget, **options) as handle:
        cached = greedy(model, batch, new_tokens, **no_placeholder)
    with Handle(model, Replay(handle.policy, handle.trace)):
        return cached, greedy(model, batch, new_tokens, use_cache=False, **no_placeholder)


def flops_by_formula_and_counter(model, batch: dict, method: str, budget=None, **options) -> tuple[float, int]:
    """A one-image prefill's FLOPs by the analytic count (schedule, overhead, a tower that merges inside) and as
    torch's FlopCounterMode counts the real forward."""
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
    return formula.total, counter.get_total_flops()
