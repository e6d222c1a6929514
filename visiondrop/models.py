"""What the policies need to know about a supported model, read from its config."""
from __future__ import annotations

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

    def relative_layer(self, layer: int, reference_layers: int = 32) -> int:
        """Map a cut layer given for a 32-layer decoder (LLaVA-7B) onto this decoder by relative depth."""
        return round(layer * self.n_layers / reference_layers)
