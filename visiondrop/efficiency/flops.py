"""Prefill FLOPs of a LLaVA model under a visual-token reduction method, in the VisionDrop paper's convention.

    python -m visiondrop.efficiency.flops --model llava-1.5-7b --method visiondrop --budget 64    # last line: total 2.09 TFLOPs
    method_flops("llava-1.5-7b", "visiondrop", 64).total                                 # 2.09e12

Convention (shared/reference/methods.md section 7): FLOPs = 2 x multiply-accumulates of every matrix product of
ONE prefill forward, i.e. what `torch.utils.flop_counter.FlopCounterMode` reports for `model(**inputs)`
(see `flop_counter`; tests/test_flops.py checks the formula against it on a real forward, full and pruned):
- vision: the patch-embedding convolution and ALL tower layers (q, k, v, o, fc1, fc2, and the attention
  matmuls over the full T x T square) on the 577 tokens of every crop; LLaVA reads the penultimate layer, but the
  HF and the official code both run the whole tower;
- projector: its two linears on the tokens actually projected: all visual tokens, or only the kept and merged
  ones for an encoder-side method (VisionDrop, VisionZip reduce before the projector);
- decoder: per layer, on the N = n_l + text + extra tokens it processes: q, k, v, o, gate, up, down, and the
  attention matmuls Q K^T and A V, 2 N^2 d MACs over the FULL N x N square (no causal halving: torch's counter
  counts the SDPA kernels that way, and so must the paper, since halving it misses 9.06 T);
- LM head on every prefill position of the last layer (a plain forward computes all logits);
- overhead: the method's own scoring and merging, as this harness's engine computes them (`overhead_flops`).
Norms, activations, softmax, RoPE and embedding lookups are not matrix products and are not counted.

Qwen2.5-VL (preset qwen2.5-vl-7b, on its nominal 672x672 image: 2304 patches, 576 visual tokens): the patch
embedding is a 2-frame 3-D convolution (6 x 14 x 14 inputs per patch); each of the 32 tower layers projects q, k, v,
o and runs a gated MLP (3 matrices) on every patch; the attention matmuls cover windows of 8 x 8 patches (112
pixels) in 28 layers, 2 t w d MACs for windows of w patches, and all t x t patch pairs in the 4 full-attention
layers (7, 15, 23, 31); the merger (the projector) runs 5120 -> 5120 -> 3584 on each 2x2 group that enters the
decoder. Its encoder cut (VisionZip, VisionDrop) scores with the attention each patch receives at the last
full-attention layer: q, k, v of every patch and all patch-pair logits. Its decoder has grouped-query attention
(4 key-value heads of 28).

Qwen3-VL (checkpoints qwen3-vl-8b, qwen3-vl-30b-a3b, on the nominal 768x768 image: 2304 patches of 16, 576 visual
tokens): the 27 tower layers attend to all patches and run a two-matrix GELU MLP; the projector part counts the
merger and the three DeepStack mergers (each 4608 -> 4608 -> d on every projected 2x2 group: 4x the merger alone);
DeepStack's additions to the visual hidden states after decoder layers 0-2 are elementwise (3 x n x d additions,
no matrix product) and not counted; an encoder cut that merges combines the tokens' DeepStack vectors by the
merge's weights (one [merged, tokens] x [tokens, 3 x 4608] product, in the overhead). The decoder's per-head q/k
norms are not products either. The MoE (30B-A3B) counts the active parameters of a token: its 8 routed experts of
128 (3 matrices of 2048 x 768 each, `intermediate` 8 x 768) and the router (2048 x 128 logits); the other 120
experts do no work for it (transformers runs each expert on its routed tokens only).

Assumptions written down:
- "text tokens" are all non-visual prompt tokens (system prompt, question, template); the paper's numbers need
  63 for LLaVA-1.5-7B (9.06 T full, 2.11 T VisionDrop-64). Pass the measured length for a real run.
- Presets hold the dimensions of llava-hf/llava-1.5-7b-hf and llava-v1.6-vicuna-7b-hf (vocab 32064, +0.2% on the
  head versus Vicuna's 32000). llava-next-7b is counted nominally: 5 crops (base + 2x2 grid) of 577 tokens,
  2880 visual tokens, and 49 `extra_tokens` no method prunes: the paper's 46.25 T full and 7.70 T VisionDrop-320
  both need 2992 = 2880 + 112 prefill tokens, i.e. 49 tokens beyond the 63 text (plausibly the 48 image-newline
  tokens of a square 2x2 grid, plus one; methods.md 7 and open question 6).
- Per-layer visual counts are MEASURED: the method runs on a tiny random LLaVA-1.5 proxy with the same depths and
  576 visual tokens (`visiondrop.testing.tiny`, width 32) and its trace is read. All methods' schedules are fixed by the
  budget, so the proxy's weights do not change them. LLaVA-NeXT: VisionDrop's counts are analytic, at the
  nominal 2880 (methods.md 1(f): per-crop encoder cut of the budget/5 schedule, then decoder segments
  n0 x (1, 35/48, 26/48, 19/48)), the comparison the paper's 7.70 T asks for; the other methods are measured on
  a tiny LLaVA-NeXT proxy with a square 672-pixel image (5 crops: 2880 patches plus 48 image-newline tokens).
  Decoder-side methods see (and prune) the newline tokens, so those count as visual tokens there and leave the
  preset's 49 extra tokens as 1; encoder-side methods drop them (official layout) and keep the 49, except where
  they keep the model's own layout (VisPruner): the newline tokens they keep count as visual, the rest as extra.
- Overhead counted (the harness's computation, not the official codes'): an encoder cut recomputes, per crop, the
  CLS query and all keys of its vision layer and the CLS logits; a decoder cut on N tokens projects the keys of all
  N tokens, the queries of the scoring rows and their logits against all keys, where the rows (each method's
  `methods.Overhead`) are the n visual tokens (VisionDrop), the last prompt token (FastV, PyramidDrop; all N for
  FastV scoring="all_queries"), the text tokens (SparseVLM raters, plus its rater choice, visual rows x text: upper
  bounds) or none (random); DART projects the keys of all N tokens for their norms and compares each pivot with
  the n visual tokens (pivots x n x d); contextual merging (VisionDrop, VisionZip) costs one similarity on
  head-averaged keys and one member sum per (member, merged token) pair; a method's own selection products
  (`Overhead.selection`: DivPrune's cosine similarities of all pairs of the n projected tokens, n^2 x d; VisPruner's
  even/odd similarity products of every diverse round, on the vision features, where its exact default reads the CLS
  row from the eager tower instead of recomputing it) are added; SparseVLM's recycling clusters with elementwise
  distances (no matrix product, about cand^2 x d = 0.1 GFLOPs, not counted). The official VisionDrop code projects
  q, k and v of every token at each cut where the engine projects k of every token and q of the visual rows:
  counting the official way would add 0.020 T at budget 64 (2.11 T instead of 2.09 T).
- decode step (`decode_step_flops`, `method_decode_flops`; the CLI prints it apart from the prefill total): the first
  decode step after the prefill, one new token: each layer's projections and MLP on it; Q K^T and A V over the keys
  it attends to: the visual tokens the layer cached (after a pruned cache, `Policy.pruned_cache_layers`: PruneVid's,
  those it kept) or, under a decode-time KV selection (`Policy.decode_layers`: DyCoke's), those the step chose
  (measured on the proxy's first decode step), as the official codes count after gathering them (the engine masks
  the others, and its kernels still run over them), plus the prompt's other tokens and the new one; the LM head on it; and where the selection scores with one layer's
  attention row (DyCoke), that row's query projection and logits.
"""
from __future__ import annotations

