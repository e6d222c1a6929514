"""The value types every layer shares: what a model is (`ModelInfo`, `Shape`, `TokenIds`, `Dims`), what an
encoder-side policy sees (`Images`, `EncoderView`), and what a method does to one image (`Cut`, `TokenCounts`).

The bottom of the import order (`visiondrop.LAYERS`): it imports nothing from the project.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import Tensor

#: RoPE on queries or keys: (x [B, H, L, hd], cos [B, L, hd], sin [B, L, hd]) -> rotated x
Rotate = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class ModelInfo:
    """n_visual is the nominal visual-token count of one image: the budgets' reference ("# Tokens" out of it).

    LLaVA-1.5: 576, every image. LLaVA-NeXT (anyres): `crops` crops of `n_visual / crops` patches, 2880 for the
    v1.6 grids; a sample's actual count varies with its grid, and policies scale their counts to it. Produced by
    the model's family (`Family.model_info`).
    """

    n_visual: int
    n_layers: int  # decoder layers
    vision_layer: int  # 0-based vision-tower layer whose output the model projects
    cls_kept: bool  # whether the model's own visual tokens include CLS
    crops: int = 1  # vision-tower crops per image, nominal (a video's frames)
    #: the budgets' reference is a video whose crops are its frames (Video-LLaVA): methods with a video setting
    #: use it (VisionDrop: tokens leaving its encoder cut at 3x the budget instead of 1.5x)
    video: bool = False
    #: the vision tower has a CLS token (CLIP); False for towers without (Qwen2.5-VL's)
    tower_cls: bool = True
    #: the original checkpoint of the vision tower with the pooling head the host dropped (`Family.tower_head`), or
    #: None: where a method's official code reads that head (FastVID on LLaVA-OneVision)
    tower_head: str | None = None

    @property
    def per_crop(self) -> int:
        return self.n_visual // self.crops

    def relative_layers(self, layers: Sequence[int], what: str, lowest: int = 1, spare: int = 0,
                        reference_layers: int = 32) -> tuple[int, ...]:
        """Map increasing cut layers given for a 32-layer decoder (LLaVA-7B) onto this decoder by relative depth.

        `what` names the option in errors; a method cuts from layer `lowest` on and leaves its last `spare` layers
        uncut. Each layer goes to round(layer * n_layers / 32); where a shallow decoder rounds neighbours together
        (or below `lowest`), a cut moves to the next free layer, so the cuts stay distinct and ordered ([2, 8, 16]
        -> [1, 2, 3] on 4 layers). The identity on 32 layers. Every method's schedule goes through this; the
        mapped layers are in its `describe()` and in the run's trace.
        """
        top = reference_layers - 1 - spare
        if not layers or list(layers) != sorted(set(layers)) or not all(lowest <= layer <= top for layer in layers):
            raise ValueError(f"{what} must be one or more increasing layers from {lowest} to {top} (of a "
                             f"{reference_layers}-layer decoder, mapped by relative depth), got {list(layers)}")
        mapped, previous = [], lowest - 1
        for layer in layers:
            previous = max(round(layer * self.n_layers / reference_layers), previous + 1)
            mapped.append(previous)
        if mapped and mapped[-1] > self.n_layers - 1 - spare:
            raise ValueError(f"{what} {list(layers)} do not fit this {self.n_layers}-layer decoder: {len(mapped)} "
                             f"distinct cuts from layer {lowest} on need {lowest + len(mapped) + spare} layers")
        return tuple(mapped)


@dataclass(frozen=True)
class Shape:
    """Widths and depths of a model to build: the decoder's, then the vision tower's."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_heads: int
    kv_heads: int | None = None  # decoder key-value heads where they are fewer than the heads (grouped queries)
    head_dim: int | None = None  # decoder head width where it is not hidden / heads (Qwen3-VL-30B-A3B: 128)


@dataclass(frozen=True)
class TokenIds:
    """The vocabulary size and special token ids a built config carries."""

    vocab: int
    image: int
    bos: int
    eos: int
    pad: int
    special: dict[str, int] = field(default_factory=dict)  # ids of the family's `special_tokens`


#: the origin of a placeholder slot that an encoder cut leaves empty (`Family.lay_out`), dropped before the decoder
EMPTY_SLOT = -2


@dataclass
class Images:
    """The images of one image-feature call, split as the family's vision tower takes them.

    pixels: [N, ...] every crop (or frame) of every image, one batch for the tower; crops: how many belong to
    each image (frames to each video), in order; sizes: each image's (height, width) where the layout depends on
    it (anyres), or its patch grid (t, h, w) (Qwen2.5-VL's image_grid_thw), else None; modality: the
    `Family.feature_functions` key of the call ("image", "video"); padded: how many of each video's first frames
    only pad it to the batch's frame count (a host that takes a batch's videos as one tensor: LLaVA-OneVision's
    `with_padded_frames`), or None where none are.
    """

    pixels: Tensor
    crops: list[int]
    feature_layer: int
    select_strategy: str
    sizes: Tensor | None = None
    modality: str = "image"
    padded: list[int] | None = None


