"""The encoder-side cut: reduce the vision tower's output before the projector, image by image.

The model's family splits the images into crops (or frames), shows the tower's feature layer to the policy
(`Family.encoder_view`) and lays the kept tokens out as the model's visual block (`Family.lay_out`); this module
selects, projects and pads.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..families.base import Family
from .attention import gather_rows
from ..core import EMPTY_SLOT
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
    padded, valid, origins, side = [], [], [], []
    for images in family.image_groups(family.visual_inputs(model, modality, args, kwargs)):
        view = family.encoder_view(model, images, policy.eager_encoder)
        tokens = view.hidden.shape[1]
        if policy.native_layout:
            view.valid = family.valid_tokens(model, images, tokens)
        sel = policy.select_encoder(view)
        kept = gather_rows(view.hidden, sel.keep)
        if sel.merged is not None:
            kept = torch.cat([kept, sel.merged], dim=1)
        features = family.projector(model)(kept)  # [crops, kept + merged, D]
        n_merged = kept.shape[1] - sel.keep.shape[1]
        rows = None if view.side is None else family.side_projector(model)(_kept_side(view.side, sel))
        for i, (feats, keep) in enumerate(zip(features.split(images.crops), sel.keep.split(images.crops))):
            feats, orig, slots = family.lay_out(model, images, i, feats, keep, n_merged, tokens, policy.native_layout)
            if feats.shape[0] > slots:
                raise ValueError(f"{policy.name} keeps {feats.shape[0]} tokens for an image with {slots} image slots")
            padded.append(torch.cat([feats, feats.new_zeros(slots - feats.shape[0], feats.shape[1])]))
            filled = (orig != EMPTY_SLOT).nonzero()[:, 0]
            valid.append(filled)
            origins.append(orig[filled])
            if rows is not None:  # laid out as the tokens, their S rows side by side
                crop = rows.split(images.crops)[i]
                laid = family.lay_out(model, images, i, crop.flatten(2), keep, n_merged, tokens,
                                      policy.native_layout)[0].view(-1, *crop.shape[2:])
                side.append(torch.cat([laid, laid.new_zeros(slots - laid.shape[0], *laid.shape[1:])]))
    return padded, valid, origins, side if side else None


def _kept_side(side: Tensor, sel: Selection) -> Tensor:
    """The side features [N, k + c, S, E] of the kept tokens, then of the merged ones by the merge's weights."""
    kept = gather_rows(side, sel.keep)
    if sel.merged is None or not sel.merged.shape[1]:
        return kept
    if sel.weights is None:
        raise ValueError("this method merges visual tokens without stating its merge weights (`Selection.weights`), "
                         "which the model's side features (Qwen3-VL's DeepStack) need to follow the merged tokens")
    merged = (sel.weights.to(side.dtype) @ side.flatten(2)).view(*sel.weights.shape[:2], *side.shape[2:])
    return torch.cat([kept, merged], dim=1)
