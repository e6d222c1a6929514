"""CDPruner's policy: a conditional DPP over the visual tokens, weighted by their relevance to the instruction.

As the official code (github.com/Theia-4869/CDPruner 9541616, `LlavaMetaForCausalLM.encode_images` and
`CLIPVisionTower.forward` / `load_text_tower`, `--visual_token_num T`) does it on LLaVA-1.5 (methods.md section 11.1):
- one encoder-side cut on the layer LLaVA projects (CLIP layer -2, CLS dropped); every decoder layer sees the kept
  tokens in raster order with contiguous positions, so the budget ("# Tokens") is T;
- similarity S: the cosine of the projector outputs (`x / x.norm`, cast to float32, `x @ x.T`);
- relevance: the same patch features through CLIP's vision `post_layernorm` and `visual_projection` against the
  instruction's `text_embeds` (CLIP text tower; the instruction is the question without the answer-format suffix,
  tokenised with BOS/EOS and no truncation, zero-padded to whole 77-token segments, each segment embedded): the
  mean over segments of the NEGATED cosine, min-max normalised over all crops of the image
  (`(r - min + 1e-6) / (max - min)`);
- kernel L = diag(r) S diag(r); T steps of the fast greedy MAP (Chen et al. 2018); kept = the distinct picks.

**Quirk reproduced by default**: the greedy loop has no guard for a non-positive residual. Once the kernel's rank is
spent (a 64-wide projector on the parity model: rank <= 64; on real LLaVA not measured), sqrt gives NaN and the loop
picks tokens 0 and 1 alternately, so fewer than T distinct tokens survive. `guard=True` instead continues with the
most relevant tokens not yet picked (the kernel's diagonal), so exactly T survive. The loop runs on the device and
reads nothing back; only the quirk's count of distinct picks, which the engine needs to size the sequence, is read
once per forward where the guard is off.

**The text side** (`text_tower=`): LLaVA checkpoints hold no CLIP text tower, tokenizer or `visual_projection`; the
official code loads them from the vision tower's CLIP checkpoint (`openai/clip-vit-large-patch14-336` for
LLaVA-1.5), the default here; pass a local folder offline. It is loaded once per path and cached (float32, eager
attention, as the official run: bit-identical embeddings). The instruction is `instruction=` for every sample, or
each sample's own question from `Handle.instruct` (the evaluation plugin passes them batch by batch, with LLaVA's
"\\nAnswer the question using a single word or phrase." removed, as the official evaluation does).

**Qwen2.5-VL** has no CLIP text tower, and the repository holds LLaVA code only. `text="prompt"` (the default where
the tower has no CLS) follows the OpenVINO ports (openvino.genai's Qwen2-VL/2.5-VL inputs embedder and
openvino_contrib's `genai_opt/visual_token_pruning.py`): relevance is the negated cosine between the projected
(merged) visual tokens and the mean LLM input embedding of the prompt's other tokens (OpenVINO also leaves out the
<|vision_start|>/<|vision_end|> markers, which are kept in the mean here), similarity the cosine of the projected
tokens; it runs as a cut before decoder layer 0, on the decoder's own inputs, so it needs neither a text tower nor
the instruction. It works on every family (`text="prompt"`); it is this project's choice after OpenVINO, not an
official recipe of the authors. `theta=` gives the kernel the official (commented-out) relevance sharpening
exp(theta / (2 (1 - theta)) r), which OpenVINO's PyTorch port applies with theta = 0.5; default none, as the
official code. `dpp="split"` is OpenVINO GenAI's C++ selection for long sequences (`cdpruner.cpp`, `fast_dpp.cpp`):
the candidates cut at the middle index into two halves, each with its own kernel (relevance normalised within the
half) and half the picks; by OpenVINO's own note a speed device, not the paper's: the default is "paper".

LLaVA-NeXT: each crop (base and grid) keeps T / 5 (the official `textvqa.sh 32` keeps 32 per crop, budget 160), the
relevance normalised over all crops of the image, laid out in the model's own layout with image-newline tokens
(picks in the unpadded-away padding are lost, as official). Video-LLaVA: each frame keeps its share; its tower is
LanguageBind's, whose text side is not OpenAI CLIP's: pass a matching `text_tower=`, or use `text="prompt"`.
"""
from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass
import torch
from torch import Tensor, nn

