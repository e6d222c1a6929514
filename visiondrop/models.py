"""What the policies need to know about a supported model, read from its config."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

SUPPORTED = ("LlavaForConditionalGeneration",)


@dataclass(frozen=True)
class ModelInfo:
    n_visual: int  # visual tokens per image entering the decoder, unpruned
    n_layers: int  # decoder layers
    vision_layer: int  # 0-based vision-tower layer whose output LLaVA projects
    cls_kept: bool  # whether the model's own visual tokens include CLS

    @classmethod
    def of(cls, model: nn.Module) -> "ModelInfo":
        kind = type(model).__name__
        if kind not in SUPPORTED:
            raise TypeError(f"unsupported model type {kind}; supported: {', '.join(SUPPORTED)}")
        return cls.from_config(model.config)

    @classmethod
    def from_config(cls, config) -> "ModelInfo":
        vision = config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        cls_kept = config.vision_feature_select_strategy == "full"
        layer = config.vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError("models that concatenate several vision_feature_layers are not supported")
        return cls(
            n_visual=patches + int(cls_kept),
            n_layers=config.text_config.num_hidden_layers,
            vision_layer=layer % (vision.num_hidden_layers + 1) - 1,
            cls_kept=cls_kept,
        )

    def relative_layer(self, layer: int, reference_layers: int = 32) -> int:
        """Map a cut layer given for a 32-layer decoder (LLaVA-7B) onto this decoder by relative depth."""
        return round(layer * self.n_layers / reference_layers)