@dataclass
class EncoderView:
    """One vision-tower layer as an encoder-side policy sees it, for a batch of images (or crops).

    With `has_cls`, token 0 is CLS and tokens 1.. are the patches in raster order; without (towers with no CLS,
    e.g. Qwen2.5-VL's), every token is a patch (or a merged group of patches) in raster order.
    hidden: [N, T, D] the layer's output (the features the model would project);
    importance: [N, H, T] per head, the attention each token receives: the CLS query's attention probabilities
    where the tower has CLS, else the mean attention it receives from all tokens (the paper's rule for towers
    without CLS);
    keys: [N, H, T, hd] that layer's keys (before scaling);
    valid: [N, T] False for tokens the model's own layout discards (LLaVA-NeXT padding, when the policy keeps
    that layout), or None: a policy should not spend its budget on them;
    share: these images' visual tokens as a share of the nominal image's (`ModelInfo.per_crop`), by which a
    policy's per-image counts scale: 1 where every image has the nominal count (LLaVA), the image's own tokens
    over the nominal ones under dynamic resolution (Qwen2.5-VL);
    importance_at: the importance rows [N, H, T] of further tower layers the policy asks for
    (`Policy.scan_layers`), by layer;
    project: the model's projector on [N, k, D] rows of `hidden` (the LLM's embedding space), for policies that
    compare or merge tokens there; the engine sets it;
    grid: (rows, cols) of the patch tokens (after CLS) where they are not a square grid, else None;
    owners: [N] which image of the forward (0, 1, ... in the order of the samples with images) each row is a crop
    of; the engine sets it, for policies conditioned on each sample's own text (`Policy.instruct`), or that keep
    state per image (MustDrop's key set and thresholds);
    padded: [N] whether each row only pads a shorter video to the batch's frame count (`Images.padded`): its tokens
    land in the row's left padding and never reach the decoder, so a policy that keeps state per video (MustDrop)
    takes it from the other rows, the video's real frames; the engine sets it (None: no row is padding).
    received: for policies that ask (`Policy.received_attention`), tower layer (0-based) -> [N, T] the attention
    each token receives there, mean over the heads, then over every query (HiPrune's "global attention"), CLS
    included where the tower has it; computed on demand;
    merged_in_tower: the tower merged tokens inside (`Policy.merge_in_tower`): `hidden` has fewer tokens, in the
    merges' order, and `importance`/`keys` describe the feature layer's input, before its own merge;
    `tokens` is then what the tower started with (else None: `hidden`'s count);
    projected: `hidden` is already the model's visual tokens, projected (a host that pools after its projector:
    LLaVA-OneVision's video frames), so the engine does not project what the policy keeps;
    side: [N, T, S, E] features that travel with each token to the decoder (`Family.side_features`: Qwen3-VL's
    DeepStack vectors, before their own mergers), or None; the engine selects and merges them as the tokens, and
    projects them with `Family.side_projector`. Policies do not read them.
    """

    hidden: Tensor
    importance: Tensor
    keys: Tensor
    valid: Tensor | None = None
    has_cls: bool = True
    share: float = 1.0
    projected: bool = False
    importance_at: dict[int, Tensor] = field(default_factory=dict)
    project: Callable[[Tensor], Tensor] | None = None
    grid: tuple[int, int] | None = None
    owners: list[int] | None = None
    padded: list[bool] | None = None
    received: Callable[[int], Tensor] | None = None
    merged_in_tower: bool = False
    tokens: int | None = None
    side: Tensor | None = None

    def scaled(self, count: int) -> int:
        """A per-image `count` of the nominal image, scaled to these images' tokens (the identity at share 1)."""
        return count if self.share == 1 else round(count * self.share)


@dataclass(frozen=True)
class TowerMerge:
    """A policy's merge inside the vision tower (`Policy.merge_in_tower`: (layer, tokens [N, T, D], metric) -> fewer
    tokens) and where it runs in each layer: between the attention and the MLP with the keys averaged over heads as
    the metric (ToMe), or with `at_output` after the whole layer, on its output, which is then the metric too
    (MustDrop's spatial merge)."""

    merge: Callable[[int, Tensor, Tensor], Tensor]
    at_output: bool = False

    def __call__(self, layer: int, hidden: Tensor, metric: Tensor) -> Tensor:
        return self.merge(layer, hidden, metric)