import argparse
import functools
from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from ..api import apply
from ..core import Cut, Dims, Shape, TokenCounts, TokenIds
from ..families import checkpoint_config, checkpoints, family_by_type, flops_dims
from ..methods import METHODS, method as registered
from .properties import greedy

TEXT_TOKENS = 63  # the paper's text length (methods.md 7)


def checkpoint_dims(model: str) -> Dims:
    """The FLOPs dimensions of a registered checkpoint (`families.checkpoints()`), read from its config (LLaVA-NeXT's
    with the paper's 49 extra tokens; Qwen2.5-VL-7B on its nominal 672x672 image: 48x48 patches, 576 visual tokens)."""
    return replace(flops_dims(checkpoint_config(model)), extra_tokens=checkpoints()[model].extra_tokens)


@dataclass(frozen=True)
class Breakdown:
    """Prefill FLOPs by component."""

    vision: float
    projector: float
    decoder: float
    lm_head: float
    overhead: float

    @property
    def total(self) -> float:
        return self.vision + self.projector + self.decoder + self.lm_head + self.overhead

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "total": self.total}

    def table(self) -> str:
        names = {"vision": "vision encoder", "projector": "projector", "decoder": "decoder layers",
                 "lm_head": "LM head", "overhead": "method overhead"}
        rows = [f"{names[k]:<16} {v / 1e12:>9.4f}" for k, v in asdict(self).items()]
        return "\n".join([f"{'component':<16} {'TFLOPs':>9}", *rows])


