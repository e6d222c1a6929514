"""The decoder layer loop with cuts: prefill that physically shortens the sequence, and the decode steps after it.

Sequences are left-padded. After a cut each sample's tokens are re-packed (prefix, kept visual tokens, merged
tokens, suffix) and left-padded again. A sample's visual tokens are one set for the policies, but may lie in
several spans separated by text where the family allows it (`Family.visual_spans`: Qwen3-VL's video frames between
their timestamps): each kept token then stays in its own span, the text between spans stays whole, and the merged
tokens follow the last span's kept tokens (at the centre of that span's positions, where positions are kept).
Every layer caches exactly the tokens it processed, so the KV caches of
different segments have different lengths; a `Segment` remembers, for the layers that share one token set, which
cached rows are real tokens and which position the next token takes, so decode steps stay consistent with
whatever the prefill did. A policy's pruned cache (`Policy.pruned_cache_layers`) is one more cut after the prefill,
on the caches alone: the layers' cached rows are re-packed and left-padded as a cut re-packs the sequence, and they
become a segment of their own, with the positions the prompt's layers continue from. Everything about the host (its
layers, positions, rotary embeddings) comes from its family adapter; positions are opaque tensors [..., B, L] gathered along their last axis.

Side features (`Family.side_features`: Qwen3-VL's DeepStack rows) are vectors that the host adds to the visual
tokens' hidden states after a few early decoder layers. Each visual token carries its own rows through every cut
(a merged token combines its members' rows with the merge's weights, `Selection.weights`), and the rows are added
after those layers to the tokens present then, as the host adds them to all of its visual tokens.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicCache

from ..families.base import Family
from .attention import cached_attention, causal_mask
from .compat import cache_kwargs, cached_keys, keep_cached
from .policy import DecodeStep, DecoderCut, Policy, Selection, TowerSeen
from .trace import Trace


@dataclass
class Segment:
    """Consecutive decoder layers that processed the same tokens."""

    layers: list[int]
    mask: Tensor  # [B, kv] real tokens among the cached rows
    next_pos: Tensor  # [..., B] position of the next token
    visual: list[Tensor]  # per row [n]: the cached rows of its visual tokens
    before_cut: list[Tensor] | None  # per row [n]: each one's index among the previous segment's (-1: made at the cut)
    kept_later: list[Tensor] | None = None  # per row [n] bool: whether each survives every later cut (None: no cut)


@dataclass
class Cached:
    """What the decode steps on a prefill's cache need: its segments and the decode-time KV selection's progress."""

    segments: list[Segment]
    trailing: list[int]  # per row: its visual tokens after a video's frames (`DecoderCut.trailing`)
    state: list[dict]  # per row: the policy's memory between decode steps (`DecodeStep.state`)
    step: int = 0  # decode forwards so far

    def reorder(self, rows: Tensor) -> None:
        """Follow beam search's reorder of the cache's rows (`rows`: the old row of each new one)."""
        for seg in self.segments:
            index = rows.to(seg.mask.device)
            seg.mask, seg.next_pos = seg.mask[index], seg.next_pos[..., index]
            seg.visual = [seg.visual[r] for r in rows.tolist()]
            if seg.kept_later is not None:
                seg.kept_later = [seg.kept_later[r] for r in rows.tolist()]
            if seg.before_cut is not None:
                seg.before_cut = [seg.before_cut[r] for r in rows.tolist()]
        self.trailing = [self.trailing[r] for r in rows.tolist()]
        self.state = [dict(self.state[r]) for r in rows.tolist()]


@dataclass
class Running:
    """The prefill state between two layers."""

    hidden: Tensor  # [B, L, D]
    mask: Tensor  # [B, L] bool, real tokens (left padding)
    pos: Tensor  # [..., B, L] positions
    vis_index: list[Tensor]  # per sample [vis_len]: the sequence indices of its visual tokens, ascending
    vis_len: Tensor  # [B] visual tokens (0: no image)
    origins: list[Tensor]  # per sample [vis_len]: original visual index, or -1 for tokens the method made
    frames: Tensor  # [B] frames of each sample's video (0: an image or none), `Family.video_frames`
    side: list[Tensor] | None = None  # per sample [vis_len, len(side_layers), D]: each visual token's side rows
    side_layers: tuple[int, ...] = ()  # the decoder layers after which the side rows are added, in order
    #: per sample what its decoder cuts see of the tower (`DecoderCut.tower_attention`, `tower_rows`, `tower_crops`),
    #: or None
    tower: list[TowerSeen | None] | None = None
    #: per sample [vis_len]: each visual token's index among the visual tokens before the last cut, -1 for one it made
    before_cut: list[Tensor] | None = None


def start(family: Family, hidden: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None,
          visual: Tensor, frames: Tensor | None = None, side: tuple[tuple[int, ...], Tensor] | None = None,
          tower: list[TowerSeen] | None = None) -> Running:
    """Initial state from the language model's inputs, the image-token mask [B, L], each sample's video frames [B]
    (None: no video), the side features the host gave its language model (`Family.side_features`: layers, rows
    [n visual tokens of the batch, layers, D]) and what the policy sees of the tower for the samples with images, in
    order (`Policy.tower_attention`, `Policy.reads_tower`; None: not asked for)."""
    length = visual.shape[1]
    mask = torch.ones_like(visual) if attention_mask is None else attention_mask.bool()
    n_real = mask.sum(1)
    left_padded = torch.arange(length, device=mask.device) >= (length - n_real).unsqueeze(1)
    if not torch.equal(mask, left_padded):
        raise ValueError("visual-token pruning needs left-padded batches: set tokenizer.padding_side = 'left'")
    vis_len = visual.sum(1)
    vis_index = [row.nonzero()[:, 0] for row in visual]
    if not family.visual_spans and any(len(i) and int(i[-1] - i[0]) + 1 != len(i) for i in vis_index):
        raise ValueError("each sample may hold at most one image, as one contiguous block of image tokens")
    origins = [torch.arange(n, device=visual.device) for n in vis_len.tolist()]
    frames = torch.zeros_like(vis_len) if frames is None else frames.to(vis_len.device)
    run = Running(hidden, mask, family.positions(mask, position_ids), vis_index, vis_len, origins, frames)
    if side is not None:
        run.side_layers, rows = side
        run.side = list(rows.split(vis_len.tolist()))
    if tower is not None:
        given = iter(tower)
        run.tower = [next(given).of_sample(n, f, hidden.device) if n else None
                     for n, f in zip(vis_len.tolist(), frames.tolist())]
    return run


def apply_selections(family: Family, run: Running,
                     selections: dict[int, tuple[Tensor, Tensor | None, Tensor | None, int, Tensor | None]],
                     renumber: bool, slots: dict[int, Tensor] | None = None) -> Running:
    """Rebuild the batch after a cut. selections: sample -> (keep [k], merged [c, D] or None, their weights [c, n]
    over the current visual tokens or None, the entries of keep laid out after the merged tokens, the kept tokens'
    new hidden states [k, D] or None; `Selection`).

    Positions are renumbered contiguously when the policy asks for it (`renumber`) and the family allows it
    (unless `Family.fixed_positions`); otherwise every token keeps its position: a visual token the one of its slot in
    the current visual block (`slots`: sample -> [k + c] slots, -1 for the family's `merged_position`; for a sample
    not in it: `keep`, then -1 for the merged tokens).
    """
    renumber = renumber and not family.fixed_positions
    length = run.hidden.shape[1]
    device = run.hidden.device
    index, sources, positions, visual_at, origins, side, before_cut = [], [], [], [], [], [], []
    for b in range(run.hidden.shape[0]):
        first = length - int(run.mask[b].sum())
        source, pos = run.hidden[b], run.pos.select(-2, b)
        if b not in selections:
            index.append(torch.arange(first, length, device=device))
            visual_at.append(run.vis_index[b] - first)
            origins.append(run.origins[b])
            before_cut.append(torch.arange(len(run.vis_index[b]), device=device))
            side.append(None if run.side is None else run.side[b])
            positions.append(family.renumbered(pos[..., first], len(index[-1])) if renumber else pos[..., first:])
            sources.append(source)
            continue
        keep, merged, weights, trailing, features = selections[b]
        n_merged = 0 if merged is None else merged.shape[0]
        if features is not None:  # kept tokens that absorbed others (FastVID's anchors)
            source = source.index_put((run.vis_index[b][keep],), features.to(source.dtype))
        if n_merged:
            source = torch.cat([source, merged.to(source.dtype)])
        span = _spans(run.vis_index[b])
        slot = slots[b] if slots and b in slots else torch.cat([keep, keep.new_full((n_merged,), -1)])
        # a merged token standing for a slot lies in that slot's span; the others after the last span's kept tokens
        merged_slot = slot[keep.numel():]
        merged_span = torch.where(merged_slot >= 0, span[merged_slot.clamp(min=0)], span[-1:].expand(n_merged))
        order, is_visual = _packed_order(run.vis_index[b], keep, merged_span, trailing, first, length)
        sources.append(source)
        index.append(order)
        visual_at.append(is_visual.nonzero()[:, 0])
        # the visual tokens in their new order: each an entry of (kept..., merged...)
        entry = _visual_entries(order, is_visual, run.vis_index[b], keep, length)
        origins.append(torch.cat([run.origins[b][keep], keep.new_full((n_merged,), -1)])[entry])
        before_cut.append(torch.cat([keep, keep.new_full((n_merged,), -1)])[entry])
        side.append(None if run.side is None else _side_rows(run.side[b], keep, n_merged, weights,
                                                             features is not None)[entry])
        if renumber:
            positions.append(family.renumbered(pos[..., first], len(order)))
        else:
            entry_span = torch.cat([span[keep], merged_span])
            visual = _kept_positions(family, pos[..., run.vis_index[b]], slot, span, entry_span)[..., entry]
            kept_pos = pos[..., order.clamp(max=length - 1)].clone()
            kept_pos[..., is_visual] = visual
            positions.append(kept_pos)

    new_length = max(len(i) for i in index)
    pads = [new_length - len(i) for i in index]
    hidden = torch.stack([
        torch.cat([s.new_zeros(p, s.shape[-1]), s[i]]) for s, i, p in zip(sources, index, pads)
    ])
    mask = torch.arange(new_length, device=device).unsqueeze(0) >= torch.tensor(pads, device=device).unsqueeze(1)
    pos = torch.stack([torch.cat([q.new_zeros(*q.shape[:-1], p), q], -1) for q, p in zip(positions, pads)], -2)
    vis_index = [at + p for at, p in zip(visual_at, pads)]
    counts = torch.tensor([len(at) for at in visual_at], device=device)
    return Running(hidden, mask, pos, vis_index, counts, origins, run.frames, None if run.side is None else side,
                   run.side_layers, run.tower, before_cut)


def _packed_order(vis_index: Tensor, keep: Tensor, merged_span: Tensor, trailing: int, first: int,
                  length: int) -> tuple[Tensor, Tensor]:
    """A sample's rows after a cut, as indices into its rows then its merged tokens (length + j), and which of
    them are visual: its real text tokens in order, each span's kept tokens where the span was (in `keep`'s order
    within a span), the merged tokens after the kept tokens of their span (`merged_span` [c]), then the last
    `trailing` entries of keep."""
    device = vis_index.device
    n_merged = merged_span.numel()
    text = torch.ones(length, dtype=torch.bool, device=device)
    text[:first] = False
    text[vis_index] = False
    text_rows = text.nonzero()[:, 0]
    span = _spans(vis_index)
    starts = vis_index[torch.cat([span.new_ones(1, dtype=torch.bool), span[1:] != span[:-1]])]
    anchor = starts[span]  # each visual token's span start
    step = 2 * (vis_index.numel() + n_merged + 1)  # sub-ranks within an anchor
    kept_rank = torch.arange(keep.numel(), device=device)
    kept_rank = torch.where(kept_rank >= keep.numel() - trailing, kept_rank + keep.numel() + n_merged, kept_rank)
    keys = torch.cat([text_rows * step, anchor[keep] * step + 1 + kept_rank,
                      starts[merged_span] * step + 1 + keep.numel() + torch.arange(n_merged, device=device)])
    rows = torch.cat([text_rows, vis_index[keep], length + torch.arange(n_merged, device=device)])
    is_visual = torch.cat([torch.zeros_like(text_rows, dtype=torch.bool),
                           torch.ones(keep.numel() + n_merged, dtype=torch.bool, device=device)])
    order = keys.argsort(stable=True)
    return rows[order], is_visual[order]


def _visual_entries(order: Tensor, is_visual: Tensor, vis_index: Tensor, keep: Tensor, length: int) -> Tensor:
    """For each visual token of the packed order, its entry among (keep..., merged...)."""
    rows = order[is_visual]
    position_in_keep = torch.full((length,), -1, dtype=torch.long, device=rows.device)
    position_in_keep[vis_index[keep]] = torch.arange(keep.numel(), device=rows.device)
    return torch.where(rows < length, position_in_keep[rows.clamp(max=length - 1)], keep.numel() + rows - length)


def _side_rows(rows: Tensor, keep: Tensor, n_merged: int, weights: Tensor | None, new_kept: bool = False) -> Tensor:
    """The side rows [k + c, ...] of a cut's visual tokens: the kept tokens' own, then each merged token's
    combination of the current tokens' rows `rows` [n, ...] by its weights [c, n]; where the kept tokens have new
    hidden states (`new_kept`), every token's combination by the weights [k + c, n]."""
    if new_kept:
        if weights is None:
            raise ValueError("this method changes kept visual tokens before the model's last side-feature layer "
                             "(Qwen3-VL's DeepStack layers) without stating their weights (`Selection.weights`)")
        return (weights.to(rows.dtype) @ rows.flatten(1)).view(weights.shape[0], *rows.shape[1:])
    if not n_merged:
        return rows[keep]
    if weights is None:
        raise ValueError("this method merges visual tokens before the model's last side-feature layer (Qwen3-VL's "
                         "DeepStack layers) without stating its merge weights (`Selection.weights`): the merged "
                         "tokens would have no side rows. Cut later, or do not merge there")
    merged = (weights.to(rows.dtype) @ rows.flatten(1)).view(n_merged, *rows.shape[1:])
    return torch.cat([rows[keep], merged])


