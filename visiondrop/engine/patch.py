"""Install a policy on a loaded LLaVA model, and take it off again without a trace.

Three patches, all on the instance (never on the class, so other models are untouched):
- `get_image_features` is wrapped (signature kept: `generate()` inspects it) when the policy has an encoder stage;
- a forward pre-hook on the multimodal model notes where the image tokens are in `input_ids`;
- the language model's `forward` is replaced by the engine's layer loop whenever a forward holds image tokens
  (or decodes after one); text-only forwards go to the original.
"""
from __future__ import annotations

import functools
import weakref

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling

from . import decoder
from .compat import cache_kwargs, pop_cache
from .encoder import reduce_images
from .policy import Policy
from .trace import Trace


class Pruner:
    """Runs `policy` inside `model` (a LlavaForConditionalGeneration) until `remove()`."""

    def __init__(self, model: nn.Module, policy: Policy):
        self.model, self.policy = model, policy
        self.llava = model.model
        self.lm = self.llava.language_model
        self.trace = Trace()
        self._visual: Tensor | None = None  # image-token mask of the forward in flight
        self._encoded: tuple[list, list] | None = None  # (valid rows, origins) per image of the last encoding
        self._segments: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # cache -> segments
        if getattr(self.llava, "_visiondrop_pruner", None) is not None:
            raise RuntimeError("a pruning method is already applied to this model: remove() it first")
        self._install()

    # -- installation --------------------------------------------------------------------------------------
    def _install(self) -> None:
        self.llava._visiondrop_pruner = self
        self._hook = self.llava.register_forward_pre_hook(self._note_image_tokens, with_kwargs=True)
        self.lm.forward = _delegate(self.lm.forward, self._language_forward)
        if self.policy.encoder_layer is not None:
            self.llava.get_image_features = _delegate(self.llava.get_image_features, self._image_features)

    def remove(self) -> None:
        """Restore the model exactly: drop the instance attributes and the hook."""
        if getattr(self.llava, "_visiondrop_pruner", None) is not self:
            return
        self._hook.remove()
        for module, name in ((self.lm, "forward"), (self.llava, "get_image_features")):
            module.__dict__.pop(name, None)
        del self.llava._visiondrop_pruner

    # -- the patched pieces --------------------------------------------------------------------------------
    def _note_image_tokens(self, module, args, kwargs) -> None:
        encoded = kwargs.get("mm_encoder_outputs") or {}
        if kwargs.get("pixel_values") is None and encoded.get("image") is None:
            self._visual = None  # no image in this forward, whatever token ids it holds (decode steps)
            return
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        image_id = self.model.config.image_token_id
        if input_ids is not None:
            self._visual = input_ids == image_id
        elif kwargs.get("inputs_embeds") is not None:
            embeds = kwargs["inputs_embeds"]
            image_embed = self.llava.get_input_embeddings()(torch.tensor(image_id, device=embeds.device))
            self._visual = (embeds == image_embed).all(-1)
        else:
            self._visual = None

    def _image_features(self, pixel_values: Tensor, *args, **kwargs) -> BaseModelOutputWithPooling:
        # LlavaNextModel passes image_sizes positionally, LlavaModel passes keywords
        names = ("image_sizes",) * hasattr(self.llava, "pack_image_features") + (
            "vision_feature_layer", "vision_feature_select_strategy")
        kwargs.update(zip(names, args))
        config = self.model.config
        layer = kwargs.get("vision_feature_layer")
        layer = config.vision_feature_layer if layer is None else layer
        strategy = kwargs.get("vision_feature_select_strategy") or config.vision_feature_select_strategy
        features, valid, origins = reduce_images(self.llava, self.policy, pixel_values, layer, strategy,
                                                 kwargs.get("image_sizes"))
        self._encoded = (valid, origins)
        return BaseModelOutputWithPooling(last_hidden_state=features[0], pooler_output=features)

    def _language_forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                          use_cache=None, **kwargs) -> BaseModelOutputWithPast:
        past_key_values = pop_cache(kwargs)
        visual, self._visual = self._visual, None
        if inputs_embeds is None:
            inputs_embeds = self.lm.embed_tokens(input_ids)
        segments = self._segments.get(past_key_values) if past_key_values is not None else None
        if visual is not None and visual.any():
            return self._prefill(inputs_embeds, attention_mask, position_ids, past_key_values, use_cache, visual)
        if segments is not None:
            hidden = decoder.decode(self.lm, inputs_embeds, attention_mask, past_key_values, segments)
            return BaseModelOutputWithPast(last_hidden_state=hidden, **cache_kwargs(past_key_values))
        return type(self.lm).forward(self.lm, attention_mask=attention_mask, position_ids=position_ids,
                                     inputs_embeds=inputs_embeds, use_cache=use_cache,
                                     **cache_kwargs(past_key_values), **kwargs)

    def _prefill(self, embeds, attention_mask, position_ids, cache, use_cache, visual) -> BaseModelOutputWithPast:
        if cache is not None and cache.get_seq_length() > 0:
            raise NotImplementedError("image tokens after the first forward of a cache are not supported")
        use_cache = self.lm.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.lm.config)
        run = decoder.start(embeds, attention_mask, position_ids, visual)
        trace = Trace.start(embeds.shape[0])
        if self.policy.encoder_layer is not None:
            run = self._drop_empty_slots(run, trace)
        hidden, segments = decoder.prefill(self.lm, self.policy, run, cache if use_cache else None, trace)
        self.trace = trace
        if use_cache:
            self._segments[cache] = segments
        return BaseModelOutputWithPast(last_hidden_state=hidden, **cache_kwargs(cache if use_cache else None))

    def _drop_empty_slots(self, run: decoder.Running, trace: Trace) -> decoder.Running:
        """Remove the placeholder rows the encoder stage left empty, before the first decoder layer."""
        samples = run.vis_len.nonzero()[:, 0].tolist()
        if self._encoded is None or len(self._encoded[0]) != len(samples):
            raise RuntimeError("the image features of this forward were not produced by the applied method")
        valid, origins = self._encoded
        device = run.hidden.device
        selections = {b: (torch.arange(valid[i], device=device), None) for i, b in enumerate(samples)}
        run = decoder.apply_selections(run, selections, renumber=True)
        for i, b in enumerate(samples):
            run.origins[b] = origins[i].to(device)
        trace.add_cut("encoder", [run.origins[b] if b in selections else run.origins[b][:0]
                                  for b in range(len(run.origins))])
        return run


def _delegate(original, replacement):
    """A function that calls `replacement` but carries `original`'s name and signature (generate() inspects it)."""

    @functools.wraps(original)
    def patched(*args, **kwargs):
        return replacement(*args, **kwargs)

    return patched
