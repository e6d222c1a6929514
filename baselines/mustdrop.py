"""MustDrop (arXiv 2411.10803, "Multi-stage vision token dropping"): spatial merging in the vision tower, a text-guided
dual attention filter in prefill that always keeps a key set, and a KV-cache stage for the decode steps.

As the official code (github.com/liuting20/MustDrop 909afa5, a fork of SparseVLM's LLaVA code: `clip_encoder.py`
`CLIPVisionModelAcc.custom_forward`, `local_merge.py` `conditional_pooling`, `modelling_sparse_llama.py`
`LlamaDynamicvitModel.forward` and `dual_attention_filter`; run with `--sparse --global_thr G --individual_thr I`)
does it on LLaVA-1.5:
- vision encoding, spatial merge: after CLIP layer 0, the 24 x 24 patches are tiled into 3 x 3 windows; a window's
  similarity is the mean cosine similarity of its 9 tokens' pairs (self-pairs left out); the r windows with
  similarity >= 0.8 (r: the fewest over the tower's batch, which the official batch-1 evaluation makes the image's
  own; here the crops of one image) each become one token, the mean of the 9 (at the window's last token's place);
  the tower's later layers run on [CLS, the merged windows in descending similarity (`topk` order), the other
  patches in raster order]. Every later index refers to this order;
- key set: the top ceil(0.08 (N - 1)) tokens (N with CLS) by the head-mean [CLS] attention of the tower's LAST layer
  (23, after the merge; LLaVA projects layer 22's output), kept at every cut below;
- prefill, dual attention filter at the OUTPUT of decoder layers 2, 6, 10 and 14 (cuts before 3, 7, 11, 15): with
  A the attention probabilities of the layer that has just run, mean over heads, rows = every token after the image
  (question and the prompt's suffix), columns = the current visual tokens, a token is dropped where both its sum over
  the rows is below global_thr x the sum over all visual tokens and its largest row value is below individual_thr;
  the key set is added back; the kept tokens stay in order, positions are renumbered;
- decoding (the "output-aware cache policy", `prune_cache`, on by default): after prefill, the KV caches of the
  layers from the first filter's (2) to the last's (14) are cut down to the tokens that survive the last filter
  (`LlamaDynamicvitModel.forward`'s "Sparse kv cache" block: layer 2's by the composed indices of all four filters,
  3-6's by those of the last three, ...; layers 0-1 keep every token, 15-31 hold the last filter's already), and
  each decode token takes its layer's cache length as position (`LlamaDynamicvitSdpaAttention.forward`): the whole
  prompt's length plus the tokens generated at layers 0-1, the last filter's at 2-31. Here: the engine's decode-time
  KV selection at `decode_layers` 2-14, each segment's `kept_later` (a key mask: the memory is not freed), with
  `decode_evicts` for the positions. `prune_cache=False`: every layer attends to the tokens it processed, at the
  positions after them.

Thresholds are attention probabilities, which shrink as images grow: they are stated for LLaVA-1.5's image of 576
patches, and an image of n patches (before the merge; all its crops or frames; a OneVision frame's 196 pooled tokens)
takes them times 576 / n (the official values on LLaVA-1.5; a fifth of them for a 2,880-patch LLaVA-NeXT image, nine
times them for a 64-token Qwen2.5-VL image, on which the official values would drop nothing).

Budget: its counts are decided by thresholds and differ from image to image. The paper's 192 / 128 / 64-token rows
are the thresholds of its scripts (scripts/v1_5/eval/textvqa_{192,128,64}.sh, README): budget 192 -> global_thr
0.001, individual_thr 0.001; 128 -> 0.0012, 0.001; 64 -> 0.011, 0.01 (scaled as n_visual / 576 on other models);
other budgets are refused, naming these. `global_thr=` and `individual_thr=` (both) replace the budget, e.g. the
VizWiz script's 0.005, 0.001. The tokens an image really gets are measured, not promised: `describe()` states the
thresholds and, after a forward, the visual tokens entering each decoder layer for the first image of the last
batch (`tokens_per_layer`, their mean `equivalent_tokens`); the budget is the paper's row label. (On the tiny
parity model the 192 and 128 thresholds keep 357.75 tokens on average, the 64 thresholds 102.6.)

The filters' layers map to other depths by relative depth (`ModelInfo.relative_layers`); a decoder too shallow for
four distinct ones runs the first that fit (the 4-layer demo: after layers 0, 1, 2).

Other models (no official code beyond LLaVA-1.5, and LLaVA-NeXT's crops, which its
`prepare_sparse_inputs_labels_for_multimodal` lays out flat): the vision-side stage acts where the official code has
it, in the tower, per tower input: per crop (LLaVA-NeXT's and LLaVA-OneVision's anyres crops) and per frame
(Video-LLaVA, LLaVA-OneVision); the tiling takes the whole 3 x 3 windows of the grid (a 16 x 16 Video-LLaVA frame
leaves its last row and column unmerged). A sample's key set is its first crop's (the one every layout puts first as
it is: the base view, a video's first frame; the official flat NeXT layout offsets every crop's key set, which the
compact layout's reordered crops do not allow). Towers that cannot merge inside skip the spatial merge and take the
key set from the mean attention received at their last block (`Family.encoder_view`): Qwen2.5-VL and Qwen3-VL (their
2x2 merger groups), and LLaVA-OneVision's SigLIP, whose host needs every patch in its place after the tower (it pools
a video frame's 27 x 27 patches 2x2 bilinearly to 196 tokens, and unpads, resizes and closes with newlines an image's
crop grid): merged windows would give a frame more tokens than its 196, and the official flat layout of an image's
merged crops more than its packed grid holds. There the encoder stage keeps every token, laid out as the host lays it
out (a cut that keeps every token of a view the tower did not merge, `engine.encoder`: a OneVision video's newline
too), and the decoder filters and the cache stage prune. Videos of a batch padded to one frame count
(`with_padded_frames`): the padding frames (`EncoderView.padded`) count neither for the key set (the first real
frame's) nor for the thresholds' scale (the video's real frames), so a video keeps in a batch what it keeps alone.
The cache stage runs on every family; where positions are fixed (the Qwen families' M-RoPE,
`Family.fixed_positions`) the decode tokens keep their positions, as the prefill's cuts do.
The tower runs eager, image by image (the official code asks it for attentions): the key set is bit-identical.
The trace names the visual tokens by their places after the spatial merge (merged windows first), as the official
indices do. The FLOPs count charges the vision tower in full: the merge's savings in layers 1-23 and its window
cosines are not counted (its cost model merges between a layer's attention and MLP, ToMe's place).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from visiondrop.core import ModelInfo
from visiondrop.engine import DecodeStep, DecoderCut, EncoderView, Policy, Selection
from visiondrop.methods import Method, Overhead

LAYERS = (2, 6, 10, 14)  # the filters run at these layers' outputs (of a 32-layer decoder)
THRESHOLDS = {192: (0.001, 0.001), 128: (0.0012, 0.001), 64: (0.011, 0.01)}  # budget -> (global_thr, individual_thr)
OFFICIAL_N_VISUAL = 576
MERGE_LAYER, WINDOW, MERGE_THRESHOLD = 0, 3, 0.8
KEY_RATE = 0.08
KEY_LAYER = -1  # the tower's last layer


def window_similarity(patches: Tensor, side: int, window: int = WINDOW) -> Tensor:
    """[N, windows]: each whole `window` x `window` tile's mean pairwise cosine similarity, self-pairs left out, of the
    patches [N, side * side, D] in raster order; tiles in row-major order (the official `conditional_pooling`)."""
    tiles = side // window
    grid = patches.view(patches.shape[0], side, side, -1)[:, :tiles * window, :tiles * window]
    grid = grid.reshape(patches.shape[0], tiles, window, tiles, window, -1).permute(0, 1, 3, 2, 4, 5)
    grid = grid.reshape(patches.shape[0], tiles * tiles, window * window, -1)
    sims = F.cosine_similarity(grid.unsqueeze(-2), grid.unsqueeze(-3), dim=-1)
    sims = sims * (1 - torch.eye(window * window, device=sims.device, dtype=sims.dtype))
    return sims.sum(-1).sum(-1) / (window * window * (window * window - 1))


def window_tokens(side: int, window: int, device: torch.device) -> Tensor:
    """[windows, window * window]: the raster indices of each tile's tokens, row-major inside the tile."""
    tiles = side // window
    index = torch.arange(side * side, device=device).view(side, side)[:tiles * window, :tiles * window]
    return index.reshape(tiles, window, tiles, window).permute(0, 2, 1, 3).reshape(tiles * tiles, window * window)