def add_side(run: Running, layer_idx: int) -> Tensor:
    """The hidden states after decoder layer `layer_idx` plus every current visual token's side row of that
    layer (as the host adds them: the same elementwise sum on the visual positions)."""
    column = run.side_layers.index(layer_idx)
    hidden = run.hidden.clone()
    for b, (rows, at) in enumerate(zip(run.side, run.vis_index)):
        if rows.shape[0]:
            hidden[b, at] = hidden[b, at] + rows[:, column].to(hidden.dtype)
    return hidden


def _spans(vis_index: Tensor) -> Tensor:
    """The span [n] of each visual token (0, 1, ...): a span starts where a visual token does not follow another."""
    starts = torch.ones_like(vis_index, dtype=torch.bool)
    starts[1:] = vis_index[1:] != vis_index[:-1] + 1
    return starts.long().cumsum(0) - 1


def _kept_positions(family: Family, block: Tensor, slots: Tensor, span: Tensor, entry_span: Tensor) -> Tensor:
    """Positions [..., k + c] of a cut's visual tokens in a family that keeps positions: each its slot's in the
    visual tokens' positions `block` [..., n], -1 (a merged token) the family's `merged_position` of the tokens of
    the span it lies in (`span` [n] of the tokens, `entry_span` [k + c] of the entries; one span: the image's)."""
    kept = block[..., slots.clamp(min=0)]
    for s in entry_span[slots < 0].unique().tolist():
        kept[..., (slots < 0) & (entry_span == s)] = family.merged_position(block[..., span == s]).unsqueeze(-1)
    return kept


