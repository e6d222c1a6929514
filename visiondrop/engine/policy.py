"""What a method states (its policy) and what the engine shows it at each cut.

A policy says where it cuts, how it scores, how many tokens it keeps and whether it merges the rest. It never
touches masks, caches or positions: the engine does, the same way for every method.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..core import EncoderView, Rotate
from ..families.base import Family
from .attention import gather_rows, decoder_attention, decoder_keys


@dataclass(frozen=True)
class TowerSeen:
    """What decoder cuts see of one image's (or video's) pass through the vision tower, as its policy asks: the
    attention its tokens received at the feature layer [slots] (`Policy.tower_attention`), the policy's reading of
    the tower's own output (`Policy.read_tower`): rows [slots] and one vector per crop [crops, E]; None where not
    asked for. Rows are in the image's visual-token order (its placeholder slots), 0 in slots that hold no tower
    token (a newline)."""

    attention: Tensor | None = None
    rows: Tensor | None = None
    crops: Tensor | None = None

    def of_sample(self, tokens: int, frames: int, device: torch.device) -> "TowerSeen":
        """On `device`, of a sample whose real visual block is `tokens` tokens of `frames` frames (0: an image):
        without the slots and frames a shorter video of a batch was padded with in front
        (`families.llava_onevision.with_padded_frames`: the host scatters their tokens into the left padding)."""
        def last(x: Tensor | None, n: int) -> Tensor | None:
            return None if x is None else x[x.shape[0] - n:].to(device)

        return TowerSeen(last(self.attention, tokens), last(self.rows, tokens),
                         last(self.crops, frames or (0 if self.crops is None else self.crops.shape[0])))


@dataclass
class Selection:
    """The outcome of one cut, per sample of the group: which current visual tokens stay, and new merged ones.

    keep: [G, k] indices into the current visual block, in the order they will appear; at an encoder cut, -1
    pads a crop that keeps fewer tokens than another of the view (the crops of one image alike);
    merged: [G, c, D] tokens appended right after the kept ones (None: no merging);
    features: at an encoder cut, [G, k, D'] the kept tokens already in the LLM's embedding space (the policy's own
    use of `EncoderView.project`, e.g. merged after the projector), instead of the projector on the kept rows; at a
    decoder cut, [G, k, D] the kept tokens' new hidden states, where tokens are merged into kept ones that keep
    their place (FastVID's anchors; their `weights` are then [G, k + c, n], every kept token's and merged one's);
    slots: decoder cuts, [G, k + c] per token, the current visual slot whose position it takes where positions are
    kept (not renumbered), -1 for the family's merged position (None: the kept tokens their own, merged tokens -1),
    for methods whose merged tokens stand for a place (a cluster's centre);
    weights: [G, c, n] how each merged token combines the n current visual tokens (merged = weights @ their
    vectors), so that the features that travel with the tokens (`Family.side_features`: Qwen3-VL's DeepStack
    rows) merge alike; a policy that merges before the host's last side-feature layer must give them.
    At decoder cuts keep, merged, weights, features and slots may each be a list of G rows instead, where the
    samples keep different counts (methods whose counts depend on the content), and keep may be a boolean mask [G, n] over the current
    visual tokens (those kept, in their order), so that a policy whose counts depend on the content reads no count
    on the host (the engine turns it into indices, `indices`);
    trailing: decoder cuts, the last `trailing` entries of each sample's keep are laid out after its merged tokens
    instead of before them (a video's tokens after its frames, `DecoderCut.trailing`, which a merging video method
    keeps after what it made of the frames, as LLaVA-NeXT appends its newline after them).
    """

    keep: Tensor | list[Tensor]
    merged: Tensor | list[Tensor] | None = None
    weights: Tensor | list[Tensor] | None = None
    features: Tensor | list[Tensor] | None = None
    slots: Tensor | list[Tensor] | None = None
    trailing: int = 0
    #: decoder cuts, [G, c] which merged tokens are real (the others padding: a count that depends on the content,
    #: which the engine reads instead of the policy), or None: all of them; their weights and slots alike
    merged_valid: Tensor | None = None

    def indices(self) -> Tensor | list[Tensor]:
        """keep as indices: a boolean mask's kept tokens per sample (a host read, the engine's), else keep."""
        if isinstance(keep := self.keep, Tensor) and keep.dtype == torch.bool:
            return [row.nonzero()[:, 0] for row in keep]
        return keep

    def of_sample(self, g: int) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
        """Sample g's (keep indices, merged tokens, their weights, slots), the padding of `merged_valid` dropped."""
        keep = self.keep[g]
        if keep.dtype == torch.bool:
            keep = keep.nonzero()[:, 0]
        merged = None if self.merged is None else self.merged[g]
        weights = None if self.weights is None else self.weights[g]
        slots = None if self.slots is None else self.slots[g]
        if self.merged_valid is not None:
            valid = self.merged_valid[g]
            merged = merged[valid]
            weights = None if weights is None else weights[valid]
            if slots is not None:
                slots = torch.cat([slots[:keep.numel()], slots[keep.numel():][valid]])
        return keep, merged, weights, slots


@dataclass
class DecoderCut:
    """The state entering decoder layer `layer_idx`, for a group of samples with equally many visual tokens.

    Sequences are left-padded: `mask` marks real tokens, `visual` holds the sequence indices of the current
    visual tokens, ascending: one contiguous block, or several spans separated by text where the family has them
    (`Family.visual_spans`: Qwen3-VL's video frames between timestamps). `prev_hidden` is what entered layer
    `layer_idx - 1` (same tokens), for methods that score with the layer that has just run. `original_visual` is
    the group's visual-token count before any reduction (its samples share it; a host int, so policies scale counts
    without reading the device); `samples` are the group's rows in the batch, and `scratch` is a dict that lives
    for one forward pass (for what a policy decides once and reuses at later cuts, keyed by sample). `cos`/`sin`
    are the rotary embeddings of the current tokens and `rotate` the model family's RoPE, for the attention rows.
    `final_norm` is the decoder's last norm (before the LM head), for methods that compare tokens in that space.
    `frames` is the group's video frames (0: its samples hold images): the original visual block is `frames` frames
    of `(original_visual - trailing) / frames` tokens each, frame after frame, then `trailing` tokens that belong to
    no frame (`Family.video_trailing`: LLaVA-OneVision's newline after the video); what video methods reduce
    (`methods.shared.video_layout`; a cut before layer 0 still sees that layout).
    `tower_attention` [G, original_visual], where the policy asks for it (`Policy.tower_attention`) and the family
    shows the tower for the modality (`Family.tower_functions`), else None: the attention each original visual
    token received at the vision tower's feature layer, mean over heads then over every query of its crop or frame
    (CLS included where the tower has one), pooled as the host pools its tokens (LLaVA-OneVision's video frames);
    0 for a visual token that is no tower token (a newline). In the original visual order (`Trace` origins).
    `tower_rows` [G, original_visual] and `tower_crops` [G, crops, E], where the policy reads the tower's own output
    (`Policy.read_tower`; else None): its rows pooled and laid out as the tower attention, and its vectors, one per
    crop (a video's frames, in order).
    """

    layer_idx: int
    layers: nn.ModuleList
    hidden: Tensor
    prev_hidden: Tensor | None
    mask: Tensor
    cos: Tensor
    sin: Tensor
    visual: Tensor
    original_visual: int
    samples: list[int]
    scratch: dict = field(default_factory=dict)
    rotate: Rotate = Family.rotate
    final_norm: nn.Module | None = None
    frames: int = 0
    trailing: int = 0
    #: the visual tokens carry side rows at this cut (`Family.side_features`): a policy that merges gives their
    #: merge weights (`Selection.weights`)
    side_rows: bool = False
    tower_attention: Tensor | None = None
    tower_rows: Tensor | None = None
    tower_crops: Tensor | None = None

    @property
    def n_visual(self) -> int:
        return self.visual.shape[1]

    def visual_rows(self, x: Tensor) -> Tensor:
        """x: [G, L, ...] -> the visual tokens' rows [G, n, ...]."""
        return gather_rows(x, self.visual)

    def attention(
        self, layer_idx: int, queries: Tensor, hidden: Tensor | None = None, keys: Tensor | None = None
    ) -> Tensor:
        """Attention probabilities [G, H, Q, L] of decoder layer `layer_idx` for the query rows `queries` [G, Q].

        `hidden` defaults to what enters the cut layer; pass `prev_hidden` to score with the previous layer.
        `keys` reuses keys from `self.keys` for the same layer and hidden states.
        """
        hidden = self.hidden if hidden is None else hidden
        return decoder_attention(self.layers[layer_idx], hidden, self.cos, self.sin, self.mask, queries, keys,
                                 self.rotate)

    def keys(self, layer_idx: int, hidden: Tensor | None = None) -> Tensor:
        """Post-RoPE keys [G, H_kv, L, hd] of decoder layer `layer_idx`."""
        hidden = self.hidden if hidden is None else hidden
        return decoder_keys(self.layers[layer_idx], hidden, self.cos, self.sin, self.rotate)

    def scaled(self, count: float, nominal: int) -> int:
        """`count` tokens out of a nominal `nominal`, scaled to this group's own original visual count.

        The identity on LLaVA-1.5 (every image has the nominal 576); on LLaVA-NeXT a sample's count follows its
        anyres grid, and counts are kept as fractions of it.
        """
        return round(count * self.original_visual / nominal)

    def last_token(self) -> Tensor:
        """Sequence index [G, 1] of the last prompt token (sequences are left-padded)."""
        return torch.full((self.hidden.shape[0], 1), self.hidden.shape[1] - 1, device=self.hidden.device)


@dataclass
class DecodeStep:
    """One decode forward after a prefill, as a policy with a decode-time KV selection sees it (`Policy.decode_layers`).

    `step` counts the decode forwards since the prefill (0: the query is the first generated token); `layers`, the
    decode layers this selection is for: those of one segment, the layers that cache the same tokens (a policy whose
    decode layers span cuts is asked once per segment). Per row of the batch: `visual`, the cached rows of its visual
    tokens at these layers (ascending; empty: no visual tokens); `kept_later`, whether each of them is still cached
    after every later decoder cut (None: no cut after these layers);
    `trailing`, how many of them (the last) are a video's tokens after its frames (`DecoderCut.trailing`); `state`,
    a dict that lives across the decode steps of one generation (what a policy remembers from step to step; it
    follows beam search's reorders). `attention`: the probabilities [B, H, q, kv] of this step's q new tokens at
    `Policy.decode_scoring_layer` over that layer's cached rows (the new ones last), as the layer computes them (the
    softmax in float32); None without a scoring layer.
    """

    step: int
    layers: tuple[int, ...]
    visual: list[Tensor]
    kept_later: list[Tensor | None]
    trailing: list[int]
    state: list[dict]
    attention: Tensor | None = None


class Policy:
    """Base class of a method's policy. The defaults describe the unpruned model."""

    name: str = "none"
    #: True: positions are renumbered contiguously after a cut; False: tokens keep their original positions.
    renumber_positions: bool = True
    #: Vision-tower layer (0-based) whose output an encoder cut reduces; None: no encoder cut.
    encoder_layer: int | None = None
    #: Decoder layers (0-based) before which the policy cuts.
    cut_layers: tuple[int, ...] = ()
    #: Encoder cut: lay the kept tokens out in the host's own layout (`Family.lay_out`; LLaVA-NeXT: unpadding
    #: and image-newline tokens) instead of the compact one of the official VisionDrop/VisionZip code.
    native_layout: bool = False
    #: Encoder cut: the vision tower runs with eager attention and the importance rows are its own attention
    #: probabilities (`Family.encoder_view(eager_encoder=True)`), bit-identical to official code that asks for
    #: `output_attentions`; for policies whose selection hangs on float ties. Default: the tower's own attention
    #: (SDPA) with the rows recomputed from one layer's q/k.
    eager_encoder: bool = False
    #: Encoder cut: the policy reads the tower's own features (`EncoderView.hidden` before the projector, e.g.
    #: CDPruner's CLIP relevance), not only its rows: a host whose view is already projected cannot serve it.
    tower_features: bool = False
    #: Encoder cut: further vision-tower layers (0-based) whose importance rows the view carries
    #: (`EncoderView.importance_at`), e.g. a shallow layer's CLS attention.
    scan_layers: tuple[int, ...] = ()

    def read_tower(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """For the modalities in `reads_tower`: from the vision tower's own output at its feature layer for the
        crops (a video's frames) of one image [N, T, D] (`Family.tower_output`: before the projector and any pooling),
        rows over each crop's tower tokens [N, T], which the engine pools and lays out as the host does its tokens,
        and one vector per crop [N, E]."""
        raise NotImplementedError(f"{self.name} reads nothing from the vision tower")

    def instruct(self, questions: list[str] | None) -> None:
        """The instruction of each sample with an image in the next forwards (the evaluation plugin passes its
        questions batch by batch); only text-conditioned policies use them (CDPruner)."""
    #: Decoder layers (0-based) that attend without the causal mask in the prefill, every query over every real token
    #: (decode steps are unaffected), as official code that ran them so (HoliTom's layer 17 under SDPA)
    bidirectional_layers: tuple[int, ...] = ()
    #: Decoder cuts see the attention each original visual token received in the vision tower
    #: (`DecoderCut.tower_attention`), for methods that rank the host's own tokens by it (HoliTom)
    tower_attention: bool = False
    #: The modalities (`Family.feature_functions` keys) whose decoder cuts see what the policy reads from the vision
    #: tower's own output at its feature layer (`read_tower`; `DecoderCut.tower_rows`, `tower_crops`), for methods
    #: that run a part of the tower the host lacks (FastVID's SigLIP pooling head, on videos)
    reads_tower: tuple[str, ...] = ()
    #: Encoder cut: the view carries the attention each token receives at any tower layer (`EncoderView.received`)
    received_attention: bool = False
    #: Encoder cut: the policy merges tokens inside the vision tower, at every layer up to `encoder_layer`
    #: (`merge_in_tower`), where the family's tower supports it (`EncoderView.merged_in_tower`)
    merges_in_tower: bool = False
    #: Encoder stage: the merge runs after each tower layer on its output (`TowerMerge.at_output`), not between its
    #: attention and its MLP
    merges_at_layer_output: bool = False

    #: Decode-time KV selection: decoder layers whose decode steps attend only to the cached visual tokens that
    #: `select_cached` chooses at each step, per segment of them (and to every other token); (): to all of them.
    decode_layers: tuple[int, ...] = ()
    #: The decoder layer whose attention from the decode queries `select_cached` sees (`DecodeStep.attention`): one
    #: before the decode layers, all of them caching the same tokens as it; None: no attention rows.
    decode_scoring_layer: int | None = None
    #: Decode-time KV selection: the visual keys `select_cached` leaves out count as evicted from the cache, so the new
    #: tokens at the decode layers take the positions that follow a cache without them (the segment's next position
    #: minus the tokens left out at that step), as official code that physically cuts its caches and positions each
    #: decode token by its layer's cache length (MustDrop); only where positions are renumbered (a policy that
    #: renumbers on a family without `fixed_positions`). False: every decode layer of a segment takes its position.
    decode_evicts: bool = False
    #: Pruned cache: decoder layers whose KV caches keep, once the prefill is done, only the visual tokens still cached
    #: after every later cut (`DecodeStep.kept_later`): the others are removed from the cache and their memory freed,
    #: each row's cache left-padded to the longest row's; the decode steps there attend to what is left, at the
    #: positions that follow the prompt (PruneVid's layers 0-10, whose official code slices their caches to what its
    #: layer-10 cut keeps). A prefill segment (the layers between two cuts) that holds any of them holds no layer of
    #: the decode-time KV selection (`decode_layers`, `decode_scoring_layer`). (): every layer keeps its cache.
    pruned_cache_layers: tuple[int, ...] = ()

    def renumbers_at(self, layer_idx: int) -> bool:
        """Whether positions are renumbered after the cut before decoder layer `layer_idx` (for methods whose cuts
        differ; default `renumber_positions`)."""
        return self.renumber_positions

    def prepare(self, cut: DecoderCut) -> None:
        """Called before decoder layer 0 with the decoder's input, for policies that decide something up front."""

    def select_encoder(self, view: EncoderView) -> Selection:
        raise NotImplementedError(f"{self.name} has no encoder cut")

    def merge_in_tower(self, layer: int, hidden: Tensor, metric: Tensor) -> Tensor:
        """Inside tower layer `layer`, between its attention and its MLP: the tokens [N, T, D] merged into fewer,
        `metric` [N, T, M] their similarity features (the layer's keys averaged over heads)."""
        raise NotImplementedError(f"{self.name} does not merge inside the vision tower")

    def select_decoder(self, cut: DecoderCut) -> Selection:
        raise NotImplementedError(f"{self.name} has no decoder cuts")

    def select_cached(self, step: DecodeStep) -> list[Tensor | None]:
        """Per row of the batch, which of its cached visual tokens (`step.visual`) the decode layers attend to at this
        step: a bool [n], or None for all of them (rows without visual tokens: None)."""
        raise NotImplementedError(f"{self.name} has no decode-time KV selection")

    def replayed_steps(self, length: int) -> list[dict[int, list[Tensor | None]]]:
        """For a prefill of `length` tokens whose last ones were generated after a recorded prompt (`Replay`): what
        `select_cached` chose at the decode step of each of them, oldest first, per segment (keyed by its first decode
        layer), so that they attend as they did with the cache; [] for a prompt."""
        return []

    def describe(self) -> dict:
        """The resolved schedule, for records and logs."""
        return {"method": self.name}
