"""The encoder-side cut: reduce the vision tower's output before the projector, image by image.

The model's family splits the images into crops (or frames), shows the tower's feature layer to the policy
(`Family.encoder_view`) and lays the kept tokens out as the model's visual block (`Family.lay_out`); this module
selects, projects and pads.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from transformers.utils import ModelOutput

from ..families.base import Family
from .attention import gather_rows
from ..core import EMPTY_SLOT, Images, TowerMerge
from .policy import Policy, Selection


def reduce_images(model: nn.Module, family: Family, policy: Policy, modality: str, args: tuple,
                  kwargs: dict) -> tuple[list[Tensor], list[int], list[Tensor], list[Tensor] | None]:
    """Project only the tokens an encoder-side policy keeps, for a call `feature_function(*args, **kwargs)` of
    `modality` (`Family.feature_functions`: "image" is `get_image_features(pixel_values, ...)`).

    Returns, per image: features zero-padded to the placeholder slots the unpatched model fills, the slots the
    method filled (ascending), their original indices in the image's own visual-token order (-1 for CLS and merged
    tokens), and where the view has side features, their projected rows [slots, S, D] laid out and padded alike
    (else None). A layout may leave slots empty between filled ones (`EMPTY_SLOT` origins: a video's frames each
    in its own span); the rest are padded at the end.
    """
    reason = family.unsupported(policy, modality)
    if reason is not None:
        raise NotImplementedError(f"{policy.name}: {reason}")
    padded, valid, origins, side = [], [], [], []
    project, first_image = family.projector(model), 0
    for images in family.image_groups(family.visual_inputs(model, modality, args, kwargs)):
        merge = TowerMerge(policy.merge_in_tower, policy.merges_at_layer_output) if policy.merges_in_tower else None
        view = family.encoder_view(model, images, policy.eager_encoder, policy.scan_layers, policy.received_attention,
                                   merge)
        view.project = (lambda rows: rows) if view.projected else project  # a host's own projected tokens
        view.owners = [first_image + i for i, n in enumerate(images.crops) for _ in range(n)]
        if images.padded is not None and any(images.padded):
            view.padded = [frame < padded for padded, n in zip(images.padded, images.crops) for frame in range(n)]
        first_image += len(images.crops)
        tokens = view.tokens or view.hidden.shape[1]  # before any merging inside the tower
        if policy.native_layout:
            view.valid = family.valid_tokens(model, images, tokens)
        sel = policy.select_encoder(view)
        if sel.features is not None:
            features = sel.features
        else:
            kept = gather_rows(view.hidden, sel.keep.clamp(min=0))
            if sel.merged is not None:
                kept = torch.cat([kept, sel.merged], dim=1)
            features = view.project(kept)  # [crops, kept + merged, D]
        n_merged = features.shape[1] - sel.keep.shape[1]
        rows = None if view.side is None else family.side_projector(model)(_kept_side(view.side, sel))
        crop_rows = [None] * len(images.crops) if rows is None else rows.split(images.crops)
        for i, (feats, keep) in enumerate(zip(features.split(images.crops), sel.keep.split(images.crops))):
            crop = crop_rows[i]
            if (keep < 0).any():  # a crop that keeps fewer tokens than others of the view
                if not torch.equal(keep < 0, (keep[:1] < 0).expand_as(keep)):
                    raise NotImplementedError(f"{policy.name} kept different counts on the crops of one image")
                real = torch.cat([keep[0] >= 0, keep.new_ones(n_merged, dtype=torch.bool)])
                feats, keep = feats[:, real], keep[:, keep[0] >= 0]
                crop = None if crop is None else crop[:, real]
            # every token of a view the tower did not merge, none merged (MustDrop's encoder stage on a tower that
            # cannot merge inside): nothing reduced, so the host's own layout, newlines included
            native = policy.native_layout or (keep.shape[1] == tokens and not n_merged and not view.merged_in_tower)
            feats, orig, slots = family.lay_out(model, images, i, feats, keep, n_merged, tokens, native)
            if feats.shape[0] > slots:  # anyres: the model's own layout removes the crops' padding (and resizes)
                raise ValueError(
                    f"{policy.name} keeps {feats.shape[0]} visual tokens ({keep.shape[1] + n_merged} a crop x "
                    f"{keep.shape[0]} crops) of an image that the model lays out in {slots} tokens (without its "
                    "crops' padding): give a smaller budget or ratio (at most "
                    f"{slots // keep.shape[0]} tokens a crop for this image)")
            padded.append(torch.cat([feats, feats.new_zeros(slots - feats.shape[0], feats.shape[1])]))
            filled = (orig != EMPTY_SLOT).nonzero()[:, 0]
            valid.append(filled)
            origins.append(orig[filled])
            if crop is not None:  # laid out as the tokens, their S rows side by side
                laid = family.lay_out(model, images, i, crop.flatten(2), keep, n_merged, tokens,
                                      native)[0].view(-1, *crop.shape[2:])
                side.append(torch.cat([laid, laid.new_zeros(slots - laid.shape[0], *laid.shape[1:])]))
    return padded, valid, origins, side if side else None


def _kept_side(side: Tensor, sel: Selection) -> Tensor:
    """The side features [N, k + c, S, E] of the kept tokens, then of the merged ones by the merge's weights."""
    kept = gather_rows(side, sel.keep.clamp(min=0))
    if sel.merged is None or not sel.merged.shape[1]:
        return kept
    if sel.weights is None:
        raise ValueError("this method merges visual tokens without stating its merge weights (`Selection.weights`), "
                         "which the model's side features (Qwen3-VL's DeepStack) need to follow the merged tokens")
    merged = (sel.weights.to(side.dtype) @ side.flatten(2)).view(*sel.weights.shape[:2], *side.shape[2:])
    return torch.cat([kept, merged], dim=1)