def _groups(family: Family, run: Running, layer_idx: int, layers: nn.ModuleList, prev_hidden: Tensor | None,
            rope: tuple[Tensor, Tensor], original_visual: Tensor, scratch: dict, final_norm: nn.Module):
    """The samples with an image, grouped by current and original visual-token counts and video frames, as policies
    see them."""
    keys = {k for k in zip(run.vis_len.tolist(), original_visual.tolist(), run.frames.tolist()) if k[0]}
    for n, n0, f in sorted(keys):
        rows = ((run.vis_len == n) & (original_visual == n0) & (run.frames == f)).nonzero()[:, 0]
        tower = None if run.tower is None else [run.tower[b] for b in rows.tolist()]
        yield DecoderCut(
            layer_idx=layer_idx, layers=layers, hidden=run.hidden[rows],
            prev_hidden=None if prev_hidden is None else prev_hidden[rows], mask=run.mask[rows],
            cos=rope[0][rows], sin=rope[1][rows],
            visual=torch.stack([run.vis_index[b] for b in rows.tolist()]),
            original_visual=n0, samples=rows.tolist(), scratch=scratch, rotate=family.rotate,
            final_norm=final_norm, frames=f, trailing=family.video_trailing if f else 0, side_rows=run.side is not None,
            **{f"tower_{part}": None if tower is None or getattr(tower[0], part) is None else
               torch.stack([getattr(seen, part) for seen in tower]) for part in ("attention", "rows", "crops")},
        )


