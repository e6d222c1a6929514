"""What the policies need to know about a supported model, read from its config."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

SUPPORTED = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration")


@dataclass(frozen=True)
class ModelInfo:
    """n_visual is the nominal visual-token count of one image: the budgets' reference ("# Tokens" out of it).

    LLaVA-1.5: 576, every image. LLaVA-NeXT (anyres): `crops` crops of `n_visual / crops` patches, 2880 for the
    v1.6 grids; a sample's actual count varies with its grid, and policies scale their counts to it.
    """

    n_visual: int
    n_layers: int  # decoder layers
    vision_layer: int  # 0-based vision-tower layer whose output LLaVA projects
    cls_kept: bool  # whether the model's own visual tokens include CLS
    crops: int = 1  # vision-tower crops per image, nominal

    @classmethod
    def of(cls, model: nn.Module) -> "ModelInfo":
        kind = type(model).__name__
        if kind not in SUPPORTED:
            raise TypeError(f"unsupported model type {kind}; supported: {', '.join(SUPPORTED)}")
        return cls.from_config(model.config)

    @classmethod
    def from_config(cls, config) -> "ModelInfo":
        vision = config.vision_config
        cls_kept = config.vision_feature_select_strategy == "full"
        layer = config.vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError("models that concatenate several vision_feature_layers are not supported")
        per_crop = (vision.image_size // vision.patch_size) ** 2 + int(cls_kept)
        crops = 1
        if getattr(config, "image_grid_pinpoints", None):  # anyres: the base image plus the largest grid
            crops += max(h * w for h, w in config.image_grid_pinpoints) // vision.image_size ** 2
        return cls(n_visual=per_crop * crops, n_layers=config.text_config.num_hidden_layers,
                   vision_layer=layer % (vision.num_hidden_layers + 1) - 1, cls_kept=cls_kept, crops=crops)

    @property
    def per_crop(self) -> int:
        return self.n_visual // self.crops

    def relative_layers(self, layers: Sequence[int], what: str, lowest: int = 1, spare: int = 0,
                        reference_layers: int = 32) -> tuple[int, ...]:
        """Map increasing cut layers given for a 32-layer decoder (LLaVA-7B) onto this decoder by relative depth.

        `what` names the option in errors; a method cuts from layer `lowest` on and leaves its last `spare` layers
        uncut. Each layer goes to round(layer * n_layers / 32); where a shallow decoder rounds neighbours together
        (or below `lowest`), a cut moves to the next free layer, so the cuts stay distinct and ordered ([2, 8, 16]
        -> [1, 2, 3] on 4 layers). The identity on 32 layers. Every method's schedule goes through this; the
        mapped layers are in its `describe()` and in the run's trace.
        """
        top = reference_layers - 1 - spare
        if not layers or list(layers) != sorted(set(layers)) or not all(lowest <= layer <= top for layer in layers):
            raise ValueError(f"{what} must be one or more increasing layers from {lowest} to {top} (of a "
                             f"{reference_layers}-layer decoder, mapped by relative depth), got {list(layers)}")
        mapped, previous = [], lowest - 1
        for layer in layers:
            previous = max(round(layer * self.n_layers / reference_layers), previous + 1)
            mapped.append(previous)
        if mapped and mapped[-1] > self.n_layers - 1 - spare:
            raise ValueError(f"{what} {list(layers)} do not fit this {self.n_layers}-layer decoder: {len(mapped)} "
                             f"distinct cuts from layer {lowest} on need {lowest + len(mapped) + spare} layers")
        return tuple(mapped)
