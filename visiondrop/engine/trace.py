"""What the last forward pass did to the visual tokens, per sample."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Trace:
    """Per sample: visual tokens entering each decoder layer, and the original indices kept at each cut.

    Original indices count from 0 in the model's own visual-token order (for llava-hf 1.5: the 576 patches in
    raster order). Tokens that are not original visual tokens (a kept CLS token, merged tokens) are not listed
    in `kept` but are counted in `tokens_per_layer`.
    """

    cuts: list[str] = field(default_factory=list)
    tokens_per_layer: list[list[int]] = field(default_factory=list)
    kept: list[list[Tensor]] = field(default_factory=list)
    #: per decoder cut, what the policy returned: sample -> (keep, merged), and sample -> slots where it gave them;
    #: `Replay` plays it back.
    selections: list[dict] = field(default_factory=list)
    slots: list[dict] = field(default_factory=list)
    #: the prefill's input length (left-padded rows); per decode step after it, the decode-time KV selection of each
    #: segment with decode layers, keyed by its first (`Policy.select_cached`, per sample: a bool over its cached
    #: visual tokens, None: all of them), which `Replay` plays back; and per sample the visual tokens each decoder
    #: layer attended to (kept in its cache and selected)
    prompt_length: int = 0
    decode_steps: list[dict[int, list[Tensor | None]]] = field(default_factory=list)
    decode_tokens: list[list[list[int]]] = field(default_factory=list)
    #: what the pruned caches keep (`Policy.pruned_cache_layers`), keyed by the first pruned layer of each prefill
    #: segment: per sample a bool over the visual tokens the segment processed (True: still in its layers' caches)
    pruned_cache: dict[int, list[Tensor]] = field(default_factory=dict)

    @classmethod
    def start(cls, batch_size: int) -> "Trace":
        return cls(tokens_per_layer=[[] for _ in range(batch_size)], kept=[[] for _ in range(batch_size)])

    def add_cut(self, name: str, kept: list[Tensor], selections: dict | None = None, slots: dict | None = None,
                ) -> None:
        """kept: one tensor of original indices (-1 for non-original tokens) per sample."""
        self.cuts.append(name)
        if selections is not None:
            self.selections.append(selections)
            self.slots.append(slots or {})
        for sample, k in zip(self.kept, kept):
            sample.append(k[k >= 0].cpu())

    def add_layer(self, visual_counts: Tensor) -> None:
        for sample, n in zip(self.tokens_per_layer, visual_counts.tolist()):
            sample.append(n)

    def add_decode_step(self, selection: dict[int, list[Tensor | None]], attended: list[list[int]]) -> None:
        self.decode_steps.append(selection)
        self.decode_tokens.append(attended)

    @property
    def mean_tokens(self) -> list[float]:
        """The measured "# Tokens" of each sample: mean visual tokens over the decoder layers."""
        return [sum(t) / len(t) if t else 0.0 for t in self.tokens_per_layer]

    def to_dict(self) -> dict:
        return {
            "cuts": self.cuts,
            "tokens_per_layer": self.tokens_per_layer,
            "kept": [[k.tolist() for k in sample] for sample in self.kept],
            **({"decode_tokens_per_layer": self.decode_tokens} if self.decode_tokens else {}),
        }


def empty_index(device: torch.device | None = None) -> Tensor:
    return torch.empty(0, dtype=torch.long, device=device)