def _cut(family: Family, policy: Policy, run: Running, groups, trace: Trace, layer_idx: int) -> Running:
    """Ask the policy for a selection per group, record it, and rebuild the batch."""
    selections, slots = {}, {}
    for cut in groups:
        sel: Selection = policy.select_decoder(cut)
        for g, b in enumerate(cut.samples):
            keep, merged, weights, sample_slots = sel.of_sample(g)
            selections[b] = (keep, merged, weights, sel.trailing, None if sel.features is None else sel.features[g])
            if sample_slots is not None:
                slots[b] = sample_slots
    trace.add_cut(f"layer {layer_idx}", [run.origins[b][selections[b][0]] if b in selections else run.origins[b][:0]
                                         for b in range(run.hidden.shape[0])], selections, slots)
    return apply_selections(family, run, selections, policy.renumbers_at(layer_idx), slots)


def prefill(family: Family, lm: nn.Module, policy: Policy, run: Running, cache: DynamicCache | None, trace: Trace,
            ) -> tuple[Tensor, Cached]:
    """Run every decoder layer, cutting where the policy says. Returns the final hidden states and what the decode
    steps need. A policy's replayed decode-time selections (`Policy.replayed_steps`) mask, at its decode layers, the
    visual keys each of the last tokens did not attend to when it was decoded, and at its pruned cache layers those
    the caches left out (`Trace.pruned_cache`). With a cache, the pruned cache layers' caches are cut after the last
    layer (`_pruned`)."""
    layers = family.decoder_layers(lm)
    cut_layers = set(policy.cut_layers)
    decode_layers = _check_decode_layers(policy, len(layers))
    replayed_layers = decode_layers | _check_pruned_cache(policy, len(layers))
    history = policy.replayed_steps(run.hidden.shape[1]) if replayed_layers else []
    trace.prompt_length = run.hidden.shape[1]
    original_visual = run.vis_len.clone()
    scratch: dict = {}
    segments: list[Segment] = []
    rope = family.rotary(lm, run.hidden, run.pos)
    prev_hidden = None
    for cut in _groups(family, run, 0, layers, None, rope, original_visual, scratch, family.final_norm(lm)):
        policy.prepare(cut)
    for i, layer in enumerate(layers):
        cut_here = i in cut_layers and bool(run.vis_len.any())
        if cut_here:
            groups = _groups(family, run, i, layers, prev_hidden, rope, original_visual, scratch,
                             family.final_norm(lm))
            run = _cut(family, policy, run, groups, trace, i)
        elif i in cut_layers:  # no visual token left: recorded as the batch records a sample that has none left
            trace.add_cut(f"layer {i}", [origins[:0] for origins in run.origins], {}, {})
        if cut_here or not segments:
            rope = family.rotary(lm, run.hidden, run.pos)
            mask4d = causal_mask(lm.config, run.mask, run.hidden.shape[1], run.hidden.dtype)
            blocked = replayed = replayed_rope = None
            segments.append(Segment([], run.mask, family.next_position(run.pos), list(run.vis_index),
                                    run.before_cut if cut_here else None))
        segments[-1].layers.append(i)
        trace.add_layer(run.vis_len)
        prev_hidden = run.hidden
        layer_mask, layer_rope = mask4d, rope
        if history and i in replayed_layers:  # the generated tokens attend as at their decode steps
            if blocked is None:  # this segment's first decode (or pruned cache) layer
                blocked = _blocked([step[i] for step in history], run)
                replayed = causal_mask(lm.config, run.mask, run.hidden.shape[1], run.hidden.dtype, blocked=blocked)
                replayed_rope = rope
                if _evicts(family, policy) and i in decode_layers:  # and at the positions they took there
                    shifted = run.pos.clone()
                    shifted[..., -len(history):] -= blocked.sum(-1).to(shifted.dtype)
                    replayed_rope = family.rotary(lm, run.hidden, shifted)
            layer_mask, layer_rope = replayed, replayed_rope
        if i in policy.bidirectional_layers:  # this prefill layer attends over every real token (no causal mask)
            layer_mask = causal_mask(lm.config, run.mask, run.hidden.shape[1], run.hidden.dtype, causal=False,
                                     blocked=blocked if history and i in replayed_layers else None)
        run.hidden = layer(run.hidden, attention_mask=layer_mask, position_embeddings=layer_rope,
                           use_cache=cache is not None, **cache_kwargs(cache))
        if run.side is not None and i in run.side_layers:
            run.hidden = add_side(run, i)
            if i == run.side_layers[-1]:
                run.side = None  # added for the last time: later cuts need no side rows (nor merge weights)
    _survivals(segments)
    pruned = set(policy.pruned_cache_layers)
    for seg in segments:  # what each pruned cache keeps, keyed as the decode-time selections are (`Replay`)
        if seg.kept_later is not None and pruned & set(seg.layers):
            trace.pruned_cache[min(pruned & set(seg.layers))] = seg.kept_later
    if cache is not None and trace.pruned_cache:
        segments = _pruned(segments, pruned, cache)
    trailing = [family.video_trailing if f else 0 for f in run.frames.tolist()]
    return family.final_norm(lm)(run.hidden), Cached(segments, trailing, [{} for _ in trailing])


