"""The encoder-side cut: reduce a vision tower layer's output before the projector.

The CLS attention row and the keys of that one layer are recomputed from its own projections (captured with a
forward pre-hook), so the tower keeps its SDPA attention. LLaVA-NeXT images are reduced crop by crop and
arranged as the official VisionDrop/VisionZip code does (see `arrange_anyres`).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, image_size_to_num_patches

from .attention import gather_rows
from .policy import EncoderView, Policy


def tower_layers(vision_tower: nn.Module) -> nn.ModuleList:
    try:  # CLIPVisionModel wraps a CLIPVisionTransformer; llava-hf builds the transformer directly
        return getattr(vision_tower, "vision_model", vision_tower).encoder.layers
    except AttributeError:
        raise TypeError(f"encoder-side pruning needs a CLIP-style vision tower, got {type(vision_tower).__name__}")


def feature_layer_index(vision_tower: nn.Module, vision_feature_layer: int) -> int:
    """0-based index of the tower layer whose output is `hidden_states[vision_feature_layer]`."""
    if not isinstance(vision_feature_layer, int):
        raise ValueError("encoder-side pruning needs a single vision_feature_layer, not a list")
    return vision_feature_layer % (len(tower_layers(vision_tower)) + 1) - 1


def encoder_view(vision_tower: nn.Module, pixel_values: Tensor, layer_idx: int) -> EncoderView:
    """Run the tower and capture what an encoder-side policy needs from layer `layer_idx`."""
    attn = tower_layers(vision_tower)[layer_idx].self_attn
    captured = {}

    def grab(module, args, kwargs):
        captured["x"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    hook = attn.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        out = vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
    finally:
        hook.remove()
    x = captured["x"]
    heads = lambda t: t.view(*t.shape[:2], -1, attn.head_dim).transpose(1, 2)  # noqa: E731
    keys = heads(attn.k_proj(x))
    cls_query = heads(attn.q_proj(x[:, :1]))
    cls_attention = ((cls_query @ keys.transpose(-1, -2)) * attn.scale).softmax(-1, dtype=torch.float32)
    return EncoderView(out.hidden_states[layer_idx + 1], cls_attention[:, :, 0].to(x.dtype), keys)


def reduce_images(llava: nn.Module, policy: Policy, pixel_values: Tensor, vision_feature_layer: int,
                  select_strategy: str, image_sizes: Tensor | None = None,
                  ) -> tuple[list[Tensor], list[int], list[Tensor]]:
    """Project only the tokens an encoder-side policy keeps, image by image.

    Returns, per image: features zero-padded to the placeholder slots the unpatched model fills, the number of
    real rows, and their original indices in the image's own visual-token order (-1 for CLS and merged tokens).
    """
    anyres = hasattr(llava, "pack_image_features")
    if anyres and select_strategy != "default":
        raise NotImplementedError("encoder-side pruning of LLaVA-NeXT supports vision_feature_select_strategy "
                                  "'default' only")
    crops = [1] * pixel_values.shape[0]
    if anyres:
        crops = [image_size_to_num_patches(size, llava.config.image_grid_pinpoints, llava.config.vision_config.image_size)
                 for size in image_sizes]
        if pixel_values.dim() == 5:
            pixel_values = torch.cat([pv[:n] for pv, n in zip(pixel_values, crops)])
    view = encoder_view(llava.vision_tower, pixel_values, feature_layer_index(llava.vision_tower,
                                                                              vision_feature_layer))
    if anyres and policy.keep_newlines:  # spend the budget on patches that survive unpadding
        view.valid = torch.cat([_unpadded(llava, n, size, view.hidden.shape[1]) for n, size in zip(crops, image_sizes)])
    sel = policy.select_encoder(view)
    tokens = gather_rows(view.hidden, sel.keep)
    if sel.merged is not None:
        tokens = torch.cat([tokens, sel.merged], dim=1)
    features = llava.multi_modal_projector(tokens)  # [crops, kept + merged, D]
    cls_offset = 1 if select_strategy == "default" else 0  # "default" drops CLS from the model's visual tokens
    n_merged = tokens.shape[1] - sel.keep.shape[1]
    padded, valid, origins = [], [], []
    for i, (feats, keep) in enumerate(zip(features.split(crops), sel.keep.split(crops))):
        if anyres:
            feats, orig, slots = arrange_anyres(llava, feats, keep, n_merged, image_sizes[i], policy.keep_newlines)
        else:
            orig = torch.cat([keep[0] - cls_offset, keep.new_full((n_merged,), -1)]).clamp(min=-1)
            feats, slots = feats[0], view.hidden.shape[1] - cls_offset
        if feats.shape[0] > slots:
            raise ValueError(f"{policy.name} keeps {feats.shape[0]} tokens for an image with {slots} image slots")
        padded.append(torch.cat([feats, feats.new_zeros(slots - feats.shape[0], feats.shape[1])]))
        valid.append(feats.shape[0])
        origins.append(orig)
    return padded, valid, origins


def arrange_anyres(llava: nn.Module, feats: Tensor, keep: Tensor, n_merged: int, image_size: Tensor,
                   keep_newlines: bool = False) -> tuple[Tensor, Tensor, int]:
    """Lay out the reduced crops of one LLaVA-NeXT image as the official code does (methods.md 1(g) quirk 9).

    The base crop's tokens come first as they are ([CLS, dominant, contextual]); then the sub-crops' dominant
    patches in the raster order of the whole grid, their CLS tokens, and their contextual tokens. By default, as
    the official code: no image-newline tokens and no unpadding. With `keep_newlines`, the sub-crops' dominant
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
        if keep_newlines:
            is_patch &= sub_origin >= 0  # unpadding removes these patches
            dominant, dominant_origin = _with_newlines(sub[is_patch], sub_origin[is_patch], newline_at.to(keep.device),
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


def _with_newlines(tokens: Tensor, origins: Tensor, newline_at: Tensor, newline: Tensor) -> tuple[Tensor, Tensor]:
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
