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
the true densities underflow (as on tiny models) that noise alone picks the cluster centres, so the official runs
vary from run to run and with the other samples of a batch. Here each sample draws from its own generator seeded
with `seed` (default 0) at every forward, so answers are reproducible and independent of the batch; `seed="global"`
draws from the global RNG as the official code, and `torch.manual_seed(s)` right before `generate` then
reproduces an official run seeded alike (`seed=0` gives the same draws as `torch.manual_seed(0)` for one prompt).

Budgets: the official keep lists for layers (2, 6, 15) on LLaVA-1.5-7B (576 visual tokens, 32 layers): 192 ->
[300, 200, 110], 128 -> [303, 110, 36], 96 -> [238, 48, 26] (main branch), 64 -> [66, 30, 17]; other budgets are
refused. `describe()["equivalent_tokens"]` is SparseVLM's own count (mean over layers of the visual tokens each
layer OUTPUTS, what its code prints: 192.03 for 192); the tokens ENTERING each layer, which the trace measures,
average higher and are recorded as "mean_tokens_entering_layers": 206.5 at 192, 145.41 at 128, 114.09 at 96,
82.25 at 64 (ratios 1.076, 1.136, 1.188, 1.285 to the budget).
The rule on every model and depth is that of LLaVA-1.5-7B: a budget B feeds each sample's layers, on average,
the tokens the official lists feed LLaVA-1.5-7B at B, as a fraction of the image (ratio_B * B * n / N0 for a
sample of n visual tokens out of the model's nominal N0; `schedule`). The keep lists are the official ones scaled
by one common factor, the factor (nearest to n / 576) whose schedule, recycled clusters and rounding included,
brings the mean entering tokens closest to that target: exactly the official lists on LLaVA-1.5-7B, close to
n / 576 times them on a 32-layer LLaVA-NeXT, much shorter lists on shallow decoders, where the first cut comes
after a larger share of the layers. A NeXT sample's lists follow its own count. Where the fewest tokens the
schedule can feed (keep lists of 1) already exceed the target, the budget is refused, naming the smallest
reachable one (on a 4-layer decoder the first layer alone, with all 576 tokens, averages 144: only 192 is left).

Options (keywords of `visiondrop.apply` beside `budget`):
- `keep_lists`: explicit [K1, K2, ...], one per pruning layer, used as given instead of the budget's schedule
  (counts for a 576-token image: a NeXT sample scales them to its own count);
- `layers` (default [2, 6, 15]): the layers at whose output it prunes, given for a 32-layer decoder and mapped
  to other depths by relative depth, kept distinct (`ModelInfo.relative_layers`: [0, 1, 2] on 4 layers); with a
  budget, the keep lists are solved for these layers by the rule above;
- `recycle` (default True): False drops the pruned tokens without clustering (the paper's no-recycling ablation;
  a budget then targets what the official lists feed LLaVA-1.5-7B without recycling);
- `lists` (default "official"): "interpolated" reaches any budget between the official ones (64 to 192 of 576, e.g.
  the video papers' 12.5% = 72 and 25% = 144): the two neighbouring official lists interpolated linearly by budget
  (`reference_lists`), then the same rule; not the official code's (which has these four lists only), and labelled
  so in `describe()` ("interpolated_keep_lists") and in the tables (an option set by hand);
- `seed` (default 0): an int draws each sample's clustering noise from a private CPU generator seeded with it at
  every forward, so outcomes do not depend on the batch or on earlier calls; "global" draws from the global torch
  RNG on the tokens' device, as the official code (for parity runs seeded with `torch.manual_seed`).
Not reproduced, with no effect on the outputs: the official batch-size-1 limit and its full attention matrices in
every layer (only the rater rows are computed here, so SDPA / FlashAttention stay on).
"""
from __future__ import annotations

import torch
from torch import Tensor

from visiondrop.engine import DecoderCut, Policy, Selection, complement, topk_in_order
from visiondrop.methods import Method, Overhead, Unreachable
from visiondrop.core import ModelInfo

LAYERS = (2, 6, 15)
KEEP_LISTS = {64: (66, 30, 17), 96: (238, 48, 26), 128: (303, 110, 36), 192: (300, 200, 110)}
OFFICIAL_N_VISUAL = 576
OFFICIAL_N_LAYERS = 32
LISTS = ("official", "interpolated")
SEEDS = "an int (each sample's own generator, the default 0) or 'global' (the global torch RNG, as official)"


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


def reference_lists(reference: float) -> tuple[int, ...]:
    """LLaVA-1.5-7B's keep lists at budget `reference`: the official ones, or between two official budgets (option
    `lists="interpolated"`) the neighbours' lists interpolated linearly by budget and rounded (72 -> (109, 35, 19))."""
    if reference in KEEP_LISTS:
        return KEEP_LISTS[reference]
    below = max(b for b in KEEP_LISTS if b < reference)
    above = min(b for b in KEEP_LISTS if b > reference)
    t = (reference - below) / (above - below)
    return tuple(int(lo + t * (hi - lo) + 0.5) for lo, hi in zip(KEEP_LISTS[below], KEEP_LISTS[above]))


def official_mean(reference: float, recycle: bool) -> float:
    """Mean visual tokens entering the layers of LLaVA-1.5-7B with the keep lists of budget `reference`."""
    counts = tokens_per_layer(OFFICIAL_N_VISUAL, OFFICIAL_N_LAYERS, LAYERS, reference_lists(reference), recycle)
    return sum(counts) / len(counts)


def schedule(reference: float, n: int, n_layers: int, layers: tuple[int, ...], recycle: bool) -> tuple[int, ...]:
    """Keep lists for one image of `n` visual tokens on an `n_layers`-layer decoder pruning after `layers`.

    The target is the official schedule's mean entering tokens at `reference` (a LLaVA-1.5 budget) as a fraction
    of the image: official_mean(reference) * n / 576. The lists are the official ones times one factor s
    (rounded, at least 1): the mean is non-decreasing in s, so bisection finds the values of s whose mean is
    closest to the target, and of those the one nearest to n / 576 is taken (the official lists themselves on
    LLaVA-1.5-7B). Raises `Unreachable` where even lists of 1 feed more than the target.
    """
    official = reference_lists(reference)
    target = official_mean(reference, recycle) * n / OFFICIAL_N_VISUAL
    proportional = n / OFFICIAL_N_VISUAL

    def keeps(s: float) -> tuple[int, ...]:
        return tuple(max(1, int(s * k + 0.5)) for k in official)

    def mean(s: float) -> float:
        return sum(tokens_per_layer(n, n_layers, layers, keeps(s), recycle)) / n_layers

    floor = mean(0.0)
    if floor > target:
        raise Unreachable(f"fewest mean entering tokens {floor:g} > target {target:g}", floor)

    def first_at_least(value: float) -> float:
        """The smallest s (to 1e-12 relative) with mean(s) >= value; mean is a right-continuous step function."""
        lo, hi = 0.0, n / min(official) + 1.0  # keeps >= n at hi: nothing pruned, the mean is n
        if mean(lo) >= value:
            return lo
        while hi - lo > 1e-12 * hi:
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if mean(mid) >= value else (mid, hi)
        return hi

    # steps of s are >= 1e-6 apart (breakpoints (j + 1/2) / k): 1e-9 steps back across exactly one breakpoint
    reach = first_at_least(target)
    nearest = min(mean(reach), mean(max(reach - 1e-9, 0.0)), key=lambda m: (abs(m - target), -m))
    start, end = first_at_least(nearest), first_at_least(nearest + 1e-9)  # mean(s) == nearest on [start, end)
    if mean(end) == nearest:  # nothing is pruned beyond start: no upper end
        return keeps(max(start, proportional))
    return keeps(max(start, min(proportional, end - 1e-9)))


def cluster_and_merge(x: Tensor, n_clust: int, noise: Tensor) -> tuple[Tensor, Tensor]:
    """DPC-kNN on x [n, D] into `n_clust` tokens [n_clust, D] (centre order), as the official `cluster_and_merge`,
    and the merge's weights [n_clust, n] (each token's 1 / cluster size in its cluster's row: `Selection.weights`).

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
    weights = x.new_zeros(n_clust, x.shape[0]).scatter_(0, assign.unsqueeze(0), weight[assign].unsqueeze(0))
    return x.new_zeros(n_clust, x.shape[-1]).index_add_(0, assign, x * weight[assign].unsqueeze(-1)), weights


class SparseVLM(Policy):
    name = "sparsevlm"

    def __init__(self, info: ModelInfo, layers: tuple[int, ...], keep_lists: tuple[int, ...] | None, recycle: bool,
                 seed: int | str = 0, reference: float | None = None):
        """keep_lists: explicit lists (for a 576-token image, scaled to a sample's count), or None with
        `reference`, the LLaVA-1.5 budget whose rule (`schedule`) gives each sample's lists."""
        if (keep_lists is None) == (reference is None):
            raise ValueError("SparseVLM needs exactly one of keep_lists and reference")
        self.info, self.layers, self.recycle, self.seed, self.reference = info, layers, recycle, seed, reference
        self.explicit = None if keep_lists is None else tuple(keep_lists)
        self.cut_layers = tuple(layer + 1 for layer in layers)  # pruning a layer's output = cutting before the next
        self._schedules: dict[int, tuple[int, ...]] = {}
        self.keep_lists = self.lists_for(info.n_visual)  # the nominal image's (official ones on LLaVA-1.5-7B)

    def lists_for(self, n: int) -> tuple[int, ...]:
        """The keep lists for an image of `n` visual tokens (cached per count)."""
        if self.explicit is not None:
            return tuple(round(k * n / OFFICIAL_N_VISUAL) for k in self.explicit)
        if n not in self._schedules:
            self._schedules[n] = schedule(self.reference, n, self.info.n_layers, self.layers, self.recycle)
        return self._schedules[n]

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
            generator = None if self.seed == "global" else torch.Generator().manual_seed(self.seed)
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
        lists = self.lists_for(cut.original_visual)
        keep = topk_in_order(scores, min(lists[self.cut_layers.index(cut.layer_idx)], cut.n_visual - 1))
        if not self.recycle:
            return Selection(keep)
        pruned = complement(keep, cut.n_visual)
        n_cands = n_candidates(pruned.shape[1])
        candidates = pruned.gather(1, scores.gather(1, pruned).topk(n_cands).indices)  # score order, as official
        hidden = cut.visual_rows(cut.hidden)  # the output of the layer that has just run
        merged, weights = [], []
        for g, b in enumerate(cut.samples):
            x = hidden[g, candidates[g]]
            tokens, local = cluster_and_merge(x, n_clusters(n_cands), self._noise(cut.scratch[b][1], x))
            merged.append(tokens)  # weights over all the visual tokens: the candidates' columns
            weights.append(local.new_zeros(local.shape[0], cut.n_visual).index_copy_(1, candidates[g], local))
        return Selection(keep, torch.stack(merged), torch.stack(weights))

    @staticmethod
    def _noise(generator: torch.Generator | None, x: Tensor) -> Tensor:
        if generator is None:  # the official draw: global RNG, on the tokens' device and dtype
            return torch.rand((1, x.shape[0]), device=x.device, dtype=x.dtype)[0]
        return torch.rand((1, x.shape[0]), generator=generator, dtype=x.dtype)[0].to(x.device)

    def describe(self) -> dict:
        """The schedule of a nominal image (LLaVA-NeXT samples follow their own counts, `lists_for`)."""
        counts = tokens_per_layer(self.info.n_visual, self.info.n_layers, self.layers, self.keep_lists, self.recycle)
        output_counts = counts[1:] + counts[-1:]  # what each layer outputs: the next layer's input, last unchanged
        described = {"method": self.name, "layers": list(self.layers), "keep_lists": list(self.keep_lists),
                     "recycle": self.recycle, "seed": self.seed, "tokens_per_layer": counts,
                     "equivalent_tokens": sum(output_counts) / len(counts),
                     "mean_tokens_entering_layers": sum(counts) / len(counts)}
        if self.reference is not None:
            official = "official" if self.reference in KEEP_LISTS else "interpolated"
            described[f"{official}_keep_lists"] = list(reference_lists(self.reference))
            described["target_mean_tokens_entering_layers"] = (official_mean(self.reference, self.recycle)
                                                               * self.info.n_visual / OFFICIAL_N_VISUAL)
        return described


def reachable_budgets(info: ModelInfo, layers: tuple[int, ...], recycle: bool) -> list[float]:
    """The budgets (official ones, scaled to the model's visual tokens) whose schedule this model can feed."""
    reachable = []
    for b in sorted(KEEP_LISTS):
        try:
            schedule(b, info.n_visual, info.n_layers, layers, recycle)
            reachable.append(b * info.n_visual / OFFICIAL_N_VISUAL)
        except Unreachable:
            pass
    return reachable


def smallest_budget(info: ModelInfo) -> float:
    """With the default layers and recycling (the unpruned model's budget where none is reachable)."""
    layers = info.relative_layers(LAYERS, "SparseVLM layers", lowest=0, spare=1)
    return min(reachable_budgets(info, layers, True), default=info.n_visual)


def policy(info: ModelInfo, budget: float | None = None, keep_lists: list[int] | None = None,
           layers: list[int] | None = None, recycle: bool = True, seed: int | str = 0, lists: str = "official"
           ) -> Policy:
    """SparseVLM v1.5 from a budget (one of the official keep lists, by the rule of the docstring; with
    lists="interpolated" any budget between the official ones) or `keep_lists`."""
    if lists not in LISTS:
        raise ValueError(f"SparseVLM lists must be one of {LISTS}, got {lists!r}")
    if seed != "global" and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"SparseVLM seed must be {SEEDS}, got {seed!r}")
    layers = info.relative_layers(LAYERS if layers is None else list(layers), "SparseVLM layers", lowest=0, spare=1)
    if keep_lists is not None:
        keep_lists = tuple(keep_lists)
        if len(keep_lists) != len(layers) or not all(isinstance(k, int) and k >= 0 for k in keep_lists):
            raise ValueError(f"SparseVLM needs one keep count >= 0 per pruning layer {list(layers)}, "
                             f"got {list(keep_lists)}")
        return SparseVLM(info, layers, keep_lists, recycle, seed)
    if budget is None:
        raise ValueError("SparseVLM needs budget= or keep_lists=")
    if len(layers) != len(LAYERS):
        raise ValueError(f"SparseVLM needs one keep count per pruning layer: its budgets have {len(LAYERS)}, got "
                         f"layers {list(layers)}; pass keep_lists= for another number of layers")
    # NeXT: 640/320 of 2880 -> the 128/64 lists; rounded so that a ratio (1/3 x n_visual) finds its list
    reference = round(budget * OFFICIAL_N_VISUAL / info.n_visual, 9)
    scaled = lambda b: b * info.n_visual / OFFICIAL_N_VISUAL  # noqa: E731
    lowest, highest = min(KEEP_LISTS), max(KEEP_LISTS)
    if lists == "interpolated" and not lowest <= reference <= highest:
        raise ValueError(f"SparseVLM interpolates keep lists between its official budgets, {scaled(lowest):g} to "
                         f"{scaled(highest):g} here, got {budget}; pass keep_lists= otherwise")
    if lists == "official" and reference not in KEEP_LISTS:
        allowed = ", ".join(f"{scaled(b):g}" for b in KEEP_LISTS)
        raise ValueError(f"SparseVLM has official keep lists only for budgets {allowed} (or {info.n_visual} for "
                         f"the unpruned model), got {budget}; pass lists='interpolated' for a budget between them "
                         "or keep_lists= otherwise")
    try:
        return SparseVLM(info, layers, None, recycle, seed, reference=int(reference) if reference in KEEP_LISTS
                         else reference)
    except Unreachable as error:
        reachable = reachable_budgets(info, layers, recycle)
        smallest = (f"the smallest reachable budget is {reachable[0]:g}" if reachable else
                    f"none of its budgets ({', '.join(f'{scaled(b):g}' for b in sorted(KEEP_LISTS))}) is reachable")
        ratio = official_mean(reference, recycle) / reference
        raise ValueError(
            f"SparseVLM cannot reach budget {budget:g} on this {info.n_layers}-layer decoder pruning after layers "
            f"{list(layers)}: at {budget:g} its official keep lists feed LLaVA-1.5-7B's layers {ratio:.3f} x the "
            f"budget on average ({ratio * budget:g} of {info.n_visual} visual tokens), but the fewest it can feed "
            f"here is {error.floor:g} (the layers before the first cut see all tokens); {smallest}") from None


METHOD = Method("sparsevlm", "SparseVLM", policy, smallest_budget, replaces_budget=("keep_lists",),
                overhead=lambda **_: Overhead(rows="question", rater_choice=True),
                scoring=lambda **_: {"decoder": "question"},
                # at 192 the clustering noise decides the tiny model's clusters: a test of `seed`
                example_budget=192, second_example=(128, {"recycle": False}))