def _pruned(segments: list[Segment], pruned: set[int], cache: DynamicCache) -> list[Segment]:
    """The segments once the caches of the `pruned` layers keep only the visual tokens each row still caches after
    every later cut (`Policy.pruned_cache_layers`): a segment splits into runs of pruned and other layers, and a
    pruned run's cache keeps each row's real tokens but the visual ones no later cut keeps, in order, left-padded
    to the longest row's count (its mask marks the padding), as a cut re-packs the sequence. Positions go on from
    the prompt's (`next_pos` unchanged)."""
    out = []
    for seg in segments:
        for prunes, run in itertools.groupby(seg.layers, key=lambda i: i in pruned):
            part = replace(seg, layers=list(run))
            out.append(_compacted(part, cache) if prunes and seg.kept_later is not None else part)
    return out


def _compacted(seg: Segment, cache: DynamicCache) -> Segment:
    """`seg` with its layers' caches cut to the real tokens and the visual tokens that survive every later cut."""
    kv = seg.mask.shape[1]
    kept = seg.mask.clone()
    for b, (at, alive) in enumerate(zip(seg.visual, seg.kept_later)):
        kept[b, at] = kept[b, at] & alive  # indices, not a boolean index: no read on the host
    counts = kept.sum(1, keepdim=True)
    length = int(counts.max())
    ranked = torch.where(kept, torch.arange(kv, device=kept.device), -1).sort(dim=1)  # the kept rows last, in order
    rows, mask = ranked.indices[:, kv - length:], ranked.values[:, kv - length:] >= 0
    place = kept.long().cumsum(1) - 1 + (length - counts)  # each kept row's place in the compacted cache
    visual = [place[b, at[alive]] for b, (at, alive) in enumerate(zip(seg.visual, seg.kept_later))]
    for i in seg.layers:
        keep_cached(cache, i, rows)
    return Segment(seg.layers, mask, seg.next_pos, visual, None, [torch.ones_like(at, dtype=torch.bool)
                                                                  for at in visual])