def _decoder_layer_macs(dims: Dims, n: int, keys: int | None = None) -> int:
    """n tokens through a decoder layer attending to `keys` keys each (default: the n themselves)."""
    q_dim, kv_dim = dims.n_heads * dims.head_dim, dims.n_kv_heads * dims.head_dim
    linears = (2 * dims.hidden * q_dim + 2 * dims.hidden * kv_dim + 3 * dims.hidden * dims.intermediate
               + dims.hidden * dims.router)
    return n * linears + 2 * n * (n if keys is None else keys) * q_dim  # Q K^T and A V over the full square


def prefill_flops(dims: Dims, tokens_per_layer: Sequence[int], text_tokens: int, n_crops: int | None = None,
                  projected_tokens: int | None = None, overhead: float = 0.0,
                  tower_tokens: Sequence[int] | None = None) -> Breakdown:
    """FLOPs of one prefill: `tokens_per_layer` visual tokens entering each decoder layer, `text_tokens` others.

    n_crops: vision-tower passes (default: the model's nominal crops); projected_tokens: tokens through the
    projector (default: all visual tokens); overhead: the method's own FLOPs (`overhead_flops`); tower_tokens:
    tokens entering each vision-tower layer of a crop, then leaving the last, where a method merges inside the tower
    between each layer's attention and its MLP (`tower_flops`; default: all of them everywhere).
    """
    if len(tokens_per_layer) != dims.n_layers:
        raise ValueError(f"need one visual-token count per decoder layer ({dims.n_layers}), "
                         f"got {len(tokens_per_layer)}")
    crops = dims.crops if n_crops is None else n_crops
    per_crop = dims.projected_per_crop or dims.visual_per_crop
    projected = per_crop * crops if projected_tokens is None else projected_tokens
    other = text_tokens + dims.extra_tokens
    t, dv = dims.vision_tokens, dims.vision_hidden
    patch_embed = (t - dims.vision_cls) * dims.patch_channels * dims.patch_size ** 2 * dv
    # q, k, v and output projections on what enters a layer, its MLP on what leaves its merge
    dense = lambda n, out: 4 * n * dv * dv + dims.vision_mlp * out * dv * dims.vision_intermediate  # noqa: E731
    windowed, full = dims.vision_windowed_layers, dims.vision_layers - dims.vision_windowed_layers
    if tower_tokens is None:
        layers = dims.vision_layers * dense(t, t) + full * 2 * t * t * dv + windowed * 2 * t * dims.vision_window * dv
    else:  # a tower without windows (CLIP) whose tokens shrink layer by layer: Q K^T and A V over each layer's own
        layers = sum(dense(n, out) + 2 * n * n * dv for n, out in zip(tower_tokens, tower_tokens[1:]))
    mid = dims.projector_mid or dims.hidden
    return Breakdown(
        vision=2.0 * crops * (patch_embed + layers),
        projector=2.0 * projected * (dims.projector_in * mid + mid * dims.hidden) * (1 + dims.side_projectors),
        decoder=2.0 * sum(_decoder_layer_macs(dims, n + other) for n in tokens_per_layer),
        lm_head=2.0 * (tokens_per_layer[-1] + other) * dims.hidden * dims.vocab,
        overhead=float(overhead),
    )