def spatial_merge(x: Tensor, first: int, threshold: float = MERGE_THRESHOLD, window: int = WINDOW) -> Tensor:
    """MustDrop's merge of the tokens [N, first + side^2, D] (`first`: 1 with CLS), the crops of one image: the r
    tiles (the fewest over the crops) with similarity >= threshold each become their tokens' mean; returns
    [N, first + side^2 - r (window^2 - 1), D] ordered [CLS, merged tiles in descending similarity, the other
    tokens in raster order]."""
    patches = x[:, first:]
    side = math.isqrt(patches.shape[1])
    if side * side != patches.shape[1]:
        raise ValueError(f"MustDrop's spatial merge needs a square grid of patches, got {patches.shape[1]}")
    similarity = window_similarity(patches, side, window)
    r = int((similarity >= threshold).sum(1).min())
    if r == 0:
        return x
    tiles = window_tokens(side, window, x.device)[similarity.topk(r, dim=-1).indices]  # [N, r, window^2]
    merged = patches.gather(1, tiles.flatten(1).unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    merged = merged.view(*tiles.shape, -1).sum(2) / tiles.shape[-1]
    unmerged = torch.ones(x.shape[0], patches.shape[1], dtype=torch.bool, device=x.device)
    unmerged.scatter_(1, tiles.flatten(1), False)
    rest = patches[unmerged].view(x.shape[0], -1, x.shape[-1])  # raster order
    return torch.cat([x[:, :first], merged, rest], dim=1)


def key_set(importance: Tensor, first: int, rate: float = KEY_RATE) -> Tensor:
    """[N, k]: the key tokens' indices among the patches (after CLS), k = ceil(rate x patches), by the head-mean
    importance [N, H, first + patches] (official `topk` order)."""
    scores = importance[:, :, first:].mean(dim=1)
    return scores.topk(math.ceil(rate * scores.shape[1]), dim=1).indices


def dual_filter(probs: Tensor, global_thr: float, individual_thr: float) -> Tensor:
    """The tokens [n] a filter keeps (before the key set), from the head-mean attention [rows, n] of the text rows on
    the visual tokens: dropped where the column sum < global_thr x the total and the column max < individual_thr."""
    total = probs.sum(0)
    dropped = (total < total.sum() * global_thr) & (probs.max(0).values < individual_thr)
    return ~dropped


class MustDrop(Policy):
    name = "mustdrop"
    eager_encoder = True
    merges_in_tower = True
    merges_at_layer_output = True
    scan_layers = (KEY_LAYER,)
    decode_evicts = True  # official: each layer's cut cache length positions its decode tokens

    def __init__(self, info: ModelInfo, layers: tuple[int, ...], global_thr: float, individual_thr: float,
                 budget: float | None, prune_cache: bool = True):
        self.info, self.layers, self.global_thr, self.individual_thr, self.budget, self.prune_cache = (
            info, layers, global_thr, individual_thr, budget, prune_cache)
        self.encoder_layer = info.vision_layer
        self.cut_layers = tuple(layer + 1 for layer in layers)  # a layer's output = the next layer's input
        if prune_cache:  # the layers from the first filter's to the last's cache only what the last filter kept
            self.decode_layers = tuple(range(layers[0], layers[-1] + 1))
        self._keys: dict[int, Tensor] = {}  # image (`EncoderView.owners`) -> its key tokens' places in its block
        self._scale: dict[int, float] = {}  # image -> 576 / its patches before the merge: the thresholds' factor
        self._entering: dict[int, list[int]] = {}  # sample -> visual tokens entering the decoder, then each cut's

    def merge_in_tower(self, layer: int, hidden: Tensor, metric: Tensor) -> Tensor:
        return spatial_merge(hidden, int(self.info.tower_cls)) if layer == MERGE_LAYER else hidden

    def select_encoder(self, view: EncoderView) -> Selection:
        """Every token the merge left (CLS too where the model keeps it), and each image's key set: its first real
        crop's (the one every layout puts first as it is: LLaVA-NeXT's base image, a video's first frame; frames
        that only pad a shorter video in a batch, `EncoderView.padded`, count for neither the key set nor the
        thresholds' scale)."""
        first, cls = int(view.has_cls), int(view.has_cls and self.info.cls_kept)
        valid = (torch.ones(view.hidden.shape[:2], dtype=torch.bool, device=view.hidden.device)
                 if view.valid is None else view.valid)
        scores = view.importance_at[KEY_LAYER].masked_fill(~valid[:, None], float("-inf"))
        ranked = key_set(scores, first)
        before = (view.tokens or view.hidden.shape[1]) - first  # a crop's patches before the merge
        if view.owners[0] == 0:  # a new encoding: forget the last one's images
            self._keys, self._scale = {}, {}
        real = [not padded for padded in view.padded or [False] * len(view.owners)]
        for crop, owner in enumerate(view.owners):
            if real[crop] and owner not in self._keys:
                patches = int(valid[crop].sum()) - first
                self._keys[owner] = ranked[crop, : math.ceil(KEY_RATE * patches)] + cls
                crops = sum(r for o, r in zip(view.owners, real) if o == owner)
                self._scale[owner] = OFFICIAL_N_VISUAL / (before * crops)
        keep = torch.arange(first - cls, view.hidden.shape[1], device=view.hidden.device).expand(
            view.hidden.shape[0], -1)
        return Selection(keep.masked_fill(~valid[:, first - cls:], -1))

    def prepare(self, cut: DecoderCut) -> None:
        """Note the samples with an image (their order gives each its image, `EncoderView.owners`)."""
        if "with_images" not in cut.scratch:  # the forward's first group: forget the last forward's counts
            self._entering = {}
        cut.scratch.setdefault("with_images", set()).update(cut.samples)
        for b in cut.samples:
            self._entering[b] = [cut.original_visual]

    def select_decoder(self, cut: DecoderCut) -> Selection:
        rows = [torch.arange(int(v[-1]) + 1, cut.hidden.shape[1], device=cut.hidden.device) for v in cut.visual]
        if any(len(r) == 0 for r in rows):
            raise ValueError("MustDrop needs text after the image: its filter's rows are the following tokens")
        width = max(len(r) for r in rows)  # samples have different text lengths: pad by repeating one
        queries = torch.stack([torch.cat([r, r[-1:].expand(width - len(r))]) for r in rows])
        probs = cut.attention(cut.layer_idx - 1, queries, hidden=cut.prev_hidden).mean(1)  # [G, Q, L]
        visual = probs.gather(2, cut.visual.unsqueeze(1).expand(-1, width, -1))
        keep = []
        for g, b in enumerate(cut.samples):
            image = self.image_of(b, cut.scratch["with_images"])
            is_key = cut.scratch.get(("keys", b))
            if is_key is None:
                is_key = torch.zeros(cut.n_visual, dtype=torch.bool, device=visual.device)
                is_key[self._keys[image].to(visual.device)] = True
            scale = self._scale[image]
            kept = dual_filter(visual[g, : len(rows[g])], self.global_thr * scale, self.individual_thr * scale) | is_key
            keep.append(kept.nonzero()[:, 0])
            cut.scratch[("keys", b)] = is_key[keep[-1]]
            self._entering[b].append(len(keep[-1]))
        return Selection(keep)

    def select_cached(self, step: DecodeStep) -> list[Tensor | None]:
        return step.kept_later

    def image_of(self, sample: int, with_images: set[int]) -> int:
        """The encoded image (`EncoderView.owners`) of a batch row: the rows with an image take them in order, and
        where there are more rows than images, generate() has repeated every row alike (num_return_sequences,
        beams: `repeat_interleave`), so consecutive rows share an image."""
        rows, images = sorted(with_images), len(self._keys)
        if len(rows) % images:
            raise ValueError(f"MustDrop encoded {images} images for {len(rows)} rows with an image: it follows "
                             "generate()'s repeats of whole batches only")
        return rows.index(sample) // (len(rows) // images)

    def tokens_per_layer(self, sample: int) -> list[int]:
        """The visual tokens entering each decoder layer for `sample` of the last forward."""
        counts, entering = [], self._entering[sample]
        for layer in range(self.info.n_layers):
            counts.append(entering[sum(layer >= c for c in self.cut_layers)])
        return counts

    def describe(self) -> dict:
        described = {"method": self.name, "layers": list(self.layers), "global_thr": self.global_thr,
                     "individual_thr": self.individual_thr, "merge_threshold": MERGE_THRESHOLD, "key_rate": KEY_RATE,
                     "budget_row": self.budget, "prune_cache": self.prune_cache}
        complete = {b: e for b, e in self._entering.items() if len(e) == len(self.cut_layers) + 1}
        if complete:
            counts = self.tokens_per_layer(min(complete))
            described |= {"tokens_per_layer": counts, "equivalent_tokens": sum(counts) / len(counts)}
        return described


def smallest_budget(info: ModelInfo) -> float:
    return min(THRESHOLDS) * info.n_visual / OFFICIAL_N_VISUAL


def policy(info: ModelInfo, budget: float | None = None, global_thr: float | None = None,
           individual_thr: float | None = None, layers: list[int] | None = None, prune_cache: bool = True) -> Policy:
    """MustDrop with the thresholds of the paper's `budget` row (192, 128, 64 of 576) or given `global_thr` and
    `individual_thr`; `layers`: the filters' layers (their outputs) of a 32-layer decoder, by relative depth (by
    default the official four, or as many of the first as a shallower decoder has distinct layers for);
    `prune_cache=False` turns the decode-time cache stage off (every layer keeps the cache of the tokens it
    processed)."""
    if layers is None:  # a decoder too shallow for four distinct filters (the 4-layer demo) runs the first ones
        layers = LAYERS[:max(1, min(len(LAYERS), info.n_layers - 1))]
    layers = info.relative_layers(list(layers), "MustDrop layers", lowest=0, spare=1)
    if (global_thr is None) != (individual_thr is None):
        raise ValueError("MustDrop takes global_thr= and individual_thr= together (its scripts' --global_thr and "
                         "--individual_thr)")
    if global_thr is not None:
        return MustDrop(info, layers, float(global_thr), float(individual_thr), None, prune_cache)
    if budget is None:
        raise ValueError("MustDrop needs a budget (192, 128 or 64 of 576) or global_thr= and individual_thr=")
    row = round(budget * OFFICIAL_N_VISUAL / info.n_visual, 9)
    if row not in THRESHOLDS:
        allowed = ", ".join(f"{b * info.n_visual / OFFICIAL_N_VISUAL:g}" for b in sorted(THRESHOLDS))
        raise ValueError(f"MustDrop's budgets are its paper's rows {allowed} (or {info.n_visual} for the unpruned "
                         f"model), whose thresholds its scripts give, got {budget:g}; its counts follow the image, so "
                         f"pass global_thr= and individual_thr= for other settings. The smallest reachable budget is "
                         f"{smallest_budget(info):g}")
    return MustDrop(info, layers, *THRESHOLDS[int(row)], budget, prune_cache)


METHOD = Method("mustdrop", "MustDrop", policy, smallest_budget, replaces_budget=("global_thr", "individual_thr"),
                overhead=lambda **_: Overhead(rows="question", eager_encoder=True),
                scoring=lambda **_: {"encoder": "similarity", "decoder": "question"},
                example_budget=64, exact_count=False, counts_follow_content=True)