def _survivals(segments: list[Segment]) -> None:
    """Set each segment's `kept_later`: whether each of its visual tokens is still cached after every later cut."""
    alive = None
    for seg, after in zip(reversed(segments[:-1]), reversed(segments[1:])):
        alive = [torch.ones(len(at), dtype=torch.bool, device=at.device) for at in after.visual] if alive is None \
            else alive
        # scattered to a spare last slot where a token was made at the cut: no boolean index, no read on the host
        seg.kept_later = alive = [
            torch.zeros(len(at) + 1, dtype=torch.bool, device=at.device).scatter_(
                0, torch.where(source >= 0, source, len(at)), survives)[:-1]
            for at, source, survives in zip(seg.visual, after.before_cut, alive)]


def _check_decode_layers(policy: Policy, n_layers: int) -> set[int]:
    """The policy's decode layers, checked: existing layers, none straddling a cut, its scoring layer before them."""
    decode_layers = set(policy.decode_layers)
    if not decode_layers:
        return decode_layers
    scoring = policy.decode_scoring_layer
    span = decode_layers | ({scoring} if scoring is not None else set())
    if min(span) < 0 or max(span) >= n_layers:
        raise ValueError(f"{policy.name}'s decode-time KV selection names layers {sorted(span)}, and this decoder has "
                         f"{n_layers}")
    if scoring is not None and scoring >= min(decode_layers):
        raise ValueError(f"{policy.name} scores its decode-time KV selection at layer {scoring}: it must come before "
                         f"the layers it applies to ({min(decode_layers)} on)")
    if scoring is not None and any(min(span) < cut <= max(span) for cut in policy.cut_layers):
        raise NotImplementedError(f"{policy.name} scores its decode-time KV selection at layer {scoring} for layers "
                                  f"up to {max(span)}, across a cut ({sorted(policy.cut_layers)}): a scoring layer's "
                                  "rows line up with the tokens of its own segment only")
    return decode_layers


