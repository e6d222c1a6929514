"""Play back the decoder-cut decisions of a recorded forward pass, whatever the text that follows.

Text-guided methods re-score when the prompt grows (as it does in generation without a KV cache); replaying the
prefill's selections holds the kept sets fixed, which is what the cached decode steps see. Also handy for
analysis: apply one run's selections to another input with the same image.

A decode-time KV selection (`Policy.decode_layers`) chooses anew at each decode step. Replaying it means: in a
prefill of the recorded prompt followed by the tokens generated from it, each generated token attends, at the
decode layers, to the visual tokens its own decode step chose (and to every other token), as it did with the cache;
cached decode steps of a replay take the recorded choices too. Likewise a pruned cache (`Policy.pruned_cache_layers`):
the generated tokens attend, at its layers, to the visual tokens the cache kept (`Trace.pruned_cache`).
"""
from __future__ import annotations

import torch

from ..core import EncoderView
from .policy import DecodeStep, DecoderCut, Policy, Selection
from .trace import Trace


class Replay(Policy):
    def __init__(self, policy: Policy, trace: Trace):
        self.name = f"replay({policy.name})"
        self.renumber_positions = policy.renumber_positions
        self.renumbers_at = policy.renumbers_at
        self.encoder_layer = policy.encoder_layer
        self.cut_layers = policy.cut_layers
        self.bidirectional_layers = policy.bidirectional_layers
        self.native_layout = policy.native_layout
        self.eager_encoder = policy.eager_encoder
        self.scan_layers = policy.scan_layers
        self.received_attention = policy.received_attention
        self.merges_in_tower = policy.merges_in_tower
        self.merge_in_tower = policy.merge_in_tower
        self.merges_at_layer_output = policy.merges_at_layer_output
        self.decode_layers = policy.decode_layers
        self.decode_evicts = policy.decode_evicts
        self.pruned_cache_layers = policy.pruned_cache_layers
        self.decode_scoring_layer = None  # the recorded selections need no attention rows
        self._policy = policy
        self._prompt_length, self._decode_steps = trace.prompt_length, trace.decode_steps
        self._pruned_cache = trace.pruned_cache
        self._selections = dict(zip(policy.cut_layers, trace.selections))
        self._slots = dict(zip(policy.cut_layers, trace.slots))

    def select_encoder(self, view: EncoderView) -> Selection:
        # the prompt never reaches the vision tower (CDPruner's instruction is given apart, and stays)
        return self._policy.select_encoder(view)

    def select_decoder(self, cut: DecoderCut) -> Selection:
        recorded = [self._selections[cut.layer_idx][b] for b in cut.samples]
        keep, merged, weights, trailing, features = zip(*recorded)
        slots = [self._slots[cut.layer_idx][b] for b in cut.samples if b in self._slots[cut.layer_idx]]
        return Selection(_rows(keep), None if merged[0] is None else _rows(merged),
                         weights=None if weights[0] is None else _rows(weights),
                         features=None if features[0] is None else _rows(features),
                         slots=_rows(slots) if slots else None, trailing=trailing[0])

    def select_cached(self, step: DecodeStep) -> list[torch.Tensor | None]:
        if step.step >= len(self._decode_steps):
            raise RuntimeError(f"{self.name} recorded {len(self._decode_steps)} decode steps: it cannot replay step "
                               f"{step.step}")
        return self._decode_steps[step.step][step.layers[0]]

    def replayed_steps(self, length: int) -> list[dict[int, list[torch.Tensor | None]]]:
        generated = length - self._prompt_length
        if generated > len(self._decode_steps):
            raise RuntimeError(f"{self.name} recorded {len(self._decode_steps)} decode steps: it cannot replay a "
                               f"prefill that ends with {generated} generated tokens")
        return [{**self._pruned_cache, **step} for step in self._decode_steps[:max(generated, 0)]]


def _rows(rows: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    """The samples' recorded rows, stacked where they have one shape (a Selection takes ragged ones as a list)."""
    return torch.stack(rows) if len({r.shape for r in rows}) == 1 else rows
