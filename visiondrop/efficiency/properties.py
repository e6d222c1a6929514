"""The engine's properties checked on any device and dtype, with a tolerance where the dtype needs one.

The test suite proves them bit-exact in float32 on the CPU (tests/test_contract.py, tests/test_engine.py); on a GPU in
bfloat16 batched kernels round differently from one-sample ones, so `make gpu-check` checks them here with a stated
rule (`agree`):
- logits: the largest absolute difference over the compared steps is at most `TOLERANCE` x the largest absolute
  reference logit (bf16 keeps 8 bits of mantissa, 2^-8 relative per rounding; 2^-4 leaves room for the roundings
  of 32 layers);
- greedy tokens: identical at every step, up to the first step whose reference top-1/top-2 margin is at most twice
  that tolerance: there a rounding may legitimately flip the choice, and the sequences differ from then on, so the
  comparison ends there (reported as "ends at a near tie");
- SDPA == eager: the two kernels round differently even on the stock model, so the tolerance is at least twice the
  stock model's own SDPA-vs-eager difference on the same batch (stated in the check's detail).
Exact properties stay exact: `remove()` restores bit-identical logits.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

TOLERANCE = 2 ** -4
NEW_TOKENS = 5


@dataclass
class Check:
    """One property of one (model, method): whether it held, and the numbers it was decided on."""

    model: str
    method: str
    prop: str
    ok: bool
    detail: str
    max_diff: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def no_placeholders(model: nn.Module) -> dict[str, list[int]]:
    """`generate` keywords that keep a random model from generating an image (or video) placeholder, which a
    re-run of the prompt would read as one more visual token."""
    ids = [getattr(model.config, f"{kind}_token_id", None) for kind in ("image", "video")]
    return {"suppress_tokens": [i for i in ids if i is not None]}


def greedy(model: nn.Module, inputs: dict, new_tokens: int = NEW_TOKENS, **kwargs: Any) -> tuple[Tensor, Tensor]:
    """Greedy tokens [B, T] and the logits of every step [B, T, V] (float32), exactly `new_tokens` steps."""
    gen = model.generation_config
    out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         output_logits=True, return_dict_in_generate=True,
                         pad_token_id=gen.pad_token_id if gen.pad_token_id is not None else gen.eos_token_id,
                         **no_placeholders(model), **kwargs)
    return out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(out.logits, 1).float()


def cached_and_replayed(model: nn.Module, inputs: dict, method: str, budget: float | None = None,
                        new_tokens: int = 6, **options: Any) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Greedy (tokens, logits) with the KV cache, and without it while replaying the cached run's prefill
    decisions (`engine.replay.Replay`)."""
    from ..api import Handle, apply
    from ..engine.replay import Replay

    with apply(model, method, budget, **options) as handle:
        cached = greedy(model, inputs, new_tokens)
    with Handle(model, Replay(handle.policy, handle.trace)):
        return cached, greedy(model, inputs, new_tokens, use_cache=False)


def agree(reference: tuple[Tensor, Tensor], other: tuple[Tensor, Tensor], tolerance: float = TOLERANCE,
          ) -> tuple[bool, str, float]:
    """Whether `other` (tokens [T], logits [T, V]) agrees with `reference` by the module's rule; (ok, what was
    decided, the largest logit difference over the compared steps)."""
    (ref_tokens, ref_logits), (tokens, logits) = reference, other
    bound = tolerance * ref_logits.abs().max().item()
    steps = ref_tokens.shape[0]
    for step in range(steps):
        if ref_tokens[step] != tokens[step]:
            top = ref_logits[step].topk(2).values
            margin = (top[0] - top[1]).item()
            diff = (ref_logits[:step + 1] - logits[:step + 1]).abs().max().item()
            near_tie = margin <= 2 * bound
            return (near_tie and diff <= bound, f"tokens differ at step {step}: reference margin {margin:.3g} "
                    f"{'<=' if near_tie else '>'} 2 x tolerance {bound:.3g}" + (", ends at a near tie" if near_tie
                                                                                  else ""), diff)
    diff = (ref_logits - logits).abs().max().item()
    ok = diff <= bound
    return ok, f"{steps} tokens equal; logits within {diff:.3g} {'<=' if ok else '>'} tolerance {bound:.3g}", diff