def tower_attention(model: nn.Module, family: Family, modality: str, args: tuple, kwargs: dict,
                    encode: Callable[[], ModelOutput]) -> tuple[ModelOutput, list[Tensor]]:
    """Encode a call `feature_function(*args, **kwargs)` of `modality` with `encode()` (the host's own call: its tower
    runs once) and observe the tower's feature layer as it runs (`Family.tower_attention`). Returns what `encode`
    returned and, per image (or video) of the call, the attention each of its visual tokens received at that layer
    [slots], in the model's own visual-token order (`DecoderCut.tower_attention`): mean over heads, then over every
    query of its crop (the tower's importance row where it has no CLS, the attention received where it has one),
    laid out as the family lays out a crop's every token, 0 in slots that hold no tower token."""
    images = family.visual_inputs(model, modality, args, kwargs)
    out, received = family.tower_attention(model, images, encode)
    rows = []
    with torch.no_grad():
        for group, group_rows in zip(family.image_groups(images), received):
            rows += [laid_out_row(model, family, group, i, crop_rows)
                     for i, crop_rows in enumerate(group_rows.split(group.crops))]
    return out, rows


def tower_reading(model: nn.Module, family: Family, modality: str, args: tuple, kwargs: dict, output: ModelOutput,
                  read: Callable[[Tensor], tuple[Tensor, Tensor]]) -> list[tuple[Tensor, Tensor]]:
    """Per image (or video) of a call `feature_function(*args, **kwargs)` of `modality` that returned `output`: what
    `read` (`Policy.read_tower`) makes of the tower's own output at the feature layer for its crops
    (`Family.tower_output`): its rows pooled as the host pools its tokens and laid out as `tower_attention`'s
    [slots], and its vectors [crops, E] (`DecoderCut.tower_rows`, `tower_crops`)."""
    images = family.visual_inputs(model, modality, args, kwargs)
    features, pool = family.tower_output(model, images, output)
    with torch.no_grad():
        rows, vectors = read(features)
        rows = pool(rows)
        return [(laid_out_row(model, family, images, i, crop_rows), crop_vectors)
                for i, (crop_rows, crop_vectors) in enumerate(zip(rows.split(images.crops),
                                                                   vectors.split(images.crops)))]


def laid_out_row(model: nn.Module, family: Family, images: Images, image: int, crop_rows: Tensor) -> Tensor:
    """One value per token of each crop of image `image` [crops, tokens] as one row over the image's placeholder
    slots, laid out as the family lays out its visual tokens, 0 in slots that hold no tower token."""
    tokens = crop_rows.shape[1]
    keep = torch.arange(tokens, device=crop_rows.device).expand(crop_rows.shape[0], -1)
    laid, origins, slots = family.lay_out(model, images, image, crop_rows.unsqueeze(-1), keep, 0, tokens, False)
    row = laid.new_zeros(slots)
    real = origins >= 0
    row[origins[real]] = laid[real, 0]
    return row