def _check_pruned_cache(policy: Policy, n_layers: int) -> set[int]:
    """The policy's pruned cache layers, checked: existing layers, in no segment of its decode-time KV selection."""
    pruned = set(policy.pruned_cache_layers)
    if not pruned:
        return pruned
    if min(pruned) < 0 or max(pruned) >= n_layers:
        raise ValueError(f"{policy.name} prunes the caches of layers {sorted(pruned)}, and this decoder has {n_layers}")
    selecting = set(policy.decode_layers) | ({policy.decode_scoring_layer} - {None})
    segment = lambda i: sum(0 < cut <= i for cut in policy.cut_layers)  # noqa: E731 (the prefill segment of layer i)
    if {segment(i) for i in pruned} & {segment(i) for i in selecting}:
        raise NotImplementedError(f"{policy.name} prunes the caches of layers {sorted(pruned)} and selects among the "
                                  f"cached tokens of layers {sorted(selecting)} between the same two cuts: a segment "
                                  "does one or the other")
    return pruned


def _evicts(family: Family, policy: Policy) -> bool:
    """Whether the keys a decode-time selection leaves out shift the decode positions (`Policy.decode_evicts`)."""
    return policy.decode_evicts and policy.renumber_positions and not family.fixed_positions


def _evicted(selection: list[Tensor | None], like: Tensor) -> Tensor:
    """[B]: how many cached visual keys each row's decode-time selection left out (as `like`'s dtype and device)."""
    return torch.stack([like.new_zeros(()) if chosen is None else (~chosen).sum().to(like) for chosen in selection])


def _blocked(history: list[list[Tensor | None]], run: Running) -> Tensor:
    """[B, r, L]: the visual keys that each of the last r tokens did not attend to at its decode step."""
    batch, length = run.hidden.shape[:2]
    blocked = torch.zeros(batch, len(history), length, dtype=torch.bool, device=run.hidden.device)
    for r, step in enumerate(history):
        for b, selected in enumerate(step):
            if selected is None:
                continue
            if selected.shape[0] != len(run.vis_index[b]):
                raise RuntimeError("the replayed decode-time selections do not match this prefill's visual tokens")
            blocked[b, r, run.vis_index[b][~selected.to(blocked.device)]] = True
    return blocked