def left_padded(model: nn.Module, prompts: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """One batch of one-sample prompts of different lengths (`Family.example_inputs`, same image size), left-padded
    as a processor pads them: ids with the pad id, every other per-token input (the attention mask, token types)
    with 0; the other inputs (pixels, grids) concatenated."""
    pad = model.config.text_config.pad_token_id
    length = max(p["input_ids"].shape[1] for p in prompts)
    batch = {}
    for key, value in prompts[0].items():
        if value.dim() == 2 and value.shape == prompts[0]["input_ids"].shape:  # [1, L]: one entry per token
            fill = (pad or 0) if key == "input_ids" else 0
            batch[key] = torch.cat([torch.nn.functional.pad(p[key], (length - p[key].shape[1], 0), value=fill)
                                    for p in prompts])
        else:
            batch[key] = torch.cat([p[key] for p in prompts])
    return batch


def check_model(model: nn.Module, name: str, prompts: Sequence[dict[str, Tensor]], methods: Sequence[str],
                budget_of: Callable[[str], float], options_of: Callable[[str], dict[str, Any]] = lambda _: {},
                tolerance: float = TOLERANCE, deadline: float | None = None) -> list[Check]:
    """The five properties of `model` (called `name`) for each of `methods` at `budget_of(method)` with
    `options_of(method)`, on a left-padded batch of `prompts` (one-sample inputs of different lengths) and each
    prompt alone. Past `deadline` (`time.monotonic()`) no further method is started: its checks are missing."""
    from ..api import apply

    batch = left_padded(model, prompts)
    checks: list[Check] = []

    def record(method: str, prop: str, reference, other, tolerance: float = tolerance, note: str = "") -> None:
        ok, detail, diff = True, [note] if note else [], 0.0
        for i in range(reference[0].shape[0]):
            good, said, d = agree((reference[0][i], reference[1][i]), (other[0][i], other[1][i]), tolerance)
            ok, diff = ok and good, max(diff, d)
            detail.append(f"sample {i}: {said}")
        checks.append(Check(name, method, prop, ok, "; ".join(detail), diff))

    attention = model.config._attn_implementation
    with torch.inference_mode():
        stock = greedy(model, batch)
        stock_logits = model(**batch).logits
        model.set_attn_implementation("eager")
        try:
            stock_eager = greedy(model, batch)
        finally:
            model.set_attn_implementation(attention)
    # the kernels' own difference on the stock model bounds what the engine may add under either kernel
    kernels = max(agree((stock[0][i], stock[1][i]), (stock_eager[0][i], stock_eager[1][i]), tolerance)[2]
                  for i in range(stock[0].shape[0]))
    kernel_tolerance = max(tolerance, 2 * kernels / stock[1].abs().max().item())
    kernel_note = (f"tolerance {kernel_tolerance:.3g} x the largest logit: twice the stock model's own {attention} vs "
                   f"eager difference ({kernels:.3g})" if kernel_tolerance > tolerance else "")
    for method in methods:
        if deadline is not None and time.monotonic() > deadline:
            break
        budget = None if method == "none" else budget_of(method)
        options = options_of(method)
        with apply(model, method, budget, **options), torch.inference_mode():
            batched = greedy(model, batch)
            alone = [greedy(model, p) for p in prompts]
        if method == "none":
            record(method, "none == stock model", stock, batched)
        record(method, "batch == alone", tuple(torch.cat([a[k] for a in alone]) for k in (0, 1)), batched)
        with torch.inference_mode():
            cached, replayed = cached_and_replayed(model, batch, method, budget, NEW_TOKENS, **options)
        record(method, "cache == replay", cached, replayed)
        model.set_attn_implementation("eager")
        try:
            with apply(model, method, budget, **options), torch.inference_mode():
                eager = greedy(model, batch)
        finally:
            model.set_attn_implementation(attention)
        record(method, f"{attention} == eager", batched, eager, kernel_tolerance, kernel_note)
        with torch.inference_mode():  # every `apply` of this method has been removed
            after = model(**batch).logits
        same = torch.equal(after, stock_logits)
        checks.append(Check(name, method, "remove() restores", same,
                            "bit-identical logits" if same else "logits differ after remove()",
                            (after.float() - stock_logits.float()).abs().max().item()))
    return checks
