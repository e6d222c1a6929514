"""SparseVLM v1.5 (arXiv 2410.04417): text raters score the image at three layer outputs, pruned tokens are recycled.

As the official code does it (github.com/Gumpest/SparseVLMs, branch v1.5 @734d900 = `main` with USE_VERSION unset):
- raters, chosen once before layer 0 from the decoder input embeddings: with V the visual rows and T all tokens after
  the image (question and suffix), M = softmax over T of V.T^T (raw dot products), r_t = mean of M[:, t] over the
  visual rows; the raters are the tokens with r_t > mean(r), addressed relative to the start of the text;
- pruning at the OUTPUT of decoder layers 2, 6 and 15 (the engine cuts before layers 3, 7, 16), scored with the
  attention probabilities of the layer that has just run: mean over heads, rows = raters, columns = the current
  visual tokens, mean over raters. The top k = min(K, n_visual - 1) stay in their order;
- recycling: of the just-pruned tokens the top int(0.3 * n_pruned) + 1 by score (in score order) are clustered
  with DPC-kNN on the layer's output hidden states into count // 10 + 1 clusters; each cluster becomes one token,
  sum(members) / (count + 1e-6), inserted right after the kept visual tokens in centre order. Recycled tokens are
  ordinary visual tokens at later cuts (rescored, may survive, may be recycled again);
- positions are renumbered contiguously; in decoding every layer uses its own cache length as position (the
  engine's per-segment positions do exactly that).
The density-peak order depends on `torch.rand((1, n))` * 1e-6 drawn once per cut from the global torch RNG: where
the true densities underflow (as on tiny models) that noise alone picks the cluster centres, so unseeded runs vary,
as the official ones do. `torch.manual_seed(s)` right before `generate` reproduces an official run seeded alike.

Budgets: the official keep lists for layers (2, 6, 15) on LLaVA-1.5 (576 visual tokens): 192 -> [300, 200, 110],
128 -> [303, 110, 36], 96 -> [238, 48, 26] (main branch), 64 -> [66, 30, 17]; other budgets are refused.
`describe()["equivalent_tokens"]` is SparseVLM's own count (mean over layers of the visual tokens each layer
OUTPUTS, what its code prints: 192.03 for 192); the tokens ENTERING each layer, which the trace measures, average
higher (206.5 for 192) and are recorded as "mean_tokens_entering_layers".

Options (keywords of `visiondrop.apply` beside `budget`):
- `keep_lists`: explicit [K1, K2, ...], one per pruning layer, overriding the budget table;
- `layers` (default [2, 6, 15]): the layers at whose output it prunes, given for a 32-layer decoder and mapped
  to other depths by relative depth, kept distinct (`ModelInfo.relative_layers`: [0, 1, 2] on 4 layers);
- `recycle` (default True): False drops the pruned tokens without clustering (the paper's no-recycling ablation);
- `seed` (default None: the global RNG, as the official code): an int draws each sample's clustering noise from a
  private CPU generator seeded with it at every forward, so outcomes do not depend on the batch or on earlier
  calls (`seed=0` gives the same draws as `torch.manual_seed(0)` for a single prompt).
Not reproduced, with no effect on the outputs: the official batch-size-1 limit and its full attention matrices in
every layer (only the rater rows are computed here, so SDPA / FlashAttention stay on).
"""
from __future__ import annotations

import torch
from torch import Tensor

from visiondrop.api import unpruned
from visiondrop.engine import DecoderCut, Policy, Selection, complement, topk_in_order
from visiondrop.models import ModelInfo

LAYERS = (2, 6, 15)
KEEP_LISTS = {64: (66, 30, 17), 96: (238, 48, 26), 128: (303, 110, 36), 192: (300, 200, 110)}
OFFICIAL_N_VISUAL = 576


def n_candidates(n_pruned: int) -> int:
    return int(n_pruned * 0.3) + 1  # the top 30% of the pruned tokens, at least one


