"""VScan's policy: a global and local scan with merging in the vision encoder, then text-guided pruning mid-LLM.

As the official code (github.com/Tencent/SelfEvolvingAgent a82450e, VScan/: `LlavaMetaForCausalLM.encode_images`,
`window_cls_selection`, `token_merging` in llava/model/llava_arch.py, the LLM stage in modeling_llama_x.py; every
shipped LLaVA-1.5 script: `--visual_token_num 96 --layer_list [16] --image_token_list [32]`) does it on LLaVA-1.5
(methods.md section 11.2):
- encoder stage, T tokens out of the tower: the local scan keeps int(T/2) // 16 patches in each of the 16 row-major
  6 x 6 windows by the head-mean [CLS] attention of CLIP layer 5; the global scan takes the top T - int(T/2) by the
  head-mean [CLS] attention of the feature layer (22), the local picks zeroed;
- every other patch is merged into its most cosine-similar kept token (`F.cosine_similarity` on the PROJECTED
  features, first index on ties); a kept token becomes (itself + its members) / (1 + members), in raster order
  (on Qwen3-VL, which the official code does not cover, a kept token carries its own DeepStack rows only: its
  members' rows are not averaged in, since the merge happens after the projector, outside `Selection.weights`);
- LLM stage, before decoder layer 16: the last prompt token's attention at layer 16's own q/k (RoPE on the
  contiguous positions, softmax over all keys, head mean) keeps the top `keep` in order, no merging; positions are
  renumbered and decoding continues at each layer's own cache length.

Budget: the mean visual tokens over the decoder layers. The scripts' 96 -> 32 is budget 64; 128 and 192 follow the
same 3:1 rule (methods.md): T = 1.5 x budget out of the encoder, keep = budget / 2 after layer 16 (`tokens=`,
`keep=` set them by hand). The merge assignments sit close to float32 noise on the parity model, so by default
(`eager_encoder=True`) the tower runs eager and the cosine is the official `F.cosine_similarity`, bit-identical to the
official run; `eager_encoder=False` keeps the tower's SDPA and compares normalised vectors by one product (faster, less
memory; a few assignments may differ).

Where int(T/2) is not a multiple of the 16 windows (not at the scripts' T = 96, nor at 192 and 288), the official
code keeps fewer than T tokens: the global scan still takes T - int(T/2). By default (`fill=True`) it takes what
the windows leave instead, so T tokens leave the encoder at every budget (identical at the official settings);
`fill=False` reproduces the official arithmetic (the budget then counts the tokens it really keeps).

Other models (the official code: LLaVA-NeXT and Qwen2.5-VL read, not run; no Video-LLaVA code): the same rule per
crop or frame (4 x 4 windows of near-equal bands on any grid; the shallow layer at the same relative depth of the
tower, 5 of CLIP's 23 layers up to the feature layer, block 7 of Qwen2.5-VL's 32: its official choice), T and keep
scaled to each sample's own visual tokens, LLaVA-NeXT's kept tokens in the model's own layout with image-newline
tokens. Differences from the official readings, by design: on LLaVA-NeXT the official LLM stage prunes only the
first 96 visual tokens (the base image) and scores with a visual row; on Qwen2.5-VL it scores without RoPE and
caps the local picks greedily per window. Here the LLM stage is the LLaVA-1.5 rule on every model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from visiondrop.engine import DecoderCut, EncoderView, Policy, Selection, complement, topk_in_order
from visiondrop.engine.attention import gather_rows
from visiondrop.engine.scoring import text_last_token
from visiondrop.core import Cut, ModelInfo
from visiondrop.methods import Method, Overhead

WINDOWS = 4  # windows per side: the official 6 x 6 windows of a 24 x 24 grid
SHALLOW, FEATURE_DEPTH = 5, 23  # the local scan's CLIP layer, of the 23 up to LLaVA's feature layer
LLM_LAYER = 16  # of a 32-layer decoder


def window_picks(scores: Tensor, grid: tuple[int, int], per_window: int) -> Tensor:
    """[N, WINDOWS^2 x per_window]: the top `per_window` of `scores` [N, rows x cols] in each window (row-major
    windows, topk order inside), as raster indices."""
    rows, cols = grid
    index = torch.arange(rows * cols, device=scores.device).view(rows, cols)
    picks = []
    for band in torch.tensor_split(index, WINDOWS, dim=0):
        for window in torch.tensor_split(band, WINDOWS, dim=1):
            flat = window.reshape(-1)
            picks.append(flat[scores[:, flat].topk(min(per_window, flat.numel()), dim=1).indices])
    return torch.cat(picks, dim=1)


def merge_into_nearest(projected: Tensor, kept: Tensor, official_cosine: bool = True) -> Tensor:
    """[N, k, D]: the kept rows of `projected` [N, P, D] (ascending indices `kept` [N, k]), each averaged with the
    other rows whose most cosine-similar kept row it is (`official_cosine`: the official `F.cosine_similarity` on the
    official shapes, else one product of normalised vectors). Gathers by index, in ascending order as the official
    boolean masks select, so that nothing is read back to the host."""
    retained = gather_rows(projected, kept)
    others = gather_rows(projected, complement(kept, projected.shape[1]))
    if others.shape[1] == 0:
        return retained
    if official_cosine:
        cosine = F.cosine_similarity(others.unsqueeze(2), retained.unsqueeze(1), dim=3)
    else:
        cosine = F.normalize(others, dim=-1) @ F.normalize(retained, dim=-1).transpose(1, 2)
    nearest = cosine.argmax(dim=2)
    merged = torch.zeros_like(retained) + retained
    merged.scatter_add_(1, nearest.unsqueeze(-1).expand(-1, -1, projected.shape[2]), others)
    count = torch.zeros(kept.shape, dtype=torch.int, device=projected.device)
    count.scatter_add_(1, nearest, torch.ones_like(nearest, dtype=torch.int))
    return merged / (1 + count.unsqueeze(2))


class VScan(Policy):
    name = "vscan"

    def __init__(self, info: ModelInfo, tokens: int, keep: int, layer: int, shallow_layer: int, eager_encoder: bool,
                 fill: bool):
        self.info, self.tokens, self.keep, self.fill = info, tokens, keep, fill
        # tokens leaving the encoder per crop: the official arithmetic loses some where int(T/2) is no multiple of 16
        local = int(tokens * 0.5)
        self.out = tokens if fill else WINDOWS ** 2 * (local // WINDOWS ** 2) + tokens - local
        self.encoder_layer, self.scan_layers, self.cut_layers = info.vision_layer, (shallow_layer,), (layer,)
        self.eager_encoder = self.native_layout = eager_encoder

    def select_encoder(self, view: EncoderView) -> Selection:
        first = int(view.has_cls)
        tokens = view.scaled(self.tokens)
        shallow = view.importance_at[self.scan_layers[0]][:, :, first:].mean(dim=1)
        deep = view.importance[:, :, first:].mean(dim=1).clone()
        patches = deep.shape[1]
        grid = view.grid or (round(patches ** 0.5),) * 2
        n_local = int(tokens * 0.5)
        local = window_picks(shallow, grid, n_local // WINDOWS ** 2)
        deep.scatter_(1, local, 0.0)
        n_global = tokens - (local.shape[1] if self.fill else n_local)
        chosen = torch.cat([local, deep.topk(n_global, dim=1).indices], dim=1)
        kept = chosen.sort(dim=1).values
        projected = view.project(view.hidden[:, first:])
        # crop by crop: the official cosine materialises [dropped, kept, D] (at LLaVA's width 0.75 GB a crop)
        merged = torch.cat([merge_into_nearest(p[None], k[None], self.eager_encoder) for p, k in zip(projected, kept)])
        return Selection(kept + first, features=merged)

    def select_decoder(self, cut: DecoderCut) -> Selection:
        scores = text_last_token(cut, cut.layer_idx)  # the cut layer's own q/k, the last prompt token
        # `keep` is the nominal image's, out of its `out` tokens per crop from the encoder stage
        return Selection(topk_in_order(scores, cut.scaled(self.keep, self.out * self.info.crops)))

    def describe(self) -> dict:
        (layer,), n_layers = self.cut_layers, self.info.n_layers
        tokens = self.out * self.info.crops
        return {"method": self.name, "encoder_layer": self.encoder_layer, "shallow_layer": self.scan_layers[0],
                "tokens": tokens, "layers": [layer], "keep": self.keep, "eager_encoder": self.eager_encoder, "fill": self.fill,
                "equivalent_tokens": (layer * tokens + (n_layers - layer) * self.keep) / n_layers}


def policy(info: ModelInfo, budget: float | None = None, tokens: int | None = None, keep: int | None = None,
           layer: int = LLM_LAYER, shallow_layer: int | None = None, eager_encoder: bool = True, fill: bool = True) -> Policy:
    """VScan at `budget` (T = 1.5 x budget out of the encoder, per crop on LLaVA-NeXT; keep = budget / 2 from
    `layer` on, given for a 32-layer decoder and mapped by relative depth), or explicit `tokens` (T per image, the
    scripts' visual_token_num) and `keep` (image_token_list). shallow_layer: the local scan's tower layer (default
    5 of CLIP's 23 up to the feature layer, at that relative depth elsewhere); eager_encoder, fill: module docstring."""
    if tokens is None or keep is None:
        if budget is None:
            raise ValueError("VScan needs a budget (or tokens= and keep=: visual_token_num and image_token_list)")
        if budget < smallest_budget(info):
            raise ValueError(f"VScan cannot reach budget {budget:g}: it keeps budget / 2 tokens after its LLM cut, at "
                             f"least one, so the smallest reachable budget is {smallest_budget(info):g}")
        tokens = tokens if tokens is not None else round(1.5 * budget)
        keep = keep if keep is not None else round(budget / 2)
    per_crop = max(1, round(tokens / info.crops))
    if not 1 <= keep <= per_crop * info.crops or per_crop > info.per_crop - 1:
        raise ValueError(f"VScan keeps 1 <= keep <= tokens < {info.n_visual} tokens (tokens {tokens}, keep {keep}): "
                         f"the smallest reachable budget is {smallest_budget(info):g}")
    (layer,) = info.relative_layers([layer], "VScan layer (its LLM cut)")
    shallow = SHALLOW if shallow_layer is None else shallow_layer
    if shallow_layer is None:
        shallow = round(SHALLOW * (info.vision_layer + 1) / FEATURE_DEPTH)
    if not 0 <= shallow <= info.vision_layer:
        raise ValueError(f"VScan shallow_layer must be a tower layer up to the feature layer {info.vision_layer}, "
                         f"got {shallow}")
    return VScan(info, per_crop, keep, layer, shallow, bool(eager_encoder), bool(fill))


def smallest_budget(info: ModelInfo) -> float:
    """Budget 2: 3 tokens out of the encoder (at least one per crop), 1 after the LLM cut."""
    return 2


def merge_macs(cut: Cut, width: int) -> int:
    """The merge at the encoder stage (CLS not among the patches): the cosine of every dropped patch against every
    kept one, and its sum into its nearest, on the projected tokens."""
    dropped = cut.before - 1 - cut.kept
    return dropped * cut.kept * width + dropped * width


METHOD = Method("vscan", "VScan", policy, smallest_budget,
                overhead=lambda eager_encoder=True, **_: Overhead(rows="text", projected=merge_macs,
                                                                  eager_encoder=eager_encoder),
                example_budget=64)