def decode(family: Family, lm: nn.Module, policy: Policy, hidden: Tensor, attention_mask: Tensor | None,
           cache: DynamicCache, cached: Cached, trace: Trace) -> Tensor:
    """One decode forward of q new tokens after a pruned prefill: per segment, its own positions and mask; at the
    policy's decode layers, only the visual keys its decode-time selection chose for this step and segment (recorded
    in `trace`, with the visual keys each layer attended to, where a selection or a pruned cache made them fewer
    than the prefill processed)."""
    batch, q_len, _ = hidden.shape
    layers = family.decoder_layers(lm)
    decode_layers = set(policy.decode_layers)
    new = torch.ones(batch, q_len, dtype=torch.bool, device=hidden.device)
    if attention_mask is not None:
        new = attention_mask[:, -q_len:].bool()
    chosen: dict[int, list[Tensor | None]] = {}  # a segment's first decode layer -> its selection of this step
    cached_visual = []  # per layer: each row's cached visual tokens, and the selection its keys follow
    for seg in cached.segments:
        if cache.get_seq_length(seg.layers[0]) != seg.mask.shape[1]:
            raise RuntimeError("the KV cache no longer matches the pruned prefill (reordered or reused cache?); "
                               "only greedy/sampling decoding on the cache of the last prefill is supported")
        kv_mask = torch.cat([seg.mask, new], dim=1)
        rope = family.rotary(lm, hidden, family.continued(seg.next_pos, q_len))
        mask4d = causal_mask(lm.config, kv_mask, q_len, hidden.dtype)
        own = [i for i in seg.layers if i in decode_layers]
        selection, selected_mask, selected_rope = None, None, rope
        for i in seg.layers:
            if own and i == own[0]:  # chosen at the scoring layer, before, or now
                selection = chosen[i] = selection or _select(policy, cached, seg, own, None)
                selected_mask = causal_mask(lm.config, _attended(kv_mask, seg.visual, selection), q_len, hidden.dtype)
                if _evicts(family, policy):  # the positions that follow the cache without the keys left out
                    evicted = _evicted(selection, seg.next_pos)
                    selected_rope = family.rotary(lm, hidden, family.continued(seg.next_pos - evicted, q_len))
            cached_visual.append(([len(at) for at in seg.visual], selection if i in decode_layers else None))
            entering = hidden
            hidden = layers[i](hidden, attention_mask=selected_mask if i in decode_layers else mask4d,
                               position_embeddings=selected_rope if i in decode_layers else rope, use_cache=True,
                               **cache_kwargs(cache))
            if i == policy.decode_scoring_layer:
                rows = cached_attention(layers[i], entering, *rope, cached_keys(cache, i), kv_mask, family.rotate)
                selection = _select(policy, cached, seg, own, rows)
        seg.mask, seg.next_pos = kv_mask, seg.next_pos + q_len
    if decode_layers or policy.pruned_cache_layers:  # the visual keys each layer attended to, read once a step
        picked = [c for sel in chosen.values() for c in sel if c is not None]
        sums = iter(torch.stack([c.sum() for c in picked] or [hidden.new_zeros(())]).tolist())
        sizes = {id(c): int(next(sums)) for c in picked}
        trace.add_decode_step(chosen, [[counts[b] if sel is None or sel[b] is None else sizes[id(sel[b])]
                                        for counts, sel in cached_visual] for b in range(batch)])
        cached.step += 1
    return family.final_norm(lm)(hidden)


def _select(policy: Policy, cached: Cached, seg: Segment, layers: list[int], attention: Tensor | None,
            ) -> list[Tensor | None]:
    """The policy's decode-time selection for this step at `layers` of `seg`, checked."""
    step = DecodeStep(cached.step, tuple(layers), seg.visual, seg.kept_later or [None] * len(seg.visual),
                      cached.trailing, cached.state, attention)
    selection = policy.select_cached(step)
    if len(selection) != len(seg.visual) or any(
            s is not None and (s.dtype != torch.bool or s.shape != at.shape) for s, at in zip(selection, seg.visual)):
        raise ValueError(f"{policy.name}.select_cached must give each row a bool over its cached visual tokens "
                         "(or None)")
    return selection


def _attended(kv_mask: Tensor, visual: list[Tensor], selection: list[Tensor | None]) -> Tensor:
    """The key mask [B, kv] without the visual keys a decode-time selection left out."""
    allowed = kv_mask.clone()
    for b, (at, chosen) in enumerate(zip(visual, selection)):
        if chosen is not None:
            allowed[b, at] = allowed[b, at] & chosen  # indices, not a boolean index: no read on the host
    return allowed