def n_clusters(n_cands: int) -> int:
    return n_cands // 10 + 1


def tokens_per_layer(n_visual: int, n_layers: int, layers: tuple[int, ...], keep_lists: tuple[int, ...],
                     recycle: bool) -> list[int]:
    """Visual tokens entering each decoder layer for one image of `n_visual` tokens."""
    cuts, counts, n = dict(zip(layers, keep_lists)), [], n_visual
    for layer in range(n_layers):
        counts.append(n)
        if layer in cuts:
            k = min(cuts[layer], n - 1)
            n = k + (n_clusters(n_candidates(n - k)) if recycle else 0)
    return counts


def cluster_and_merge(x: Tensor, n_clust: int, noise: Tensor) -> Tensor:
    """DPC-kNN on x [n, D] into `n_clust` tokens [n_clust, D] (centre order), as the official `cluster_and_merge`.

    noise [n] is the uniform draw that breaks density ties (scaled by 1e-6 here).
    """
    dist = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") / x.shape[-1] ** 0.5
    nearest = dist.topk(n_clust, dim=-1, largest=False).values  # includes the token itself
    density = (-(nearest ** 2).mean(-1)).exp() + noise * 1e-6
    denser = density.unsqueeze(0) > density.unsqueeze(1)  # [i, j]: j is denser than i
    delta = torch.where(denser, dist, dist.max()).min(-1).values
    centres = (delta * density).topk(n_clust).indices
    assign = dist[centres].argmin(0)
    assign[centres] = torch.arange(n_clust, device=x.device)  # a centre joins itself
    weight = 1 / (torch.bincount(assign, minlength=n_clust).to(x.dtype) + 1e-6)
    return x.new_zeros(n_clust, x.shape[-1]).index_add_(0, assign, x * weight[assign].unsqueeze(-1))


