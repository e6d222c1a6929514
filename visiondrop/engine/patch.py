"""Install a policy on a loaded model of a supported family, and take it off again without a trace.

Three patches, all on the instance (never on the class, so other models are untouched), at the places the
model's family adapter names:
- `get_image_features` is wrapped (signature kept: `generate()` inspects it) when the policy has an encoder cut,
  or observed (the model's own features, and beside them the tower's attention captured in the same tower pass or
  the policy's reading of the tower's output) when its decoder cuts read the tower (`Policy.tower_attention`,
  `Policy.reads_tower`);
- a forward pre-hook on the multimodal model notes where the image tokens are, and one on the whole model
  refuses `labels=` when the method shortens the sequence;
- the language model's `forward` is replaced by the engine's layer loop whenever a forward holds image tokens
  (or decodes after one); text-only forwards go to the original.
A KV cache that a pruned prefill filled also gets its `reorder_cache` wrapped, so beam search reorders the
engine's per-row bookkeeping with the cache's rows.
"""
from __future__ import annotations

import functools
import weakref

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.utils import ModelOutput

from ..families import family_of
from . import decoder
from .compat import cache_kwargs, pop_cache
from .encoder import reduce_images, tower_attention, tower_reading
from .policy import Policy, TowerSeen
from .trace import Trace


