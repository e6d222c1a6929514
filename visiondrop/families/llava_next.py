"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): LLaVA-1.5 plus anyres crops and image-newline tokens.

An image is a base crop plus a grid of crops chosen from `image_grid_pinpoints`; transformers packs the grid's
patches without its padding and closes each grid row with the learned image-newline token. The encoder cut
reduces crop by crop and arranges the result as the official VisionDrop/VisionZip code does (`arrange_anyres`).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import (
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
)
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, image_size_to_num_patches

from .base import Images
from ..core import Checkpoint
from .llava import LLAVA_7B_SHAPE, LLAVA_HF_IDS, Llava

GRID_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # llava-v1.6, (height, width)
EXAMPLE_IMAGE = (672, 672)  # the benchmark's image: fills the 2x2 grid exactly, so base + 4 crops and no unpadding


class LlavaNext(Llava):
    model_class = LlavaNextForConditionalGeneration
    sample_sizes = ((672, 336), (500, 400))  # 3 crops (1752 tokens) and 5 crops (2438)
    nominal_size = EXAMPLE_IMAGE
    #: counted as the paper counts it: 49 tokens beyond the text and the 2880 visual ones (efficiency/flops.py)
    checkpoints = (Checkpoint("llava-next-7b", "llava-hf/llava-v1.6-vicuna-7b-hf", "llava_next", LLAVA_7B_SHAPE,
                              LLAVA_HF_IDS, 1e-5, budget=320, paper="LLaVA-NeXT-7B", extra_tokens=49),)
    config_class = LlavaNextConfig
    image_aspect_ratio = "none"  # the processor's anyres handles any aspect ratio
    image_feature_args = ("image_sizes", "vision_feature_layer", "vision_feature_select_strategy")

    def nominal_crops(self, config: Any) -> int:
        """The base crop plus the largest anyres grid."""
        side = config.vision_config.image_size
        return 1 + max((h // side) * (w // side) for h, w in config.image_grid_pinpoints)

    def images(self, model: nn.Module, pixel_values: Tensor, args: tuple, kwargs: dict[str, Any]) -> Images:
        images = super().images(model, pixel_values, args, kwargs)
        strategy = "default" if self.tower_cls else "full"  # the visual tokens are the patches, CLS dropped
        if images.select_strategy != strategy:
            raise NotImplementedError(f"encoder-side pruning of {type(self).__name__} supports "
                                      f"vision_feature_select_strategy {strategy!r} only")
        config = model.config
        images.crops = [image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
                        for size in images.sizes]
        if pixel_values.dim() == 5:  # padded to the most crops of the batch
            images.pixels = torch.cat([pv[:n] for pv, n in zip(pixel_values, images.crops)])
        return images

    def valid_tokens(self, model: nn.Module, images: Images, tokens: int) -> Tensor:
        """Spend the budget on patches that survive unpadding (when the policy keeps transformers' layout)."""
        llava = self.multimodal(model)
        return torch.cat([_unpadded(llava, n, size, tokens) for n, size in zip(images.crops, images.sizes)])

    def example_image(self, config: Any, generator: torch.Generator,
                      size: tuple[int, int] | None = None) -> tuple[int, dict[str, Tensor]]:
        """The base crop's tokens plus the grid's, each grid row closed by an image-newline token. `size` must
        be one of the config's grid pinpoints (default EXAMPLE_IMAGE), so that it fills its grid exactly."""
        size = tuple(size or EXAMPLE_IMAGE)
        vision = config.vision_config
        side, patches = vision.image_size, vision.image_size // vision.patch_size
        rows, cols = get_anyres_image_grid_shape(list(size), config.image_grid_pinpoints, side)
        if (rows * side, cols * side) != size:
            raise ValueError(f"the example image must fill its anyres grid exactly (no unpadding counted): "
                             f"{size} is not among the grid pinpoints {config.image_grid_pinpoints}")
        tokens = patches * patches + int(config.vision_feature_select_strategy == "full") \
            + rows * patches * (cols * patches + 1)
        pixels = torch.randn(1, 1 + rows * cols, 3, side, side, generator=generator)
        return tokens, {"pixel_values": pixels, "image_sizes": torch.tensor([list(size)])}

    def lay_out(self, model: nn.Module, images: Images, image: int, feats: Tensor, keep: Tensor, n_merged: int,
                tokens: int, native_layout: bool) -> tuple[Tensor, Tensor, int]:
        return arrange_anyres(self.multimodal(model), feats, keep, n_merged, images.sizes[image], native_layout)

    def patch_cells(self, model: nn.Module, image_size: Tensor | None,
                    modality: str = "image") -> Tensor:
        """The base crop, then the grid's crops in raster order (crop 1 top left), as transformers packs them:
        patches cut away by unpadding are absent, image-newline tokens are no patch."""
        if image_size is None:
            raise ValueError("LLaVA-NeXT's visual tokens depend on the image size: pass the processor's image_sizes")
        if model.config.vision_feature_select_strategy != "default":
            raise NotImplementedError("LLaVA-NeXT patch cells support vision_feature_select_strategy 'default' only")
        config = model.config
        _, side = self.patch_grid(config)
        size = torch.as_tensor(image_size).cpu()
        crops = image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
        position, length, _ = packed_positions(self.multimodal(model), crops, size, side * side)
        index = torch.arange(crops * side * side)
        patch = index % (side * side)
        cells = torch.full((length, 3), -1, dtype=torch.long)
        real = position >= 0
        cells[position[real]] = torch.stack([index // (side * side), patch // side, patch % side], dim=1)[real]
        return cells

    def extra_config(self) -> dict[str, Any]:
        return {"image_grid_pinpoints": GRID_PINPOINTS}

    def build_processor(self, tokenizer: Any) -> Any:
        image_processor = LlavaNextImageProcessorPil(**self.image_processor_kwargs(),
                                                     image_grid_pinpoints=GRID_PINPOINTS, do_pad=True)
        return LlavaNextProcessor(image_processor=image_processor, **self.processor_kwargs(tokenizer))


LLAVA_NEXT = LlavaNext()


def arrange_anyres(llava: nn.Module, feats: Tensor, keep: Tensor, n_merged: int, image_size: Tensor,
                   native_layout: bool = False) -> tuple[Tensor, Tensor, int]:
    """Lay out the reduced crops of one LLaVA-NeXT image as the official code does (methods.md 1(g) quirk 9).

    The base crop's tokens come first as they are ([CLS, dominant, contextual]); then the sub-crops' dominant
    patches in the raster order of the whole grid, their CLS tokens, and their contextual tokens. By default, as
    the official code: no image-newline tokens and no unpadding. With `native_layout`, the sub-crops' dominant
    patches follow transformers' own layout instead: patches in the padding that unpadding removes are dropped,
    and the model's image-newline token closes every grid row that keeps a patch.
    Returns (tokens, original indices in HF's packed order, placeholder slots).
    feats: [crops, k + n_merged, D]; keep: [crops, k] tower indices (0 = CLS).
    """
    side = llava.config.vision_config.image_size // llava.config.vision_config.patch_size
    position, slots, newline_at = packed_positions(llava, feats.shape[0], image_size, side * side)
    patch = keep - 1  # -1 for CLS
    crop = torch.arange(feats.shape[0], device=keep.device).unsqueeze(1)
    origin = torch.where(patch >= 0, position.to(keep.device)[crop * side * side + patch.clamp(min=0)], -1)
    k = keep.shape[1]
    tokens, origins = [feats[0]], [torch.cat([origin[0], origin.new_full((n_merged,), -1)])]
    if feats.shape[0] > 1:
        _, cols = get_anyres_image_grid_shape(image_size, llava.config.image_grid_pinpoints,
                                                 llava.config.vision_config.image_size)
        sub, sub_patch, sub_origin = feats[1:, :k], patch[1:], origin[1:]
        grid_row, grid_col = (crop[1:] - 1) // cols, (crop[1:] - 1) % cols
        y, x = sub_patch.clamp(min=0) // side, sub_patch.clamp(min=0) % side
        raster = (grid_row * side + y) * (cols * side) + grid_col * side + x
        is_patch = sub_patch >= 0
        if native_layout:
            is_patch &= sub_origin >= 0  # unpadding removes these patches
            dominant, dominant_origin = with_newlines(sub[is_patch], sub_origin[is_patch], newline_at.to(keep.device),
                                                       llava.image_newline)
        else:
            order = raster[is_patch].argsort()
            dominant, dominant_origin = sub[is_patch][order], sub_origin[is_patch][order]
        is_cls = sub_patch < 0
        tokens += [dominant, sub[is_cls], feats[1:, k:].flatten(0, 1)]
        origins += [dominant_origin, sub_origin[is_cls], origin.new_full(((feats.shape[0] - 1) * n_merged,), -1)]
    return torch.cat(tokens), torch.cat(origins), slots


def _unpadded(llava: nn.Module, n_crops: int, image_size: Tensor, tokens: int) -> Tensor:
    """[n_crops, tokens] True for CLS and the patches that transformers' unpadding keeps."""
    position = packed_positions(llava, n_crops, image_size, tokens - 1)[0].view(n_crops, tokens - 1)
    valid = torch.cat([torch.ones(n_crops, 1, dtype=torch.bool), position >= 0], dim=1)
    return valid.to(image_size.device)


def with_newlines(tokens: Tensor, origins: Tensor, newline_at: Tensor, newline: Tensor) -> tuple[Tensor, Tensor]:
    """Tokens in packed order, each grid row that keeps one closed by the image-newline token (origin: its slot)."""
    order = origins.argsort()
    tokens, origins = tokens[order], origins[order]
    row = torch.searchsorted(newline_at, origins)  # the newline that closes each token's row
    last_of_row = torch.ones_like(row, dtype=torch.bool)
    last_of_row[:-1] = row[1:] != row[:-1]
    slot = torch.arange(len(tokens), device=tokens.device) + torch.cumsum(last_of_row, 0) - last_of_row.long()
    out = tokens.new_empty(len(tokens) + int(last_of_row.sum()), tokens.shape[1])
    out_origins = origins.new_empty(out.shape[0])
    out[slot], out_origins[slot] = tokens, origins
    out[slot[last_of_row] + 1] = newline.to(tokens.dtype)
    out_origins[slot[last_of_row] + 1] = newline_at[row[last_of_row]]
    return out, out_origins


def packed_positions(llava: nn.Module, n_crops: int, image_size: Tensor, per_crop: int,
                     ) -> tuple[Tensor, int, Tensor]:
    """Where each crop patch lands in HF's packed visual sequence (unpadded grid plus newlines), -1 if cut away.

    Found by packing the patches' own indices with transformers' `pack_image_features`, so the layout is never
    re-derived here. Returns (positions [n_crops * per_crop], length of the packed sequence, positions of the
    image-newline tokens).
    """
    ids = torch.arange(n_crops * per_crop, dtype=torch.float32).view(n_crops, per_crop, 1)
    packed, _ = llava.pack_image_features([ids], image_size.view(1, 2).cpu(), "default",
                                          image_newline=torch.tensor([-1.0]))
    order = packed[0][:, 0].long()
    real = order >= 0
    position = torch.full((n_crops * per_crop,), -1, dtype=torch.long)
    position[order[real]] = real.nonzero()[:, 0]
    return position, order.numel(), (~real).nonzero()[:, 0]