@dataclass(frozen=True)
class Dims:
    """The sizes the FLOPs depend on."""

    hidden: int  # decoder width d
    intermediate: int  # decoder MLP width m (SwiGLU: gate, up, down)
    n_layers: int
    vocab: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int  # all of them run
    vision_heads: int
    vision_tokens: int  # per crop, CLS included (577)
    patch_size: int
    projector_in: int  # projector: projector_in -> projector_mid -> hidden
    visual_per_crop: int  # visual tokens per crop entering the decoder, unpruned (576)
    crops: int = 1  # nominal crops per image
    extra_tokens: int = 0  # non-visual tokens beside the text that no method prunes
    model_type: str = "llava"  # the family (`visiondrop.families.FAMILIES`), which builds the measuring proxy
    vision_cls: int = 1  # CLS tokens among the vision tokens (no patch embedding; 0 on Qwen2.5-VL)
    patch_channels: int = 3  # input values per pixel of a patch (Qwen2.5-VL: 3 channels x 2 frames)
    vision_mlp: int = 2  # matrices of a tower MLP (CLIP fc1, fc2; Qwen2.5-VL's gated MLP: 3)
    vision_windowed_layers: int = 0  # tower layers that attend within windows (the others: all vision tokens)
    vision_window: int = 0  # vision tokens per attention window there
    projector_mid: int | None = None  # the projector's inner width (None: the decoder's hidden)
    #: tokens per crop the projector runs on, unpruned (None: visual_per_crop; LLaVA-OneVision's video frames: all
    #: 729 patches, pooled to 196 after the projector)
    projected_per_crop: int | None = None
    #: an encoder cut without CLS projects these per patch for its rows (Qwen2.5-VL's fused qkv: 3; SigLIP: q, k)
    vision_row_projections: int = 3
    #: the nominal sample's encoder cut selects among tokens already projected (LLaVA-OneVision's pooled video
    #: frames): its merged tokens sum in the decoder's width
    encoder_projected: bool = False
    side_projectors: int = 0  # projectors of the same shape run beside it on each projected token (DeepStack: 3)
    router: int = 0  # experts a MoE router scores per token (d x experts); `intermediate` is then the routed ones'

    @property
    def n_visual(self) -> int:
        return self.visual_per_crop * self.crops


@dataclass(frozen=True)
class Cut:
    """One reduction: `layer` None is an encoder cut (one per crop), else the decoder layer it precedes.

    `before` tokens go in; `kept` of them stay and `merged` new tokens are made from the others.
    """

    layer: int | None
    before: int
    kept: int
    merged: int

    @property
    def members(self) -> int:
        """Tokens folded into the merged ones (neither kept nor serving as a merge anchor)."""
        return self.before - self.kept - self.merged


@dataclass(frozen=True)
class TokenCounts:
    """What a method does to one image: visual tokens entering each decoder layer, tokens projected, cuts."""

    tokens_per_layer: tuple[int, ...]
    projected: int | None  # None: what the unpruned model projects (`Dims.projected_per_crop` x crops)
    cuts: tuple[Cut, ...] = ()
    crops: int = 1
    newlines: int = 0  # LLaVA-NeXT image-newline tokens counted among the visual tokens (they are not "extra")
    #: the visual keys each decoder layer attends to at the first decode step, where a decode-time KV selection
    #: chooses them (`Policy.decode_layers`) or a pruned cache left fewer than the layer processed
    #: (`Policy.pruned_cache_layers`), and the layer whose attention row a selection scores with; None: every one
    #: the layer processed
    decode_keys: tuple[int, ...] | None = None
    decode_scoring: int | None = None


@dataclass(frozen=True)
class Checkpoint:
    """A released checkpoint of a family, as the FLOPs count and the latency benchmark rebuild it from a config
    (random weights: speed and FLOPs do not depend on their values). Declared by its family's adapter
    (`Family.checkpoints`); `visiondrop.families.checkpoints()` is the registry every model list derives from."""

    name: str  # as records, tables and command lines name it
    hub_id: str
    model_type: str  # its family
    shape: Shape  # its real widths and depths
    ids: TokenIds  # its vocabulary and special token ids
    norm_eps: float
    budget: float  # the paper budget efficiency runs measure it at (64 of 576 tokens, or that share)
    paper: str | None = None  # as the paper's tables name it; None: not in the paper
    extra_tokens: int = 0  # `Dims.extra_tokens` of the paper's FLOPs count (LLaVA-NeXT: 49)

    def shape_at(self, width: str) -> Shape:
        """Its shape at "full" width, "reduced" (full / 8, head dims about 64: a CPU can time it) or "tiny" (tests).
        Depths never change."""
        s = self.shape
        if width == "full":
            return s
        if width == "reduced":
            hidden, vision = s.hidden // 8, s.vision_hidden // 8
            heads = max(1, hidden // 64)
            return Shape(hidden=hidden, intermediate=round(s.intermediate / 8), layers=s.layers, heads=heads,
                         vision_hidden=vision, vision_intermediate=round(s.vision_intermediate / 8),
                         vision_layers=s.vision_layers, vision_heads=max(1, vision // 64),
                         kv_heads=None if s.kv_heads is None else max(1, s.kv_heads * heads // s.heads))
        if width == "tiny":
            return Shape(hidden=64, intermediate=172, layers=s.layers, heads=2, vision_hidden=32,
                         vision_intermediate=128, vision_layers=s.vision_layers, vision_heads=1,
                         kv_heads=None if s.kv_heads is None else 1)
        raise ValueError(f"width must be one of full, reduced, tiny; got {width!r}")