class Pruner:
    """Runs `policy` inside `model` (of a family in `visiondrop.families`) until `remove()`."""

    def __init__(self, model: nn.Module, policy: Policy):
        self.model, self.policy = model, policy
        self.family = family_of(model)
        self.multimodal = self.family.multimodal(model)
        self.lm = self.family.language_model(model)
        self.trace = Trace()
        self._visual: Tensor | None = None  # image-token mask of the forward in flight
        self._frames: Tensor | None = None  # video frames per sample of the forward in flight
        self._padding_slots: Tensor | None = None  # placeholders per sample in the left padding of that forward
        # id(features) -> (weak ref, filled slots, origins) per image of the last encoding, and the images of the
        # forward in flight as (filled slots, origins)
        self._encoded: dict[int, tuple[weakref.ref, Tensor, Tensor]] = {}
        self._fingerprints: list[tuple[Tensor, Tensor, Tensor]] = []  # the same, for stacked features
        self._images: list[tuple[Tensor, Tensor]] | None = None
        self._images_modality = "image"
        # what the decoder cuts see of the tower per image (`Policy.tower_attention`, `reads_tower`), found as the
        # features are: by identity, or by first token for stacked features; and that of the forward in flight
        self._tower: tuple[list[tuple[Tensor | weakref.ref, int]], list[TowerSeen]] | tuple = ()
        self._tower_rows: list[TowerSeen] | None = None
        self._cached: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # cache -> decoder.Cached
        if getattr(self.multimodal, "_visiondrop_pruner", None) is not None:
            raise RuntimeError("a pruning method is already applied to this model: remove() it first")
        self._install()

    # -- installation --------------------------------------------------------------------------------------
    def _install(self) -> None:
        self.multimodal._visiondrop_pruner = self
        self._hooks = [self.multimodal.register_forward_pre_hook(self._note_image_tokens, with_kwargs=True),
                       self.model.register_forward_pre_hook(self._refuse_labels, with_kwargs=True)]
        self.lm.forward = _delegate(self.lm.forward, self._language_forward)
        if self.policy.encoder_layer is not None:
            for modality, name in self.family.feature_functions.items():
                setattr(self.multimodal, name, _delegate(getattr(self.multimodal, name),
                                                         functools.partial(self._image_features, modality)))
        else:
            for modality, name in (self.family.tower_functions or self.family.feature_functions).items():
                if not self._sees_tower(modality):
                    continue
                original = getattr(self.multimodal, name)
                setattr(self.multimodal, name, _delegate(original, functools.partial(self._observe_tower, original,
                                                                                     modality)))

    def remove(self) -> None:
        """Restore the model exactly: drop the instance attributes and the hook."""
        if getattr(self.multimodal, "_visiondrop_pruner", None) is not self:
            return
        for hook in self._hooks:
            hook.remove()
        self.lm.__dict__.pop("forward", None)
        for name in {*self.family.feature_functions.values(), *(self.family.tower_functions or {}).values()}:
            self.multimodal.__dict__.pop(name, None)
        del self.multimodal._visiondrop_pruner

    def _sees_tower(self, modality: str) -> bool:
        """Whether the policy's decoder cuts see the tower for `modality` (`Policy.tower_attention`, `reads_tower`)."""
        return self.policy.tower_attention or modality in self.policy.reads_tower

    # -- the patched pieces --------------------------------------------------------------------------------
    def _refuse_labels(self, module, args, kwargs) -> None:
        prunes = self.policy.encoder_layer is not None or bool(self.policy.cut_layers)
        if kwargs.get("labels") is not None and prunes and self.family.has_images(kwargs):
            raise ValueError(
                f"labels= is not supported with visual-token pruning: {self.policy.name} removes visual tokens inside "
                "the model, so its logits are shorter than the labels. Compute the loss from the logits yourself "
                "(each row ends with the text after the image, left-padded), or remove() the method to train")

    def _note_image_tokens(self, module, args, kwargs) -> None:
        encoded = kwargs.get("mm_encoder_outputs") or {}
        # generate() encodes the images before the first forward, then repeats them per returned sequence or beam
        present = [encoded[m].pooler_output for m in self.family.tower_functions or self.family.feature_functions
                   if encoded.get(m) is not None]
        if len(present) > 1 and self.policy.encoder_layer is not None:
            raise NotImplementedError(_MIXED)
        self._images = self._own_images(present[0]) if present else None
        self._tower_rows = self._own_tower_rows(present[0]) if present else None
        if not self.family.has_images(kwargs):
            self._visual = None  # no image in this forward, whatever token ids it holds (decode steps)
            return
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        placeholders = self.family.image_token_mask(self.model, input_ids, kwargs.get("inputs_embeds"))
        # placeholders in the left padding hold what fills a batch's shorter samples up to a host's one tensor (the
        # padded frames of a shorter video): padding, never visual tokens
        mask = kwargs.get("attention_mask")
        real = None if mask is None or placeholders is None else mask.bool()
        self._visual = placeholders if real is None else placeholders & real
        self._padding_slots = None if real is None else (placeholders & ~real).sum(1)
        self._frames = self.family.video_frames(self.model, input_ids, kwargs)
        if (self.policy.encoder_layer is not None and "video" not in self.family.feature_functions
                and self._frames is not None and bool(self._frames.any())):
            raise NotImplementedError(
                f"{self.policy.name} reduces the vision tower's output, and {type(self.family).__name__}'s adapter "
                "encodes images only for encoder-side methods: run videos with a decoder-side or video method")

    def _image_features(self, modality: str, *args, **kwargs) -> ModelOutput:
        if self._images is not None and self._images_modality != modality:
            raise NotImplementedError(_MIXED)
        features, valid, origins, side = reduce_images(self.model, self.family, self.policy, modality, args, kwargs)
        if self.family.stacks_features(modality):
            # generate() copies the rows of a stacked tensor when it repeats them: known by the sum of their tokens
            # (not the first alone: rows that begin alike, as shorter videos padded with the same frames, differ later)
            self._encoded = {}
            self._fingerprints = [(f.sum(0), v, o) for f, v, o in zip(features, valid, origins)]
            features = torch.stack(features)
        else:
            self._encoded = {id(f): (weakref.ref(f), v, o) for f, v, o in zip(features, valid, origins)}
        self._images, self._images_modality = list(zip(valid, origins)), modality
        return self.family.encoder_output(features, side)

    def _observe_tower(self, original, modality: str, *args, **kwargs) -> ModelOutput:
        """The model's own features, and what the decoder cuts see of the tower for each image (`TowerSeen`: the
        tower's attention rows observed in the same pass of the tower, `Family.tower_attention`; the policy's reading
        of the tower's output, `Policy.read_tower`) noted beside them: each unit of the features (a row of a stacked
        tensor, known by the sum of its tokens, as `_own_images` knows it: shorter videos padded with the same frames
        begin alike; an entry of a list, by identity) names its image, as the host splits them (equal units per image:
        Video-LLaVA's frames)."""
        if self.policy.tower_attention:
            out, attention = tower_attention(self.model, self.family, modality, args, kwargs,
                                             functools.partial(original, *args, **kwargs))
        else:
            out, attention = original(*args, **kwargs), None
        reading = tower_reading(self.model, self.family, modality, args, kwargs, out, self.policy.read_tower) \
            if modality in self.policy.reads_tower else None
        rows = [TowerSeen(None if attention is None else attention[i], *(reading[i] if reading else (None, None)))
                for i in range(len(attention if attention is not None else reading))]
        features = out.pooler_output
        per = len(features) // len(rows)
        self._tower = [(f.sum(0) if isinstance(features, Tensor) else weakref.ref(f), i // per)
                       for i, f in enumerate(features)], rows
        self._tower_rows = rows
        return out

    def _own_tower_rows(self, features: list[Tensor] | Tensor) -> list[TowerSeen] | None:
        """What the decoder cuts see of the tower for pre-encoded features (`_observe_tower`), their units found as
        `_own_images` finds them (repeated per returned sequence or beam: each repeat keeps its own rows); None if any
        is not ours."""
        if not self._tower:
            return None
        units, rows = self._tower
        images = []
        for f in features:
            stacked = isinstance(features, Tensor)
            found = next((image for key, image in units
                          if (torch.equal(f.sum(0), key) if stacked else key() is f)), None)
            if found is None:
                return None
            images.append(found)
        per = len(units) // len(rows)
        return [rows[image] for image in images[::per]]

    def _own_images(self, features: list[Tensor] | Tensor) -> list[tuple[Tensor, Tensor]] | None:
        """The bookkeeping of pre-encoded features, found by identity (repeats are the same tensors; rows of a
        stacked tensor by the sum of their tokens); None if any of them did not come from this method's last
        encoding."""
        images = []
        for f in features:
            if isinstance(features, Tensor):
                total = f.sum(0)
                found = next(((v, o) for key, v, o in self._fingerprints if torch.equal(total, key)), None)
            else:
                ref, valid, origins = self._encoded.get(id(f), (None, None, None))
                found = (valid, origins) if ref is not None and ref() is f else None
            if found is None:
                return None
            images.append(found)
        return images

    def _language_forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                          use_cache=None, **kwargs) -> BaseModelOutputWithPast:
        past_key_values = pop_cache(kwargs)
        visual, self._visual = self._visual, None
        if inputs_embeds is None:
            inputs_embeds = self.lm.get_input_embeddings()(input_ids)
        cached = self._cached.get(past_key_values) if past_key_values is not None else None
        if (cached is not None or (visual is not None and visual.any())) and any(
                kwargs.get(f"output_{k}", getattr(self.lm.config, f"output_{k}", False))
                for k in ("attentions", "hidden_states")):
            # the layers see different token sets after each cut: no per-layer tensors a caller could line up
            raise ValueError(
                f"output_attentions / output_hidden_states are not supported with visual-token pruning "
                f"({self.policy.name}): the handle's trace records the tokens each layer kept (handle.trace); "
                "remove() the method for the model's own attentions and hidden states")
        if visual is not None and visual.any():
            side = self.family.side_features(kwargs, visual)
            return self._prefill(inputs_embeds, attention_mask, position_ids, past_key_values, use_cache, visual, side)
        if cached is not None:
            hidden = decoder.decode(self.family, self.lm, self.policy, inputs_embeds, attention_mask, past_key_values,
                                    cached, self.trace)
            return BaseModelOutputWithPast(last_hidden_state=hidden, **cache_kwargs(past_key_values))
        return type(self.lm).forward(self.lm, attention_mask=attention_mask, position_ids=position_ids,
                                     inputs_embeds=inputs_embeds, use_cache=use_cache,
                                     **cache_kwargs(past_key_values), **kwargs)

    def _prefill(self, embeds, attention_mask, position_ids, cache, use_cache, visual, side) -> BaseModelOutputWithPast:
        if cache is not None and cache.get_seq_length() > 0:
            raise NotImplementedError("image tokens after the first forward of a cache are not supported")
        use_cache = self.lm.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.lm.config)
        tower, self._tower_rows = self._tower_rows, None
        modality = "video" if self._frames is not None and bool(self._frames.any()) else "image"
        if self._sees_tower(modality) and tower is None and \
                (self.family.tower_functions or self.family.feature_functions).get(modality) is not None:
            raise RuntimeError("the image features of this forward were not encoded with the applied method")
        run = decoder.start(self.family, embeds, attention_mask, position_ids, visual, self._frames, side, tower)
        trace = Trace.start(embeds.shape[0])
        if self.policy.encoder_layer is not None:
            run = self._drop_empty_slots(run, trace)
        hidden, cached = decoder.prefill(self.family, self.lm, self.policy, run, cache if use_cache else None, trace)
        self.trace = trace
        if use_cache:
            self._cached[cache] = cached
            self._follow_reorders(cache)
        return BaseModelOutputWithPast(last_hidden_state=hidden, **cache_kwargs(cache if use_cache else None))

    def _follow_reorders(self, cache: DynamicCache) -> None:
        """Beam search reorders the cache's rows between steps: reorder the engine's per-row bookkeeping too."""
        if "reorder_cache" in cache.__dict__:
            return
        reorder = cache.reorder_cache

        def reorder_cache(beam_idx: Tensor) -> None:
            reorder(beam_idx)
            if cache in self._cached:
                self._cached[cache].reorder(beam_idx)

        cache.reorder_cache = reorder_cache

    def _drop_empty_slots(self, run: decoder.Running, trace: Trace) -> decoder.Running:
        """Remove the placeholder rows the encoder cut left empty, before the first decoder layer."""
        samples = run.vis_len.nonzero()[:, 0].tolist()
        images, self._images = self._images, None
        if images is None or len(images) != len(samples):
            raise RuntimeError("the image features of this forward were not produced by the applied method")
        device = run.hidden.device
        images = [self._unpadded(b, *image) for b, image in zip(samples, images)]
        selections = {b: (images[i][0].to(device), None, None, 0, None) for i, b in enumerate(samples)}
        # a family that keeps positions gives each token its original slot's (-1: the family's merged position)
        slots = {b: images[i][1].to(device) for i, b in enumerate(samples)}
        run = decoder.apply_selections(self.family, run, selections, renumber=True, slots=slots)
        for i, b in enumerate(samples):
            run.origins[b] = images[i][1].to(device)
        trace.add_cut("encoder", [run.origins[b] if b in selections else run.origins[b][:0]
                                  for b in range(len(run.origins))])
        return run

    def _unpadded(self, sample: int, filled: Tensor, origins: Tensor) -> tuple[Tensor, Tensor]:
        """A sample's filled slots and their origins without the slots that lie in its left padding (the first
        placeholders of its features, which the host scatters there), counted from its first real placeholder."""
        skip = 0 if self._padding_slots is None else int(self._padding_slots[sample])
        if not skip:
            return filled, origins
        real = filled >= skip
        origins = origins[real]
        return filled[real] - skip, torch.where(origins >= 0, origins - skip, origins)


_MIXED = ("a batch that mixes images and videos is not supported with an encoder-side method: the engine lays "
          "out one kind of features per forward; run images and videos in separate batches")


def _delegate(original, replacement):
    """A function that calls `replacement` but carries `original`'s name and signature (generate() inspects it)."""

    @functools.wraps(original)
    def patched(*args, **kwargs):
        return replacement(*args, **kwargs)

    return patched
