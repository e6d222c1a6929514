"""The model-family adapter: everything the engine, the FLOPs count, the harness and the tests know about a host.

A family (LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL; later Video-LLaVA) says where a loaded model keeps its parts, how
its image tokens are marked, how positions are built, cut and continued, how its vision tower shows one layer to
an encoder-side policy, how an image's crops (or a video's frames) are laid out, and how to build its config,
processor and FLOPs dimensions. The engine and the policies only call these methods.

Positions are opaque to the engine: a tensor whose last two axes are (batch, sequence), [B, L] for 1-D RoPE or
[3, B, L] for M-RoPE; the engine only gathers and pads them along the sequence axis. The value types it speaks in
live in `visiondrop.core`.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llama.modeling_llama import rotate_half
from transformers.utils import ModelOutput

from ..core import Checkpoint, Dims, EncoderView, Images, ModelInfo, Shape, TokenIds

class Family:
    """The adapter of one model family. Subclasses implement every method that raises NotImplementedError."""

    model_class: type[nn.Module]  # the transformers class this family loads
    image_aspect_ratio: str  # the evaluation plugin's default preprocessing (harness.prompting)
    conv_template: str  # the evaluation plugin's default prompt (harness.prompting)
    #: modality (a key of `generate()`'s `mm_encoder_outputs`) -> the multimodal module's method that encodes it;
    #: an encoder-side policy wraps each of them
    feature_functions: dict[str, str] = {"image": "get_image_features"}
    #: modality -> the method whose inputs a policy that reads the tower's attention (`Policy.tower_attention`) sees
    #: the tower of, where it is more than `feature_functions` (None: the same)
    tower_functions: dict[str, str] | None = None
    #: the host takes the encoded features as one tensor [n, slots, D] (it calls `.to()` on them), not a list
    stacked_features: bool = False
    #: True for a family whose positions carry the image layout (M-RoPE): tokens keep their positions at every
    #: cut, whatever the policy's `renumber_positions`, and merged tokens take `merged_position`
    fixed_positions: bool = False
    #: a sample's visual tokens may lie in several spans separated by text (Qwen3-VL: a video's frames, each after
    #: its timestamp): decoder cuts treat them as one set, and each kept token stays in its span
    visual_spans: bool = False
    #: tokens a video's visual block holds after its frames that belong to no frame (LLaVA-OneVision: the one
    #: image-newline token after the whole video); the video methods see them apart (`DecoderCut.trailing`)
    video_trailing: int = 0
    image_token: str = "<image>"  # the placeholder its processor expands
    special_tokens: tuple[str, ...] = ()  # tokens its prompts need beyond LLaVA's (tiny tokenizers add them)
    #: image sizes (width, height) of different token counts or layouts on this family: the sizes a batch mixes in
    #: the tests' contract (batch == each sample alone)
    sample_sizes: tuple[tuple[int, int], ...] = ((336, 336), (336, 336), (336, 336))
    #: the image size whose visual tokens the budgets count against (`ModelInfo.n_visual`); None: a video
    nominal_size: tuple[int, int] | None = (336, 336)
    #: its released checkpoints that the FLOPs count and the latency benchmark rebuild (`families.checkpoints()`)
    checkpoints: tuple[Checkpoint, ...] = ()
    #: the hub id of the original checkpoint of its vision tower, with the pooling head the host's checkpoints lack
    #: (`ModelInfo.tower_head`; LLaVA-OneVision's SigLIP), or None
    tower_head: str | None = None

    def stacks_features(self, modality: str) -> bool:
        """Whether the host takes the encoded features of `modality` as one tensor (`stacked_features`)."""
        return self.stacked_features

    # -- where a loaded model keeps its parts ------------------------------------------------------------------
    def multimodal(self, model: nn.Module) -> nn.Module:
        """The module whose forward receives input_ids and images, and whose `get_image_features` encodes them."""
        raise NotImplementedError

    def language_model(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def decoder_layers(self, lm: nn.Module) -> nn.ModuleList:
        raise NotImplementedError

    def final_norm(self, lm: nn.Module) -> nn.Module:
        raise NotImplementedError

    def projector(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    # -- facts read from a config ------------------------------------------------------------------------------
    def model_info(self, config: Any) -> ModelInfo:
        raise NotImplementedError

    def flops_dims(self, config: Any) -> "Dims":
        raise NotImplementedError

    def frames(self, config: Any) -> int:
        """Frames a video is sampled to by default (families that take videos: `"video" in feature_functions`)."""
        raise NotImplementedError(f"{type(self).__name__} takes no videos")

    # -- the visual tokens of a forward ------------------------------------------------------------------------
    #: the forward keywords that carry pixels (of any modality)
    pixel_keys: tuple[str, ...] = ("pixel_values",)

    def has_images(self, kwargs: dict[str, Any]) -> bool:
        """Whether a forward's keywords carry images or videos (pixels, or features `generate()` encoded
        beforehand)."""
        encoded = kwargs.get("mm_encoder_outputs") or {}
        return any(kwargs.get(key) is not None for key in self.pixel_keys) \
            or any(encoded.get(m) is not None for m in self.feature_functions)

    def placeholder_ids(self, config: Any) -> tuple[int, ...]:
        """The token ids that hold visual tokens in a prompt: the image's, and the video's where the family takes
        videos."""
        return (config.image_token_id, *((config.video_token_id,) if "video" in self.feature_functions else ()))

    def image_token_mask(self, model: nn.Module, input_ids: Tensor | None,
                         inputs_embeds: Tensor | None) -> Tensor | None:
        """[B, L] True at the visual tokens of a forward's inputs (`placeholder_ids`), or None if they cannot be
        told."""
        ids = self.placeholder_ids(model.config)
        if input_ids is not None:
            return torch.isin(input_ids, torch.tensor(ids, device=input_ids.device))
        if inputs_embeds is not None:
            embeds = model.get_input_embeddings()(torch.tensor(ids, device=inputs_embeds.device))
            return (inputs_embeds.unsqueeze(-2) == embeds).all(-1).any(-1)
        return None

    @staticmethod
    def token_count(model: nn.Module, input_ids: Tensor | None, kwargs: dict[str, Any], token_id: int) -> Tensor:
        """[B] how many of each sample's real tokens (its attention mask's) are `token_id`, from its ids or, without
        them, its embeddings."""
        if input_ids is not None:
            found = input_ids == token_id
        else:
            embeds = kwargs["inputs_embeds"]
            token = model.get_input_embeddings()(torch.tensor(token_id, device=embeds.device))
            found = (embeds == token).all(-1)
        mask = kwargs.get("attention_mask")
        return (found if mask is None else found & mask.bool()).sum(1)

    def video_frames(self, model: nn.Module, input_ids: Tensor | None, kwargs: dict[str, Any]) -> Tensor | None:
        """[B] the frames of each sample's video in a forward with `input_ids` and keywords `kwargs` (0 for a sample
        whose visual block is an image, or that has none), for video methods (`DecoderCut.frames`); None where the
        family takes no videos."""
        return None

    # -- positions -----------------------------------------------------------------------------------------------
    def positions(self, mask: Tensor, position_ids: Tensor | None) -> Tensor:
        """The prompt's positions [..., B, L] from its real-token mask [B, L] and the ids the model was given."""
        raise NotImplementedError

    def renumbered(self, first: Tensor, length: int) -> Tensor:
        """Positions [..., length] of a sample renumbered after a cut, from its first token's position [...]."""
        raise NotImplementedError

    def merged_position(self, block: Tensor) -> Tensor:
        """The position [...] of the merged tokens of a cut in a family that keeps positions, from the positions
        [..., n] of the visual block they come from."""
        raise ValueError("merged tokens have no original position: this policy must renumber positions")

    def next_position(self, positions: Tensor) -> Tensor:
        """The position [..., B] the token after a prompt with `positions` [..., B, L] takes: one past its last
        (the prompt ends with text; M-RoPE's text positions are equal on all three axes)."""
        return positions[..., -1] + 1

    def continued(self, next_position: Tensor, steps: int) -> Tensor:
        """Positions [..., B, steps] of `steps` new tokens in decode, the first at `next_position` [..., B]."""
        return next_position.unsqueeze(-1) + torch.arange(steps, device=next_position.device)

    def rotary(self, lm: nn.Module, hidden: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """The rotary embeddings (cos, sin), each [B, L, head_dim], the decoder layers take for `positions`."""
        return lm.rotary_emb(hidden, positions)

    @staticmethod
    def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """RoPE on queries or keys x [B, H, L, hd] with their rows of (cos, sin) [B, L, hd], as the attention does.

        transformers' rotate-half form, shared by the Llama and Qwen2 decoders (whose rotary embedding already
        folds M-RoPE's sections into cos/sin); a family whose attention rotates otherwise overrides it.
        """
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return (x * cos) + (rotate_half(x) * sin)

    # -- benchmark inputs ----------------------------------------------------------------------------------------
    #: prompt tokens before the image in the example prompt (LLaVA: BOS + Vicuna system prompt + "USER:")
    text_before_image: int = 35

    def example_inputs(self, config: Any, text_tokens: int, generator: torch.Generator,
                       image_size: tuple[int, int] | None = None) -> dict[str, Tensor]:
        """One prompt with one random image as the model takes it (the latency benchmark, the FLOPs proxy): BOS,
        text, the image's placeholders, text (`text_tokens` random non-visual tokens in all), batch of one;
        image_size as for `example_image`."""
        text_config = config.text_config
        text = torch.randint(3, min(config.image_token_id, text_config.vocab_size), (text_tokens,),
                             generator=generator)
        text[0] = 1 if text_config.bos_token_id is None else text_config.bos_token_id
        before = min(self.text_before_image, text_tokens)
        placeholders, pixels = self.example_image(config, generator, image_size)
        ids = torch.cat([text[:before], torch.full((placeholders,), config.image_token_id), text[before:]])
        return {"input_ids": ids[None], "attention_mask": torch.ones(1, ids.numel(), dtype=torch.long), **pixels}

    def example_image(self, config: Any, generator: torch.Generator,
                      size: tuple[int, int] | None = None) -> tuple[int, dict[str, Tensor]]:
        """One random image as the model takes it (for the latency benchmark): how many placeholder tokens it
        fills in the prompt, and its pixel inputs (batch of one). size: the image's (height, width) where the
        family's token count depends on it (anyres grids); None for the family's default benchmark image."""
        raise NotImplementedError

    # -- the encoder cut ---------------------------------------------------------------------------------------
    def images(self, model: nn.Module, pixel_values: Tensor, args: tuple, kwargs: dict[str, Any]) -> Images:
        """The images of a `get_image_features(pixel_values, *args, **kwargs)` call, with the model's defaults."""
        raise NotImplementedError

    def visual_inputs(self, model: nn.Module, modality: str, args: tuple, kwargs: dict[str, Any]) -> Images:
        """The images (or videos) of a call `feature_functions[modality](*args, **kwargs)`; hosts with images only
        need `images`."""
        if modality != "image":
            raise NotImplementedError(f"{type(self).__name__} encodes images only, not {modality}")
        pixel_values, args = (args[0], args[1:]) if args else (kwargs["pixel_values"], ())
        return self.images(model, pixel_values, args, {k: v for k, v in kwargs.items() if k != "pixel_values"})

    def image_groups(self, images: Images) -> list[Images]:
        """The images in the groups whose tower outputs one encoder view holds (equal token counts): all at once,
        unless the token count varies per image."""
        return [images]

    def encoder_view(self, model: nn.Module, images: Images, eager_encoder: bool = False,
                     scan_layers: tuple[int, ...] = (), received: bool = False,
                     merge: Callable[[int, Tensor, Tensor], Tensor] | None = None) -> "EncoderView":
        """Run the vision tower on every crop and show the feature layer to an encoder-side policy.

        Token 0 of the view's importance row is CLS where the tower has one; a tower without CLS gives the mean
        attention each token receives instead. Frames of a video are crops of one sample. `eager_encoder`: run the tower
        with eager attention and read the importance from its attention probabilities, as official code that asks
        for `output_attentions` computes them (bit-identical features and rows), instead of the tower's own
        attention with the rows recomputed. `scan_layers`: further tower layers whose importance rows the view
        carries (`EncoderView.importance_at`). `received`: the view also carries the attention each token receives
        at every tower layer (`EncoderView.received`), from the eager probabilities or recomputed on demand.
        `merge`: `Policy.merge_in_tower`, run inside every tower layer up to the feature layer where the tower
        supports it (the view then says `merged_in_tower`); a tower that does not ignores it.
        """
        raise NotImplementedError

    def tower_attention(self, model: nn.Module, images: Images, encode: Callable[[], Any]) -> tuple[Any, list[Tensor]]:
        """Run `encode()`, the host's own encoding of `images` (its tower runs once, on all of them), observing the
        tower as it runs: returns what `encode` returned and, per group of `image_groups(images)`, the attention each
        tower token of each crop received at the layer `encoder_view` scores by [N, T] (mean over heads, then over
        every query of its crop), for decoder-side policies that read it (`Policy.tower_attention`)."""
        raise NotImplementedError

    def tower_output(self, model: nn.Module, images: Images,
                     output: ModelOutput) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """What the vision tower itself gave for `images` in the host's feature-function call that returned
        `output`: its output at the feature layer for every crop [N, T, D] (what the model projects, before any
        pooling), and the host's pooling of rows over those tokens [N, T] into rows over each crop's visual tokens, as
        `lay_out` takes them (`Policy.read_tower`)."""
        raise NotImplementedError(f"{type(self).__name__}'s adapter does not show its vision tower's own output to "
                                  "decoder-side methods (`Family.tower_output`)")

    def encoder_output(self, features: list[Tensor], side: list[Tensor] | None) -> ModelOutput:
        """What the host's image-feature function returns, from the encoder cut's features per image (and their
        side rows [slots, S, D], where the family has side features)."""
        return BaseModelOutputWithPooling(last_hidden_state=features[0], pooler_output=features)

    def side_projector(self, model: nn.Module) -> Callable[[Tensor], Tensor]:
        """The projection of an encoder view's side features [N, k, S, E] to the rows the decoder adds [N, k, S, D]
        (families whose views have `side`)."""
        raise NotImplementedError(f"{type(self).__name__} has no side features")

    def side_features(self, kwargs: dict[str, Any], visual: Tensor) -> tuple[tuple[int, ...], Tensor] | None:
        """Vectors the host adds to its visual tokens' hidden states after some decoder layers (Qwen3-VL's
        DeepStack), read from its language model's forward keywords: (those layers, rows [n, layers, D] of the n
        visual tokens that `visual` [B, L] marks, in batch then sequence order), or None where the host adds none.
        The engine carries each token's rows through the cuts and adds them after those layers (`engine.decoder`)."""

    def unsupported(self, policy: Any, modality: str) -> str | None:
        """Why this family cannot run the encoder cut of `policy` (an `engine.Policy`) on `modality`, or None: the
        engine refuses such a forward with NotImplementedError naming the reason."""
        return None

    def valid_tokens(self, model: nn.Module, images: Images, tokens: int) -> Tensor | None:
        """[N, tokens] False for tower tokens the model's own layout discards (NeXT's padding), or None."""
        return None

    def lay_out(self, model: nn.Module, images: Images, image: int, feats: Tensor, keep: Tensor, n_merged: int,
                tokens: int, native_layout: bool) -> tuple[Tensor, Tensor, int]:
        """Arrange the projected tokens of image `image` as the model's visual block.

        feats: [crops, kept + n_merged, D]; keep: [crops, kept] indices among the `tokens` tokens of a crop's
        view. Returns (tokens, their original
        indices in the model's visual-token order, -1 for tokens that are none; placeholder slots of the image).
        The tokens fill the first slots, the rest stay empty; a layout that leaves slots empty between them (a
        video whose frames lie in separate spans) returns zero rows there, with origin `core.EMPTY_SLOT`.
        """
        raise NotImplementedError

    # -- where the visual tokens come from (positional-bias maps) ------------------------------------------------
    #: the processor output that holds each image's layout, which `patch_cells` takes
    image_layout_key: str = "image_sizes"
    #: the processor output that holds each video's layout where it varies (Qwen3-VL: video_grid_thw), or None
    video_layout_key: str | None = None

    def patch_grid(self, config: Any) -> tuple[int, int]:
        """(crops, side): the patch grids of one image at the model's nominal crops (a video's frames), each
        side x side."""
        raise NotImplementedError

    def patch_cells(self, model: nn.Module, image_size: Tensor | None,
                    modality: str = "image") -> Tensor:
        """[n, 3] long: for each original visual index of one image (the model's own visual-token order, as the
        trace's `kept`), the (crop, row, col) of its patch, or -1s for a token that is no patch (CLS, newlines).

        image_size: the image's layout where it varies (the processor's `image_layout_key` row: LLaVA-NeXT's
        (height, width), Qwen2.5-VL's patch grid (t, h, w)). modality: the sample's `feature_functions` key; a
        video's frames are its crops (families that take images only never see another).
        """
        raise NotImplementedError

    # -- building (tests, latency benchmark, demo) ----------------------------------------------------------------
    def build_config(self, shape: Shape, ids: TokenIds, init_std: float = 0.02, norm_eps: float = 1e-6) -> Any:
        """The family's transformers config at `shape`, with the real checkpoints' layout otherwise."""
        raise NotImplementedError

    def build_processor(self, tokenizer: Any) -> Any:
        """The family's processor around `tokenizer`, set up as the real checkpoints' (offline, no torchvision)."""
        raise NotImplementedError

    def load_processor(self, path: str, **options: Any) -> Any:
        """The processor of a checkpoint (folder or hub id); `options` are the family's processor options
        (Qwen2.5-VL: min_pixels, max_pixels)."""
        from transformers import AutoProcessor

        if options:
            raise TypeError(f"{type(self).__name__} takes no processor options, got {', '.join(options)} "
                            "(min_pixels / max_pixels apply to dynamic-resolution models: Qwen2.5-VL)")
        return AutoProcessor.from_pretrained(path)