from visiondrop.engine import DecoderCut, EncoderView, Policy, Selection
from visiondrop.engine.attention import gather_rows
from visiondrop.core import ModelInfo
from visiondrop.methods import Method, Overhead
from visiondrop.methods.shared import quiet_loading, whole_count

#: The CLIP checkpoint whose text side the official code loads for LLaVA-1.5 (its vision tower's)
DEFAULT_TEXT_TOWER = "openai/clip-vit-large-patch14-336"
TEXTS = ("clip", "prompt")
DPPS = ("paper", "split")


@dataclass(frozen=True)
class TextTower:
    """A CLIP checkpoint's text side and the vision side's head: what CDPruner needs beyond the LLaVA model."""

    tokenizer: object
    text: nn.Module  # CLIPTextModelWithProjection
    post_layernorm: nn.Module
    visual_projection: nn.Module

    def text_embeds(self, instruction: str, device: torch.device) -> Tensor:
        """[segments, C]: the instruction in whole 77-token segments, zero-padded, each segment's `text_embeds`."""
        width = self.text.config.max_position_embeddings
        tokens = self.tokenizer(text=instruction, return_tensors="pt")
        segments = (tokens.input_ids.shape[1] - 1) // width + 1
        padding = width * segments - tokens.input_ids.shape[1]
        inputs = {k: torch.cat([v, v.new_zeros(v.shape[0], padding)], dim=1).reshape(-1, width).to(device)
                  for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        self.text.to(device)
        return self.text(**inputs).text_embeds

    def image_embeds(self, patches: Tensor) -> Tensor:
        """[N, P, C]: the patch features through the vision side's post-layernorm and projection (in float32)."""
        self.post_layernorm.to(patches.device), self.visual_projection.to(patches.device)
        return self.visual_projection(self.post_layernorm(patches.float()).float())


@functools.cache
def load_text_tower(path: str) -> TextTower:
    """The text tower, tokenizer and vision head of the CLIP checkpoint `path` (a folder or hub id), once."""
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    try:
        with quiet_loading():  # a full CLIPModel folder holds the other side's weights too
            tokenizer = AutoTokenizer.from_pretrained(path)
            text = CLIPTextModelWithProjection.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
            vision = CLIPVisionModelWithProjection.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as error:
        raise OSError(
            f"CDPruner could not load its CLIP text tower text_tower={path!r} ({error}). It needs a CLIP checkpoint "
            "with a text tower, tokenizer and visual_projection matching the model's vision tower (for LLaVA-1.5: "
            f"{DEFAULT_TEXT_TOWER}): download it and pass text_tower=<local folder>, or use text='prompt'") from error
    return TextTower(tokenizer, text.eval(), vision.vision_model.post_layernorm.eval(), vision.visual_projection.eval())


def relevance(image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
    """[N, P]: the mean over the text rows of the negated cosine, min-max normalised over all N crops together."""
    image = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    text = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    scores = (-torch.matmul(image, text.t())).mean(dim=-1)
    return (scores - scores.min() + 1e-6) / (scores.max() - scores.min())


def conditional_kernel(projected: Tensor, relevance: Tensor, theta: float | None = None) -> Tensor:
    """[N, P, P]: diag(r) S diag(r), S the cosine of the projected tokens [N, P, D] in float32."""
    unit = (projected / projected.norm(dim=-1, keepdim=True)).float()
    similarity = torch.matmul(unit, unit.transpose(1, 2))
    if theta is not None:
        relevance = torch.exp(theta / (2 * (1 - theta)) * relevance)
    return relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1)


def greedy_map(kernel: Tensor, steps: int, guard: bool = False) -> Tensor:
    """[B, steps]: the fast greedy MAP picks of the DPP with kernel [B, N, N], in pick order (the official loop).

    Without `guard`, a non-positive residual gives NaN and the picks that follow are 0 and 1 alternately (the
    official quirk); with it, a row whose residuals are spent picks its most relevant unpicked token instead.
    """
    batch, n = kernel.shape[:2]
    rows = torch.arange(batch, device=kernel.device)
    cis = torch.zeros((steps, batch, n), device=kernel.device)
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    diagonal = di2s.clone()
    picks = torch.empty((steps, batch), dtype=torch.long, device=kernel.device)
    for i in range(steps):
        j = torch.argmax(di2s, dim=-1)
        if guard:
            spent = ~(di2s[rows, j] > 0)  # NaN included
            j = torch.where(spent, diagonal.argmax(dim=-1), j)
        picks[i] = j
        eis = (kernel[rows, j] - torch.einsum("tb,tbn->bn", cis[:i, rows, j], cis[:i])) \
            / torch.sqrt(di2s[rows, j]).unsqueeze(-1)
        if guard:
            eis = eis.masked_fill(spent.unsqueeze(-1), 0.0)
            diagonal[rows, j] = -float("inf")
        cis[i, :, :] = eis
        di2s -= torch.square(eis)
        di2s[rows, j] = -float("inf")
    return picks.t()


def distinct_sorted(picks: Tensor, n: int, distinct: bool) -> Tensor:
    """[B, k]: each row's distinct picks among `n` candidates ascending, -1 after them where a row has fewer than
    the longest. `distinct`: the picks are known to be distinct (the guarded loop), so k is their count; otherwise
    (the official loop's NaN quirk repeats picks) k is read from the device, once."""
    if distinct:
        return picks.sort(dim=1).values
    mask = torch.zeros(picks.shape[0], n, dtype=torch.bool, device=picks.device)
    mask.scatter_(1, picks, True)
    k = int(mask.sum(1).max())
    index = torch.arange(n, device=picks.device).expand_as(mask)
    ordered = torch.where(mask, index, n).sort(dim=1).values[:, :k]
    return ordered.masked_fill(ordered == n, -1)


def dpp_selection(projected: Tensor, relevance_of: Callable[[slice], Tensor], steps: int, guard: bool,
                  theta: float | None, dpp: str) -> Tensor:
    """[N, k]: the distinct picks of each row, ascending (-1 padded), of the DPP over the projected tokens [N, P, D]
    with relevance `relevance_of(part)` [N, P'] for the tokens `part`. dpp="paper": one kernel over all P; "split"
    (OpenVINO GenAI's): the tokens cut at P // 2 into two halves with a kernel each (relevance normalised within
    the half), steps // 2 picks in the first and the rest in the second."""
    n = projected.shape[1]
    if dpp == "paper":
        picks = greedy_map(conditional_kernel(projected, relevance_of(slice(None)), theta), steps, guard)
        return distinct_sorted(picks, n, guard)
    half = n // 2
    first = greedy_map(conditional_kernel(projected[:, :half], relevance_of(slice(0, half)), theta), steps // 2, guard)
    second = greedy_map(conditional_kernel(projected[:, half:], relevance_of(slice(half, None)), theta),
                        steps - steps // 2, guard)
    return distinct_sorted(torch.cat([first, second + half], dim=1), n, guard)


class CDPruner(Policy):
    name = "cdpruner"

    def __init__(self, info: ModelInfo, per_crop: int, text: str, text_tower: str, instruction: str | None,
                 guard: bool, theta: float | None, eager_encoder: bool, dpp: str):
        self.info, self.per_crop, self.text, self.text_tower, self.dpp = info, per_crop, text, text_tower, dpp
        self.instruction, self.guard, self.theta = instruction, guard, theta
        self.questions: list[str] | None = None
        if text == "clip":
            self.encoder_layer, self.eager_encoder, self.native_layout = info.vision_layer, eager_encoder, True
            self.tower_features = True  # CLIP's post_layernorm and visual_projection on the tower's own features
        else:
            self.cut_layers = (0,)

    def instruct(self, questions: list[str] | None) -> None:
        self.questions = None if questions is None else list(questions)

    def _instruction(self, image: int) -> str:
        if self.questions is not None:
            if image >= len(self.questions):
                raise ValueError(f"CDPruner was given {len(self.questions)} instructions (Handle.instruct) for a "
                                 f"forward with more images; give one per sample with an image")
            return self.questions[image]
        if self.instruction is None:
            raise ValueError("CDPruner needs the instruction each image is selected for: pass instruction=TEXT to "
                             "visiondrop.apply (or per sample: handle.instruct([...]); the evaluation plugin does), "
                             "or use text='prompt'")
        return self.instruction

    def select_encoder(self, view: EncoderView) -> Selection:
        first = int(view.has_cls)
        patches = view.hidden[:, first:]
        projected = view.project(patches)
        tower = load_text_tower(self.text_tower)
        image_embeds = tower.image_embeds(patches)
        # each image's crops are consecutive rows of the view, and share the relevance's min-max normalisation
        crops, start = {}, 0
        for image, rows in itertools.groupby(view.owners):
            count = len(list(rows))
            crops[image], start = slice(start, start + count), start + count
        texts = {image: tower.text_embeds(self._instruction(image), patches.device) for image in crops}

        def relevance_of(part: slice) -> Tensor:
            scores = torch.empty(image_embeds[:, part].shape[:2], device=patches.device)
            for image, rows in crops.items():
                scores[rows] = relevance(image_embeds[rows, part], texts[image])
            return scores

        kept = dpp_selection(projected, relevance_of, view.scaled(self.per_crop), self.guard, self.theta, self.dpp)
        features = gather_rows(projected, kept.clamp(min=0))
        return Selection(torch.where(kept >= 0, kept + first, kept), features=features)

    def select_decoder(self, cut: DecoderCut) -> Selection:
        visual = cut.visual_rows(cut.hidden)
        text_rows = cut.mask.clone()
        text_rows.scatter_(1, cut.visual, False)
        weights = text_rows.unsqueeze(-1).to(cut.hidden.dtype)
        prompt = (cut.hidden * weights).sum(1) / weights.sum(1)  # [G, D]: the mean input embedding of the text

        def relevance_of(part: slice) -> Tensor:
            return torch.stack([relevance(v[None, part].float(), p[None].float())[0] for v, p in zip(visual, prompt)])

        kept = dpp_selection(visual, relevance_of, cut.scaled(self.per_crop * self.info.crops, self.info.n_visual),
                             self.guard, self.theta, self.dpp)
        if not self.guard and (kept < 0).any():  # guarded picks are distinct: every sample keeps all
            raise NotImplementedError("CDPruner kept different counts for samples of one batch (its kernel's rank is "
                                      "spent): use guard=True, or run them one at a time")
        return Selection(kept)

    def describe(self) -> dict:
        where = {"encoder_layer": self.encoder_layer} if self.text == "clip" else {"layers": list(self.cut_layers)}
        return {"method": self.name, **where, "per_crop": self.per_crop, "text": self.text,
                **({"text_tower": self.text_tower} if self.text == "clip" else {}), "guard": self.guard,
                "theta": self.theta, "dpp": self.dpp, "equivalent_tokens": self.per_crop * self.info.crops}


def policy(info: ModelInfo, budget: float | None = None, text: str | None = None,
           text_tower: str = DEFAULT_TEXT_TOWER, instruction: str | None = None, guard: bool = False,
           theta: float | None = None, eager_encoder: bool = True, dpp: str = "paper") -> Policy:
    """CDPruner keeping `budget` tokens (its visual_token_num T; per crop T / crops on LLaVA-NeXT, per frame on
    videos).

    text: "clip" (the official relevance, CLIP text tower `text_tower` on the instruction; default where the vision
    tower has CLS) or "prompt" (OpenVINO's port: the LLM's own input embeddings of the prompt; default on
    Qwen2.5-VL); instruction: the text every image is selected for (else `Handle.instruct`); guard: stop the greedy
    MAP's NaN quirk (module docstring); theta: the relevance sharpening (None: the official kernel); eager_encoder: eager
    vision tower, bit-identical to the official features (False: the tower's own attention); dpp: "paper" (one
    kernel, the official code) or "split" (OpenVINO GenAI's halves, `dpp_selection`).
    """
    if budget is None:
        raise ValueError("CDPruner needs a budget (its visual_token_num)")
    text = text or ("clip" if info.tower_cls else "prompt")
    if text not in TEXTS:
        raise ValueError(f"CDPruner text must be one of {TEXTS}, got {text!r}")
    if dpp not in DPPS:
        raise ValueError(f"CDPruner dpp must be one of {DPPS}, got {dpp!r}")
    if theta is not None and not 0 < theta < 1:
        raise ValueError(f"CDPruner theta is in (0, 1) (the official comment's 0.5), or None; got {theta}")
    per_crop = whole_count(budget, info, "CDPruner", parts=info.crops)
    return CDPruner(info, per_crop, text, str(text_tower), instruction, bool(guard), theta, bool(eager_encoder), dpp)


def kernel_macs(n: int, steps: int, width: int) -> int:
    """The kernel's pairwise similarities of `n` tokens `width` wide, weighted by relevance, and the greedy MAP's
    updates (step i: i x n for the projections of the earlier picks, n for the residuals)."""
    return n * n * width + 2 * n * n + sum(i * n + n for i in range(steps))


def dpp_macs(n: int, steps: int, width: int, dpp: str) -> int:
    """One kernel over the n candidates, or ("split") one over each half with half the steps."""
    if dpp == "paper":
        return kernel_macs(n, steps, width)
    return kernel_macs(n // 2, steps // 2, width) + kernel_macs(n - n // 2, steps - steps // 2, width)


def overhead(text: str | None = None, dpp: str = "paper", **_) -> Overhead:
    """The kernel and the greedy MAP on the projected patches (an encoder cut: CLS is no candidate), or on the
    decoder's inputs (text="prompt"). The relevance side's products are small beside the kernel (the CLIP text
    tower on a few dozen tokens and one projection of the patches, or a mean of the prompt's embeddings) and not
    counted."""
    if text == "prompt":
        return Overhead(selection=lambda cut, width: dpp_macs(cut.before, cut.kept, width, dpp))
    return Overhead(projected=lambda cut, width: dpp_macs(cut.before - 1, cut.kept, width, dpp),
                    eager_encoder=True)  # no CLS row at all


def example_options(config) -> dict:
    """A tiny random CLIP text side as wide as the model's vision tower and one instruction (tests, demo, the FLOPs
    proxy), and the guard: a narrow model's kernel spends its rank (its projector's width) where a real one's
    does not, and the quirk would keep fewer tokens than the real model does."""
    from visiondrop.testing.tiny import tiny_clip_text

    return {"text_tower": str(tiny_clip_text(config.vision_config.hidden_size)),
            "instruction": "What is in the image?", "guard": True}


# a budget below the tiny models' kernel rank (their 64-wide projectors), where the NaN quirk does not arise
METHOD = Method("cdpruner", "CDPruner", policy, smallest_budget=lambda info: info.crops,
                overhead=overhead, example_budget=32, second_example=(48, {"guard": True}),
                example_options=example_options)