class SparseVLM(Policy):
    name = "sparsevlm"

    def __init__(self, info: ModelInfo, layers: tuple[int, ...], keep_lists: tuple[int, ...], recycle: bool,
                 seed: int | None):
        self.info, self.layers, self.keep_lists, self.recycle, self.seed = info, layers, keep_lists, recycle, seed
        self.cut_layers = tuple(layer + 1 for layer in layers)  # pruning a layer's output = cutting before the next
        self._keep = dict(zip(self.cut_layers, keep_lists))

    def prepare(self, cut: DecoderCut) -> None:
        """Choose each sample's raters on the decoder input embeddings (and start its noise generator)."""
        for g, b in enumerate(cut.samples):
            visual = cut.hidden[g, cut.visual[g]]
            text = cut.hidden[g, int(cut.visual[g, -1]) + 1:]
            if text.shape[0] == 0:
                raise ValueError("SparseVLM needs text after the image: its raters are the following tokens")
            relevance = (visual @ text.T).softmax(-1).mean(0)
            raters = (relevance > relevance.mean()).nonzero()[:, 0]
            if raters.numel() == 0:  # all tokens equally relevant (e.g. a single one): the official mean is NaN
                raters = torch.arange(text.shape[0], device=text.device)
            generator = None if self.seed is None else torch.Generator().manual_seed(self.seed)
            cut.scratch[b] = (raters, generator)

    def scores(self, cut: DecoderCut) -> Tensor:
        """[G, n]: attention of the layer that has just run, mean over heads, rater rows, mean over raters."""
        raters = [cut.scratch[b][0] for b in cut.samples]
        width = max(len(r) for r in raters)  # samples have different rater counts: pad by repeating one
        rows = torch.stack([torch.cat([r, r[-1:].expand(width - len(r))]) for r in raters]) + cut.visual[:, -1:] + 1
        probs = cut.attention(cut.layer_idx - 1, rows, hidden=cut.prev_hidden).mean(1)  # [G, Q, L]
        visual = probs.gather(2, cut.visual.unsqueeze(1).expand(-1, width, -1))
        return torch.stack([visual[g, : len(r)].mean(0) for g, r in enumerate(raters)])

    def select_decoder(self, cut: DecoderCut) -> Selection:
        scores = self.scores(cut)
        # keep lists are for a 576-token image; a NeXT sample scales them to its own count (a documented guess)
        keep = topk_in_order(scores, min(cut.scaled(self._keep[cut.layer_idx], OFFICIAL_N_VISUAL), cut.n_visual - 1))
        if not self.recycle:
            return Selection(keep)
        pruned = complement(keep, cut.n_visual)
        n_cands = n_candidates(pruned.shape[1])
        candidates = pruned.gather(1, scores.gather(1, pruned).topk(n_cands).indices)  # score order, as official
        hidden = cut.visual_rows(cut.hidden)  # the output of the layer that has just run
        merged = []
        for g, b in enumerate(cut.samples):
            x = hidden[g, candidates[g]]
            merged.append(cluster_and_merge(x, n_clusters(n_cands), self._noise(cut.scratch[b][1], x)))
        return Selection(keep, torch.stack(merged))

    @staticmethod
    def _noise(generator: torch.Generator | None, x: Tensor) -> Tensor:
        if generator is None:  # the official draw: global RNG, on the tokens' device and dtype
            return torch.rand((1, x.shape[0]), device=x.device, dtype=x.dtype)[0]
        return torch.rand((1, x.shape[0]), generator=generator, dtype=x.dtype)[0].to(x.device)

    def describe(self) -> dict:
        scale = self.info.n_visual // OFFICIAL_N_VISUAL  # NeXT: the keep lists scale with the (nominal) image
        keep = tuple(k * scale for k in self.keep_lists)
        counts = tokens_per_layer(self.info.n_visual, self.info.n_layers, self.layers, keep, self.recycle)
        output_counts = counts[1:] + counts[-1:]  # what each layer outputs: the next layer's input, last unchanged
        return {"method": self.name, "layers": list(self.layers), "keep_lists": list(self.keep_lists),
                "recycle": self.recycle, "seed": self.seed, "tokens_per_layer": counts,
                "equivalent_tokens": sum(output_counts) / len(counts),
                "mean_tokens_entering_layers": sum(counts) / len(counts)}


def policy(info: ModelInfo, budget: float | None = None, keep_lists: list[int] | None = None,
           layers: list[int] | None = None, recycle: bool = True, seed: int | None = None) -> Policy:
    """SparseVLM v1.5 from a budget (one of the official keep lists) or explicit `keep_lists`."""
    layers = info.relative_layers(LAYERS if layers is None else list(layers), "SparseVLM layers", lowest=0, spare=1)
    if keep_lists is None:
        if budget is None:
            raise ValueError("SparseVLM needs budget= or keep_lists=")
        if budget >= info.n_visual:
            return unpruned(info, info.n_visual)
        reference = budget * OFFICIAL_N_VISUAL / info.n_visual  # NeXT: 640/320 of 2880 -> the 128/64 lists
        if reference not in KEEP_LISTS:
            allowed = ", ".join(f"{b * info.n_visual / OFFICIAL_N_VISUAL:g}" for b in KEEP_LISTS)
            raise ValueError(f"SparseVLM has official keep lists only for budgets {allowed} (or {info.n_visual} for "
                             f"the unpruned model), got {budget}; pass keep_lists= otherwise")
        keep_lists = KEEP_LISTS[reference]
    keep_lists = tuple(keep_lists)
    if len(keep_lists) != len(layers) or not all(isinstance(k, int) and k >= 0 for k in keep_lists):
        raise ValueError(f"SparseVLM needs one keep count >= 0 per pruning layer {list(layers)}, got {list(keep_lists)}")
    return SparseVLM(info, layers, keep_lists, recycle, seed)
