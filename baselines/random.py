"""Random control: keep `budget` visual tokens chosen uniformly at random, before the first decoder layer.

The control every scored method should beat. It drops where an encoder-side method such as VisionZip does, so
the decoder sees exactly `budget` visual tokens in every layer (the budget is the mean over the decoder layers,
methods.md 0.1): one cut before decoder layer 0, kept tokens in their original order, positions renumbered
contiguously (as if the dropped tokens had never been there).

The kept set depends only on the seed, the number of visual tokens and the budget: a CPU `torch.Generator`
seeded with option `seed` (default 0) draws it afresh for every forward, so it ignores the text, is the same for
every sample of a batch, and is the same on every device.
"""
from __future__ import annotations

import torch
from torch import Tensor

from visiondrop.engine import DecoderCut, Policy, Selection
from visiondrop.methods import Method
from visiondrop.methods.shared import whole_count
from visiondrop.core import ModelInfo


def random_keep(n: int, keep: int, seed: int) -> Tensor:
    """`keep` distinct indices of [0, n), uniformly at random for `seed`, ascending."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=generator)[:keep].sort().values


class RandomDrop(Policy):
    name = "random"
    cut_layers = (0,)

    def __init__(self, info: ModelInfo, keep: int, seed: int):
        self.info, self.keep, self.seed = info, keep, seed

    def select_decoder(self, cut: DecoderCut) -> Selection:
        index = random_keep(cut.n_visual, cut.scaled(self.keep, self.info.n_visual), self.seed).to(cut.visual.device)
        return Selection(index.expand(len(cut.samples), -1))

    def describe(self) -> dict:
        return {"method": self.name, "keep": self.keep, "seed": self.seed, "layers": list(self.cut_layers),
                "equivalent_tokens": self.keep}


def policy(info: ModelInfo, budget: float | None = None, seed: int = 0) -> Policy:
    """Random dropping to `budget` visual tokens in every decoder layer."""
    if budget is None:
        raise ValueError("the random control needs a budget")
    return RandomDrop(info, whole_count(budget, info, "the random control"), seed)


METHOD = Method("random", "Random", policy, smallest_budget=lambda info: 1,
                scoring=lambda **_: {"decoder": "random"}, second_example=(128, {"seed": 1}))