def decode_step_flops(dims: Dims, sched: TokenCounts, text_tokens: int) -> Breakdown:
    """FLOPs of the first decode step after the prefill (one new token, `decode_step` in the module docstring)."""
    other = text_tokens + dims.extra_tokens + 1  # the prompt's other tokens and the new one
    keys = sched.decode_keys or sched.tokens_per_layer
    overhead = 0
    if sched.decode_scoring is not None:  # the engine's attention row: the query's projection, its logits
        q_dim = dims.n_heads * dims.head_dim
        overhead = dims.hidden * q_dim + (sched.tokens_per_layer[sched.decode_scoring] + other) * q_dim
    return Breakdown(vision=0.0, projector=0.0, decoder=2.0 * sum(_decoder_layer_macs(dims, 1, n + other) for n in keys),
                     lm_head=2.0 * dims.hidden * dims.vocab, overhead=2.0 * overhead)


def overhead_flops(dims: Dims, method: str, cuts: Sequence[Cut], text_tokens: int, **options: Any) -> float:
    """FLOPs of the matrix products of a method's own scoring and merging at its `cuts`, as the engine computes
    them (module docstring), by the method's recipe for these options (`methods.Overhead`)."""
    recipe = registered(method).overhead(**options)
    q_dim, kv_dim, d = dims.n_heads * dims.head_dim, dims.n_kv_heads * dims.head_dim, dims.hidden
    macs = 0
    if recipe.rater_choice and cuts:  # visual rows against the text (all of it: an upper bound)
        macs += cuts[0].before * text_tokens * d
    for cut in cuts:
        if cut.layer is None:  # the importance row, then a merge on head-averaged keys
            dv, patches = dims.vision_hidden, dims.vision_tokens
            if dims.vision_cls:  # keys of all tokens, CLS query and logits
                macs += dv * dv * cut.before + ((dv * dv + cut.before * dv) if not recipe.eager_encoder else 0)
            else:  # the attention each patch receives: q, k (and v, where fused) of every patch, all logits
                macs += dims.vision_row_projections * patches * dv * dv + patches * patches * dv
            # Qwen2.5-VL: 4 patches per token; LLaVA-OneVision's videos: projected, pooled tokens
            metric, width = dv // dims.vision_heads, dims.hidden if dims.encoder_projected else dims.projector_in
        else:
            n = cut.before + text_tokens + dims.extra_tokens
            if recipe.tower_rows and cut is cuts[0]:  # every crop's attention received, all of its tokens' rows
                dv, crops = dims.vision_hidden, max(1, cut.before // dims.visual_per_crop)
                macs += crops * (dims.vision_row_projections * dims.vision_tokens * dv * dv
                                 + dims.vision_tokens * dims.vision_tokens * dv)
            if recipe.tower_head and cut is cuts[0] and family_by_type(dims.model_type).tower_head is not None:
                dv, t, crops = dims.vision_hidden, dims.vision_tokens, max(1, cut.before // dims.visual_per_crop)
                macs += crops * (2 * t * dv * dv + 2 * t * dv + 2 * dv * dv + 2 * dv * dims.vision_intermediate)
            if recipe.rows is not None:
                queries = {"visual": cut.before, "text": 1, "question": text_tokens, "all_queries": n}[recipe.rows]
                macs += queries * d * q_dim + n * d * kv_dim + queries * n * q_dim
            elif recipe.key_norms:
                macs += n * d * kv_dim
            macs += recipe.pivots * cut.before * d  # cosine of each pivot against every visual token
            macs += recipe.frame_pairs * cut.before * dims.visual_per_crop * d  # each token against its frame's
            metric, width = dims.head_dim, d
        if recipe.merges:
            macs += cut.members * cut.merged * (metric + width)  # similarity to each anchor, sum into it
            if cut.layer is None:  # side features (DeepStack) merged by the weights, a [merged, before] product
                macs += cut.merged * cut.before * dims.side_projectors * width
        if recipe.selection is not None:
            macs += recipe.selection(cut, width)
        if recipe.projected is not None and cut.layer is None:
            mid = dims.projector_mid or d
            dropped = cut.before - int(dims.vision_cls) - cut.kept
            macs += dropped * (dims.projector_in * mid + mid * d) + recipe.projected(cut, d)
        if recipe.tower is not None and cut.layer is None:
            macs += recipe.tower(dims, cut)[1]
    return 2.0 * macs


def tower_flops(dims: Dims, method: str, cuts: Sequence[Cut], **options: Any) -> Sequence[int] | None:
    """Tokens entering each vision-tower layer of a crop and leaving the last, for `prefill_flops`, where `method`
    merges inside the tower (its recipe's `tower`); None otherwise."""
    recipe = registered(method).overhead(**options)
    encoder = [c for c in cuts if c.layer is None]
    return recipe.tower(dims, encoder[0])[0] if recipe.tower is not None and encoder else None


def flop_counter(**kwargs: Any) -> FlopCounterMode:
    """torch's FlopCounterMode, also counting the CPU SDPA kernel (it counts 0 there otherwise) as it counts the
    GPU ones: Q K^T and A V over the full square, whatever the mask."""
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    mapping = {} if cpu_sdpa is None else {cpu_sdpa: _sdpa_flops}
    kwargs.setdefault("display", False)
    return FlopCounterMode(custom_mapping={**mapping, **kwargs.pop("custom_mapping", {})}, **kwargs)


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def measure_schedule(model: torch.nn.Module, inputs: dict, method: str, budget: float | None = None,
                     **options: Any) -> TokenCounts:
    """Apply `method` to `model`, run one forward on `inputs` (one image), and read what it did."""
    cuts: list[Cut] = []
    premade: list[bool] = []
    with apply(model, method, budget, **options) as handle, torch.no_grad():
        _record_cuts(handle.policy, cuts, premade)
        decodes = bool(handle.policy.decode_layers or handle.policy.pruned_cache_layers)
        if decodes:  # the prefill and one decode step, whose selection the trace records
            greedy(model, inputs, new_tokens=2)
        else:
            model(**inputs)
        counts = tuple(handle.trace.tokens_per_layer[0])
    encoder = [c for c in cuts if c.layer is None]  # an encoder cut projects only what it keeps and merges,
    # unless it selects among tokens the model projected already (LLaVA-OneVision's pooled video frames)
    projected = sum(c.kept + c.merged for c in encoder) if encoder and not any(premade) else None
    if not decodes:
        return TokenCounts(counts, projected, tuple(cuts))
    return TokenCounts(counts, projected, tuple(cuts), decode_keys=tuple(handle.trace.decode_tokens[0][0]),
                       decode_scoring=handle.policy.decode_scoring_layer)


def _record_cuts(policy: Any, cuts: list[Cut], premade: list[bool]) -> None:
    """Wrap the policy's select methods (on the instance) to note each cut's sizes (first sample; an encoder cut
    once per crop of the one image measured, as `Cut` counts it) and whether an encoder view was projected already
    (`premade`)."""
    select_encoder, select_decoder = policy.select_encoder, policy.select_decoder
    merged = lambda sel: 0 if sel.merged is None else len(sel.of_sample(0)[1])  # noqa: E731

    def encoder(view):
        sel = select_encoder(view)
        cuts.extend([Cut(None, view.hidden.shape[1], sel.keep.shape[1], merged(sel))] * view.hidden.shape[0])
        premade.append(view.projected)
        return sel

    def decoder(cut):
        sel = select_decoder(cut)
        cuts.append(Cut(cut.layer_idx, cut.n_visual, len(sel.indices()[0]), merged(sel)))  # [G, k] or G rows
        return sel

    policy.select_encoder, policy.select_decoder = encoder, decoder


#: the measuring proxy's widths (its depths are the measured model's) and vocabulary
_PROXY_SHAPE = Shape(hidden=32, intermediate=64, layers=32, heads=4, vision_hidden=32, vision_intermediate=64,
                     vision_layers=24, vision_heads=4)
_PROXY_IDS = TokenIds(vocab=512, image=4, bos=1, eos=2, pad=3, special={"<video>": 5})  # <video>: Video-LLaVA


@functools.lru_cache(maxsize=4)
def _proxy(model_type: str, n_layers: int, vision_layers: int) -> tuple[torch.nn.Module, dict]:
    """A tiny random model of the family `model_type` at the given depths, and its example input (the family's
    `example_inputs`: one image, e.g. LLaVA-NeXT's 672-pixel square of 5 crops, 2880 patches plus 48
    image-newline tokens); built once per process."""
    family = family_by_type(model_type)
    config = family.build_config(replace(_PROXY_SHAPE, layers=n_layers, vision_layers=vision_layers), _PROXY_IDS)
    torch.manual_seed(0)
    model = family.model_class(config).eval()
    return model, family.example_inputs(config, TEXT_TOKENS, torch.Generator().manual_seed(0))


_measured: dict[tuple, TokenCounts] = {}


def schedule(dims: Dims, method: str, budget: float | None = None, **options: Any) -> TokenCounts:
    """The schedule of `method` at `budget` on a model of these dims: measured on a proxy, or on a multi-crop model
    the method's own nominal counts where it states them (`Method.nominal_counts`: VisionDrop on LLaVA-NeXT).

    Method "none" needs no measurement: every layer sees all visual tokens.
    """
    if method == "none":
        if budget is not None and budget != dims.n_visual or options:
            raise ValueError(f"method 'none' keeps all {dims.n_visual} visual tokens and takes no options; "
                             f"got budget={budget} {options or ''}")
        return TokenCounts((dims.n_visual,) * dims.n_layers, None, (), dims.crops)
    nominal = registered(method).nominal_counts
    # a video's frames are its nominal crops, so the proxy's example video measures the nominal schedule itself
    takes_videos = "video" in family_by_type(dims.model_type).feature_functions
    if dims.crops > 1 and nominal is not None and not options and not takes_videos:
        if budget is None:
            raise ValueError(f"{registered(method).title} needs a budget")
        return schedule(dims, "none") if budget >= dims.n_visual else nominal(dims, budget)
    key = (dims.model_type, dims.n_layers, dims.vision_layers, dims.crops, method, budget,
           repr(sorted(options.items())))
    if key not in _measured:
        model, inputs = _proxy(dims.model_type, dims.n_layers, dims.vision_layers)
        proxy = flops_dims(model.config)
        if (proxy.vision_tokens, proxy.visual_per_crop, proxy.crops) != (dims.vision_tokens, dims.visual_per_crop,
                                                                         dims.crops):
            raise NotImplementedError(
                f"the {dims.model_type} proxy has {proxy.vision_tokens} vision tokens and {proxy.visual_per_crop} "
                f"visual tokens per crop, {proxy.crops} crop(s); cannot measure a model with {dims.vision_tokens} / "
                f"{dims.visual_per_crop} / {dims.crops}")
        # what a proxy lacks for the method's defaults (CDPruner's text side), unless given
        sched = measure_schedule(model, inputs, method, budget,
                                 **{**registered(method).example_options(model.config), **options})
        placeholders = int(family_by_type(dims.model_type).image_token_mask(model, inputs["input_ids"], None).sum())
        # decoder-side methods see every newline token; an encoder cut lays out what it projects, plus the newline
        # tokens of the model's own layout where it keeps that (VisPruner), none in the compact one (VisionDrop)
        encoder_side = any(c.layer is None for c in sched.cuts)
        laid_out = sum(c.kept + c.merged for c in sched.cuts if c.layer is None)
        newlines = sched.tokens_per_layer[0] - laid_out if encoder_side else placeholders - dims.n_visual
        _measured[key] = replace(sched, crops=dims.crops, newlines=newlines)
    return _measured[key]


def method_decode_flops(model: str | Dims, method: str = "none", budget: float | None = None,
                        text_tokens: int = TEXT_TOKENS, **options: Any) -> Breakdown:
    """FLOPs of the first decode step after the prefill of `method` at `budget` (`decode_step_flops`)."""
    dims = checkpoint_dims(model) if isinstance(model, str) else model
    sched = schedule(dims, method, budget, **options)
    dims = replace(dims, extra_tokens=max(0, dims.extra_tokens - sched.newlines))  # measured, not extra
    return decode_step_flops(dims, sched, text_tokens)


def method_flops(model: str | Dims, method: str = "none", budget: float | None = None,
                 text_tokens: int = TEXT_TOKENS, **options: Any) -> Breakdown:
    """Prefill FLOPs of `method` at `budget` on a preset name or Dims, with `text_tokens` non-visual tokens."""
    dims = checkpoint_dims(model) if isinstance(model, str) else model
    sched = schedule(dims, method, budget, **options)
    dims = replace(dims, extra_tokens=max(0, dims.extra_tokens - sched.newlines))  # measured, not extra
    overhead = overhead_flops(dims, method, sched.cuts, text_tokens, **options)
    return prefill_flops(dims, sched.tokens_per_layer, text_tokens, sched.crops, sched.projected, overhead,
                         tower_flops(dims, method, sched.cuts, **options))


def _runs(counts: Sequence[int]) -> str:
    runs: list[list[int]] = []
    for n in counts:
        if runs and runs[-1][0] == n:
            runs[-1][1] += 1
        else:
            runs.append([n, 1])
    return ", ".join(f"{n} x{k}" for n, k in runs)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m visiondrop.efficiency.flops", description="Prefill FLOPs of a method "
                                     "in the VisionDrop paper's convention (2 x MACs, full prefill forward).")
    parser.add_argument("--model", choices=list(checkpoints()), default="llava-1.5-7b")
    parser.add_argument("--method", choices=list(METHODS), default="none")
    parser.add_argument("--budget", type=float, help="average visual tokens per decoder layer (not for 'none')")
    parser.add_argument("--text-tokens", type=int, default=TEXT_TOKENS,
                        help=f"non-visual prompt tokens (default: the paper's {TEXT_TOKENS})")
    args = parser.parse_args(argv)
    if args.method != "none" and args.budget is None:
        parser.error(f"method {args.method!r} needs --budget")
    budget = None if args.budget is None else int(args.budget) if args.budget.is_integer() else args.budget
    dims = checkpoint_dims(args.model)
    try:
        sched = schedule(dims, args.method, budget)
        result = method_flops(dims, args.method, budget, args.text_tokens)
    except (ValueError, NotImplementedError) as err:
        parser.exit(2, f"error: {err}\n")
    print(f"{args.model}, method {args.method}" + ("" if budget is None else f", budget {budget}")
          + f", {args.text_tokens} text tokens" + (f" + {dims.extra_tokens} other" if dims.extra_tokens else ""))
    mean = sum(sched.tokens_per_layer) / len(sched.tokens_per_layer)
    print(f"visual tokens per decoder layer: {_runs(sched.tokens_per_layer)} (mean {mean:.2f}); "
          f"{'all' if sched.projected is None else sched.projected} of "
          f"{(dims.projected_per_crop or dims.visual_per_crop) * dims.crops} projected; {sched.crops} vision crop(s)")
    step = method_decode_flops(dims, args.method, budget, args.text_tokens)
    if sched.decode_keys is not None:
        print(f"visual keys attended at the first decode step: {_runs(sched.decode_keys)}")
    print(f"first decode step: {step.total / 1e9:.2f} GFLOPs (not in the total below)")
    print(result.table())
    print(f"total {result.total / 1e12:.2f} TFLOPs")


if __name__ == "__main__":
    main()
