"""Train the small LLaVA-1.5 demo model from scratch on the synthetic shapes benchmark (2-core CPU, ~40 minutes).

The architecture is LLaVA-1.5's (CLIP ViT at 336/14: 576 patch tokens + CLS, `vision_feature_layer=-2`, a
2-layer GELU projector, a Llama decoder, the vicuna_v1 prompt), at a tiny width and depth. As LLaVA starts from a
pretrained CLIP, training is staged:

1. **Vision tower.** The tower is taught dense labels on the layer LLaVA projects (the penultimate one): each patch
   predicts the (colour, shape) of the object covering it and its 3x3 cell; the CLS token predicts which
   (colour, shape) pairs are in the scene; and the CLS attention row of that layer is pulled towards the objects
   (each object an equal share, spread over its patches). The last point stands in for the object-centred CLS
   attention CLIP learns from web data; the encoder-side methods (VisionZip, VisionDrop) rank patches by it.
2. **Projector and decoder.** The tower is frozen and its features cached; the projector and decoder learn to
   answer the questions (answer tokens + EOS, cross-entropy), with exactly the evaluation prompt, eight questions
   per image packed into one sequence. Two auxiliary losses make the tiny decoder look where a larger one would
   learn to: layer 1's attention from the answering position is pulled onto the patches the answer rests on, or
   onto the first token (a sink) when the asked-for object is absent; and for existence questions layer 0's
   attention from that position is pulled onto the colour word, which the layer-1 query needs. Without the
   latter, existence stayed at chance for thousands of steps while colour and shape reached 100%. For the last
   40% of the steps 60% of the images come as pruned views (`training_view`: fewer patches, random or
   objects-first, plus merged tokens), so the decoder answers from however many visual tokens a method leaves.

The weights are saved in float16 with ``save_pretrained`` (a few MB), next to the processor and tokenizer.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlavaForConditionalGeneration, LlavaProcessor
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from . import synthetic as syn
from ..engine.select import contextual_merge
from ..harness.prompting import vicuna_v1_prompt
from ..families import Shape
from ..families.llava import LLAVA
from ..testing.tiny import build_tokenizer, token_ids

POST_PROMPT = "\nAnswer the question using a single word or phrase."  # the visiondrop_demo task's post_prompt


@dataclass
class Recipe:
    seed: int = 0
    vision_layers: int = 4  # the last one is unused by LLaVA (vision_feature_layer=-2), as in LLaVA-1.5
    vision_width: int = 64
    vision_heads: int = 4
    vision_mlp: int = 256
    text_layers: int = 4
    text_width: int = 128
    text_heads: int = 4
    vocab_size: int = 512
    # stage 1: vision tower
    tower_steps: int = 2000
    tower_batch: int = 16
    tower_lr: float = 2e-3
    attention_weight: float = 0.5
    # stage 2: projector + decoder on cached tower features
    scenes: int = 4000
    lm_steps: int = 3000
    lm_batch: int = 32  # questions per step
    questions_per_image: int = 8  # packed into one sequence (lm_packed_logits), every kind alike
    full_views: float = 0.4  # once pruned views start, the rest of the images come as pruned views (training_view)
    pruned_views_from: float = 0.6  # fraction of lm_steps trained on full views first
    min_keep: int = 16
    grounding_weight: float = 1.0  # attention of the answering position (decoder layer 1) on the asked object
    patch_word_weight: float = 0.5  # each object patch's last hidden state reads out its colour and shape words
    lm_lr: float = 1e-3
    warmup: int = 100
    log_every: int = 50


def build_model(r: Recipe) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    tokenizer = build_tokenizer(r.vocab_size)
    shape = Shape(hidden=r.text_width, intermediate=2 * r.text_width, layers=r.text_layers, heads=r.text_heads,
                  vision_hidden=r.vision_width, vision_intermediate=r.vision_mlp, vision_layers=r.vision_layers,
                  vision_heads=r.vision_heads)
    config = LLAVA.build_config(shape, token_ids(tokenizer))
    processor = LLAVA.build_processor(tokenizer)
    torch.manual_seed(r.seed)
    model = LlavaForConditionalGeneration(config)
    embeddings = getattr(model.model.vision_tower, "vision_model", model.model.vision_tower).embeddings
    with torch.no_grad():  # a 2D sin-cos start (as MAE's fixed one): neighbours look alike, locality is easy to learn
        embeddings.position_embedding.weight[1:] = 0.1 * sincos_2d(r.vision_width, syn.GRID)
        embeddings.position_embedding.weight[0] = 0
    return model, processor


def sincos_2d(width: int, grid: int) -> torch.Tensor:
    """[grid*grid, width] 2D sine-cosine position codes in raster order: half the channels for rows, half columns."""
    quarter = width // 4
    freqs = 1.0 / (100.0 ** (torch.arange(quarter) / quarter))
    coords = torch.arange(grid, dtype=torch.float32)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    parts = [f(axis.reshape(-1, 1) * freqs) for axis in (rows, cols) for f in (torch.sin, torch.cos)]
    return torch.cat(parts, 1)


_MEAN = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
_STD = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)


def pixels(images) -> torch.Tensor:
    """The CLIP processor's normalisation of 336x336 RGB images (no resize or crop is needed at this size)."""
    x = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in images])).permute(0, 3, 1, 2)
    return (x / 255.0 - _MEAN) / _STD


def tower_forward(model, pixel_values: torch.Tensor, with_attention: bool = False):
    """The tower up to the layer LLaVA projects: (its output [N, 577, D], that layer's CLS attention [N, H, 577])."""
    vision = model.model.vision_tower
    vision = getattr(vision, "vision_model", vision)
    layer_idx = model.config.vision_feature_layer % (len(vision.encoder.layers) + 1) - 1
    x = vision.pre_layrnorm(vision.embeddings(pixel_values))
    attention = None
    for i, layer in enumerate(vision.encoder.layers[: layer_idx + 1]):
        if with_attention and i == layer_idx:
            attn = layer.self_attn
            h = layer.layer_norm1(x)
            heads = lambda t: t.view(*t.shape[:2], -1, attn.head_dim).transpose(1, 2)  # noqa: E731
            attention = ((heads(attn.q_proj(h[:, :1])) @ heads(attn.k_proj(h)).transpose(-1, -2))
                         * attn.scale).softmax(-1)[:, :, 0]
        x = layer(x, None)
        x = x[0] if isinstance(x, tuple) else x
    return x, attention


class TowerHeads(nn.Module):
    """Stage-1 readouts (not saved): per-patch (colour, shape) class and cell, CLS presence of each pair."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.patch = nn.Linear(width, syn.N_CLASSES)
        self.cell = nn.Linear(width, 9)
        self.shape = nn.Linear(width, len(syn.SHAPES))
        self.silhouette = nn.Linear(width, 49)
        self.presence = nn.Linear(width, syn.N_CLASSES - 1)


_CELL_OF_PATCH = torch.tensor([(r // 8) * 3 + c // 8 for r in range(syn.GRID) for c in range(syn.GRID)])


def _tower_batch(rng: random.Random, n: int):
    scenes = [syn.make_scene(rng) for _ in range(n)]
    labels = torch.from_numpy(np.stack([s.patch_class for s in scenes])).long()
    presence = torch.zeros(n, syn.N_CLASSES - 1)
    target = torch.zeros(n, 1 + syn.GRID * syn.GRID)  # CLS attention target over [CLS, patches]
    for i, s in enumerate(scenes):
        for k, o in enumerate(s.objects):
            presence[i, syn.joint_class(o.colour, o.shape) - 1] = 1
            where = np.flatnonzero(s.patch_object == k)
            if len(where):
                target[i, 1 + where] = 1.0 / len(where)
        target[i] /= target[i].sum().clamp(min=1e-6)
    silhouette = torch.from_numpy(np.stack([s.patch_mask for s in scenes]))
    return pixels([s.image for s in scenes]), labels, presence, target, silhouette


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_tower(model, r: Recipe, log=print) -> dict:
    heads = TowerHeads(r.vision_width)
    vision = model.model.vision_tower
    params = list(vision.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=r.tower_lr, weight_decay=0.0)
    rng = random.Random(f"{r.seed}/tower")
    weight = torch.ones(syn.N_CLASSES)
    weight[0] = 0.3  # most patches are background
    start, stats = time.perf_counter(), {}
    for step in range(r.tower_steps):
        for g in opt.param_groups:
            g["lr"] = r.tower_lr * _cosine(step, r.tower_steps, r.warmup)
        px, labels, presence, target, silhouette = _tower_batch(rng, r.tower_batch)
        feats, attention = tower_forward(model, px, with_attention=True)
        h = heads.norm(feats)
        patch_logits = heads.patch(h[:, 1:])
        loss_patch = F.cross_entropy(patch_logits.flatten(0, 1), labels.flatten(), weight=weight)
        loss_cell = F.cross_entropy(heads.cell(h[:, 1:]).flatten(0, 1),
                                    _CELL_OF_PATCH.repeat(len(px)))
        loss_presence = F.binary_cross_entropy_with_logits(heads.presence(h[:, 0]), presence)
        loss_attention = -(target * attention.mean(1).clamp(min=1e-8).log()).sum(-1).mean()
        obj = labels > 0
        loss_shape = F.cross_entropy(heads.shape(h[:, 1:][obj]), (labels[obj] - 1) % len(syn.SHAPES))
        loss_silhouette = F.binary_cross_entropy_with_logits(heads.silhouette(h[:, 1:]), silhouette)
        loss = loss_patch + loss_shape + loss_silhouette + 0.2 * loss_cell + loss_presence + r.attention_weight * loss_attention
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % r.log_every == 0 or step == r.tower_steps - 1:
            with torch.no_grad():
                pred = patch_logits.argmax(-1)
                obj = labels > 0
                mass = (attention.mean(1)[:, 1:] * obj).sum(-1).mean()
                stats = {"loss": loss.item(), "patch": loss_patch.item(), "presence": loss_presence.item(), "shape": loss_shape.item(),
                         "silhouette": loss_silhouette.item(),
                         "attn": loss_attention.item(),
                         "obj_acc": (pred[obj] == labels[obj]).float().mean().item(),
                         "colour_acc": ((pred[obj] - 1) // 3 == (labels[obj] - 1) // 3).float().mean().item(),
                         "shape_acc": ((pred[obj] - 1) % 3 == (labels[obj] - 1) % 3).float().mean().item(),
                         "bg_acc": (pred[~obj] == 0).float().mean().item(), "cls_mass_on_objects": mass.item()}
            log(f"tower step {step} {time.perf_counter() - start:.0f}s " +
                " ".join(f"{k}={v:.3f}" for k, v in stats.items()))
    return stats


@torch.no_grad()
def cache_features(model, r: Recipe, log=print):
    """Tower features (the projected layer, CLS dropped) of `r.scenes` training scenes, float16."""
    rng = random.Random(f"{r.seed}/lm-scenes")
    scenes, feats = [], []
    for i in range(0, r.scenes, 32):
        batch = [syn.make_scene(rng) for _ in range(min(32, r.scenes - i))]
        scenes += batch
        feats.append(tower_forward(model, pixels([s.image for s in batch]))[0][:, 1:].half())
    log(f"cached tower features of {len(scenes)} scenes")
    return scenes, torch.cat(feats)


class Prompter:
    """Token ids of the evaluation prompt (vicuna_v1, the task's post_prompt) with the image tokens expanded."""

    def __init__(self, processor):
        self.tok = processor.tokenizer
        self.image_id = self.tok.convert_tokens_to_ids("<image>")

    def prompt_ids(self, question: str, n_image_tokens: int = syn.GRID * syn.GRID) -> list[int]:
        return self._expand(self.tok(vicuna_v1_prompt(question + POST_PROMPT, True))["input_ids"], n_image_tokens)

    def _expand(self, ids: list[int], n_image_tokens: int) -> list[int]:
        out = []
        for t in ids:
            out += [t] * n_image_tokens if t == self.image_id else [t]
        return out

    def example(self, question: str, answer: str, n_image_tokens: int = syn.GRID * syn.GRID):
        """(prompt ids, answer ids + EOS)."""
        text = vicuna_v1_prompt(question + POST_PROMPT, True)
        short, full = self.tok(text)["input_ids"], self.tok(text + " " + answer)["input_ids"]
        assert full[: len(short)] == short
        return self._expand(short, n_image_tokens), full[len(short):] + [self.tok.eos_token_id]


def lm_logits_at(model, ids: torch.Tensor, mask: torch.Tensor, feats: torch.Tensor, positions: torch.Tensor,
                 image_id: int) -> torch.Tensor:
    """Logits at `positions` [N, T] of right-padded sequences whose image tokens take `feats` [N, 576, Dv]."""
    embeds = model.model.get_input_embeddings()(ids)
    image = model.model.multi_modal_projector(feats.float())
    embeds = embeds.masked_scatter((ids == image_id).unsqueeze(-1), image.to(embeds.dtype))
    # Right padding under causal attention: real tokens never see the pads, so no mask (the fast SDPA path).
    hidden = model.model.language_model(inputs_embeds=embeds).last_hidden_state
    picked = hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    return model.lm_head(picked)


def _lm_batch(prompter, items):
    """items: (prompt ids, target ids). Right-padded ids, mask, predicting positions, targets (-100 = pad)."""
    pad = prompter.tok.pad_token_id
    length = max(len(p) + len(t) for p, t in items)
    width = max(len(t) for _, t in items)
    ids = torch.full((len(items), length), pad)
    mask = torch.zeros(len(items), length, dtype=torch.long)
    positions = torch.zeros(len(items), width, dtype=torch.long)
    targets = torch.full((len(items), width), -100)
    for i, (p, t) in enumerate(items):
        seq = p + t
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        positions[i, : len(t)] = torch.arange(len(p) - 1, len(p) - 1 + len(t))
        targets[i, : len(t)] = torch.tensor(t)
    return ids, mask, positions, targets


@dataclass
class View:
    """The visual tokens one training image hands the projector: some of its patch features in raster order,
    then merged tokens, as an encoder-side pruning method hands them over; `patches` [k] names each token's
    patch (-1 for a merged one)."""

    feats: torch.Tensor
    patches: np.ndarray


def training_view(scene: syn.Scene, feats: torch.Tensor, rng: random.Random, r: "Recipe") -> View:
    """All 576 patches (probability `r.full_views`), else a pruned view, so that the decoder learns to answer from
    however many visual tokens a method leaves: `min_keep` to 575 patches, drawn at random or objects first (a
    scorer that finds them), always with one patch of every object (so every answer still rests on something
    seen), then 0 to 8 tokens merged from the dropped ones by the VisionZip/VisionDrop rule."""
    n = len(feats)
    if rng.random() < r.full_views:
        return View(feats, np.arange(n))
    by_object = [np.flatnonzero(scene.patch_object == k) for k in range(len(scene.objects))]
    must = {int(rng.choice(list(p))) for p in by_object if len(p)}
    rest = [p for p in range(n) if p not in must]
    rng.shuffle(rest)
    if rng.random() < 0.5:
        rest.sort(key=lambda p: scene.patch_object[p] < 0)  # stable: objects first, each part still shuffled
    kept = sorted(must | set(rest[: max(0, rng.randint(r.min_keep, n - 1) - len(must))]))
    dropped = torch.tensor(sorted(set(range(n)) - set(kept)))
    merged = contextual_merge(feats[None].float(), feats[None].float(), dropped[None], rng.randint(0, 8))[0][0]
    return View(torch.cat([feats[kept].float(), merged]), np.array(kept + [-1] * len(merged)))


def lm_packed_logits(model, prompter, views: list[View], groups: list[list[tuple[str, str]]],
                     patch_targets: list[list[np.ndarray]] | None = None, grounding_layer: int = 1,
                     patch_words: list[dict[int, tuple[int, int]]] | None = None,
                     focus_words: list[list[int | None]] | None = None):
    """Several questions about one image in one sequence: the shared prefix (system prompt and image) once, then
    each question's block, which sees the prefix and itself only and is numbered as if it came right after the
    prefix. Equivalent to one sequence per question, several times cheaper. `groups`: per image, its (question,
    answer) pairs. Returns (logits, targets, grounding loss, patch-word loss).

    With `patch_targets` (per image, per question: the patches the answer rests on) the grounding loss is minus
    the log of the attention mass, averaged over the heads of `grounding_layer`, that the position predicting the
    answer puts on those of the patches that are in the view, or on the first token (a sink) when there are none
    (an absent object: what turns existence into "is the best match better than the sink"; softmax over the
    shared prefix), else 0. With `focus_words` (per image, per question: a token id of the question or None) the
    grounding loss also takes minus the log of the layer-0 attention mass (head mean) that the position predicting
    the answer puts on that word (existence questions: the colour asked about, the word the layer-1 query needs).
    With `patch_words` (per image: patch -> (colour word id, shape word id) of
    the object covering it) the patch-word loss is the cross-entropy of the lm_head read out at each object patch
    of the view against those two words (half each), else 0."""
    image_id, pad = prompter.image_id, prompter.tok.pad_token_id
    rows = []
    for view, items in zip(views, groups):
        examples = [prompter.example(q, a, len(view.patches)) for q, a in items]
        prefix_len = max(i for i, t in enumerate(examples[0][0]) if t == image_id) + 1
        prefix = examples[0][0][:prefix_len]
        ids, pos, blocks, predict, targets = list(prefix), list(range(prefix_len)), [], [], []
        for prompt, target in examples:
            assert prompt[:prefix_len] == prefix
            block = prompt[prefix_len:] + target
            start = len(ids)
            predict += [start + len(prompt) - prefix_len - 1 + t for t in range(len(target))]
            targets += target
            blocks.append((start, len(block), len(prompt)))
            ids += block
            pos += range(prefix_len, prefix_len + len(block))
        rows.append((ids, pos, prefix_len, blocks, predict, targets))
    length = max(len(row[0]) for row in rows)
    n_predict = max(len(row[4]) for row in rows)
    ids_t = torch.full((len(rows), length), pad)
    pos_t = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), 1, length, length, dtype=torch.bool)
    predict_t = torch.zeros(len(rows), n_predict, dtype=torch.long)
    targets_t = torch.full((len(rows), n_predict), -100)
    causal = lambda n: torch.ones(n, n, dtype=torch.bool).tril()  # noqa: E731
    for b, (ids, pos, prefix_len, blocks, predict, targets) in enumerate(rows):
        ids_t[b, : len(ids)] = torch.tensor(ids)
        pos_t[b, : len(pos)] = torch.tensor(pos)
        mask[b, 0, :prefix_len, :prefix_len] = causal(prefix_len)
        for start, n, _ in blocks:
            mask[b, 0, start: start + n, :prefix_len] = True
            mask[b, 0, start: start + n, start: start + n] = causal(n)
        mask[b, 0, range(len(ids), length), range(len(ids), length)] = True  # pads see themselves (no NaN rows)
        predict_t[b, : len(predict)] = torch.tensor(predict)
        targets_t[b, : len(targets)] = torch.tensor(targets)
    embeds = model.model.get_input_embeddings()(ids_t)
    image = model.model.multi_modal_projector(torch.cat([v.feats for v in views]).float())
    embeds = embeds.masked_scatter((ids_t == image_id).unsqueeze(-1), image.to(embeds.dtype))
    captured: dict[int, dict] = {}
    hooks = []
    layers = model.model.language_model.layers
    for layer in ([grounding_layer] if patch_targets is not None else []) + ([0] if focus_words is not None else []):
        grab = lambda module, args, kwargs, layer=layer: captured.__setitem__(layer, kwargs)  # noqa: E731
        hooks.append(layers[layer].self_attn.register_forward_pre_hook(grab, with_kwargs=True))
    try:
        hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=mask,
                                            position_ids=pos_t).last_hidden_state
    finally:
        for hook in hooks:
            hook.remove()
    picked = hidden.gather(1, predict_t.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    logits = model.lm_head(picked)
    starts = [row[0].index(image_id) for row in rows]
    patch_word = logits.new_zeros(())
    if patch_words is not None:
        at, words = [], []
        for b, (view, table) in enumerate(zip(views, patch_words)):
            for j, p in enumerate(view.patches):
                if int(p) in table:
                    at.append((b, starts[b] + j))
                    words.append(table[int(p)])
        if at:
            b_idx, t_idx = torch.tensor(at).T
            log_probs = model.lm_head(hidden[b_idx, t_idx]).log_softmax(-1)
            patch_word = -log_probs.gather(1, torch.tensor(words)).mean()
    if patch_targets is None:
        return logits, targets_t, logits.new_zeros(()), patch_word
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    def queries_keys(layer: int):
        attn, h = layers[layer].self_attn, captured[layer]["hidden_states"]
        heads = lambda t: t.view(*t.shape[:2], -1, attn.head_dim).transpose(1, 2)  # noqa: E731
        q, k = heads(attn.q_proj(h)), heads(attn.k_proj(h))
        return (*apply_rotary_pos_emb(q, k, *captured[layer]["position_embeddings"]), attn.scaling)

    q, k, scaling = queries_keys(grounding_layer)
    losses = []
    if focus_words is not None:
        q0, k0, scaling0 = queries_keys(0)
        for b, (ids, pos, prefix_len, blocks, predict, targets) in enumerate(rows):
            for (start, _, prompt_len), word in zip(blocks, focus_words[b]):
                if word is None:
                    continue
                at = start + prompt_len - prefix_len - 1
                seen = torch.cat([torch.arange(prefix_len), torch.arange(start, at + 1)])
                focus = [j for j, t in enumerate(seen.tolist()) if j >= prefix_len and ids[t] == word]
                probs = (torch.einsum("hd,hpd->hp", q0[b, :, at], k0[b, :, seen]) * scaling0).softmax(-1).mean(0)
                losses.append(-probs[focus].sum().clamp(min=1e-6).log())
    for b, (ids, pos, prefix_len, blocks, predict, targets) in enumerate(rows):
        for (start, _, prompt_len), patches in zip(blocks, patch_targets[b]):
            where = starts[b] + np.flatnonzero(np.isin(views[b].patches, patches))
            if len(where) == 0:  # nothing to find (a "no"): the attention rests on the first token, a sink
                where = np.zeros(1, dtype=int)
            at = start + prompt_len - prefix_len - 1  # the position that predicts the first answer token
            scores = torch.einsum("hd,hpd->hp", q[b, :, at], k[b, :, :prefix_len]) * scaling
            probs = scores.softmax(-1).mean(0)
            losses.append(-probs[torch.as_tensor(where)].sum().clamp(min=1e-6).log())
    grounding = torch.stack(losses).mean() if losses else logits.new_zeros(())
    return logits, targets_t, grounding, patch_word


def train_lm(model, processor, scenes, feats, r: Recipe, log=print, eval_every: int = 500,
             on_pruned_views=None) -> dict:
    """Projector and decoder on the cached features; `on_pruned_views(stats)` runs when pruned views start."""
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)
    params = (list(model.model.multi_modal_projector.parameters()) + list(model.model.language_model.parameters())
              + list(model.lm_head.parameters()))
    opt = torch.optim.AdamW(params, lr=r.lm_lr, weight_decay=0.0)
    prompter = Prompter(processor)
    rng = random.Random(f"{r.seed}/lm-questions")
    word_ids = {w: prompter.tok(" " + w, add_special_tokens=False)["input_ids"][0]
                for w in syn.COLOUR_NAMES + syn.SHAPES}
    held_out = [(i, syn.make_question(scenes[i], syn.KINDS[j % 4], rng))
                for j, i in enumerate(range(len(scenes) - 128, len(scenes)))]
    train_idx = len(scenes) - 128
    start, stats = time.perf_counter(), {}
    model.train()
    pruned_from = round(r.pruned_views_from * r.lm_steps)
    for step in range(r.lm_steps):
        for g in opt.param_groups:
            g["lr"] = r.lm_lr * _cosine(step, r.lm_steps, r.warmup)
        if step == pruned_from and on_pruned_views is not None:
            on_pruned_views(held_out_accuracy(model, prompter, feats, held_out))
            model.train()
        picks = [rng.randrange(train_idx) for _ in range(r.lm_batch // r.questions_per_image)]
        views, groups, patches, words, focus = [], [], [], [], []
        for i in picks:
            sc = scenes[i]
            views.append(training_view(sc, feats[i], rng, r) if step >= pruned_from
                         else View(feats[i], np.arange(len(feats[i]))))
            kinds = [syn.KINDS[k % len(syn.KINDS)] for k in range(r.questions_per_image)]  # every kind alike
            qs = [syn.make_question(sc, kind, rng) for kind in kinds]
            groups.append([(q["question"], q["answer"]) for q in qs])
            focus.append([word_ids[q["question"].split()[3]] if q["category"] == "existence" else None for q in qs])
            patches.append([np.flatnonzero(np.isin(sc.patch_object, q["targets"])) for q in qs])
            words.append({int(p): (word_ids[sc.objects[k].colour], word_ids[sc.objects[k].shape])
                          for p, k in enumerate(sc.patch_object) if k >= 0})
        logits, targets, grounding, patch_word = lm_packed_logits(
            model, prompter, views, groups, patches if r.grounding_weight else None,
            patch_words=words if r.patch_word_weight else None, focus_words=focus if r.grounding_weight else None)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        loss = loss + r.grounding_weight * grounding + r.patch_word_weight * patch_word
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % r.log_every == 0:
            log(f"lm step {step} {time.perf_counter() - start:.0f}s loss={loss.item():.4f} grounding={float(grounding):.3f} "
                f"patch_word={float(patch_word):.3f}")
        if (step + 1) % eval_every == 0 or step == r.lm_steps - 1:
            stats = held_out_accuracy(model, prompter, feats, held_out)
            log(f"lm step {step} held-out " + " ".join(f"{k}={v:.3f}" for k, v in stats.items()))
            model.train()
    model.eval()
    return stats


@torch.no_grad()
def held_out_accuracy(model, prompter, feats, held_out, batch: int = 32) -> dict:
    """Teacher-forced exact match (every answer token and EOS the argmax), overall and per question kind."""
    model.eval()
    hits: dict[str, list[float]] = {}
    for s in range(0, len(held_out), batch):
        chunk = held_out[s: s + batch]
        items = [prompter.example(q["question"], q["answer"]) for _, q in chunk]
        ids, mask, positions, targets = _lm_batch(prompter, items)
        logits = lm_logits_at(model, ids, mask, feats[[i for i, _ in chunk]], positions, prompter.image_id)
        ok = ((logits.argmax(-1) == targets) | (targets == -100)).all(-1)
        for (_, q), good in zip(chunk, ok.tolist()):
            kind = q["category"] if q["category"] != "existence" else f"exist-{q['answer']}"
            hits.setdefault(kind, []).append(float(good))
    out = {"acc": float(np.mean([v for vs in hits.values() for v in vs]))}
    out.update({k: float(np.mean(v)) for k, v in sorted(hits.items())})
    return out


@torch.no_grad()
def evaluate(model, processor, rows: list[dict], batch: int = 8) -> dict:
    """Greedy generation with the evaluation prompt, as the harness runs it; exact match per category."""
    from ..harness.tasks.visiondrop_demo.utils import normalize

    model.eval()
    hits: dict[str, list[float]] = {}
    for s in range(0, len(rows), batch):
        chunk = rows[s: s + batch]
        prompts = [vicuna_v1_prompt(row["question"] + POST_PROMPT, True) for row in chunk]
        enc = processor(text=prompts, images=[row["image"] for row in chunk], padding=True, return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=8, do_sample=False)
        texts = processor.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for row, text in zip(chunk, texts):
            hits.setdefault(row["category"], []).append(float(normalize(text) == normalize(row["answer"])))
    out = {"acc": float(np.mean([v for vs in hits.values() for v in vs]))}
    out.update({k: float(np.mean(v)) for k, v in sorted(hits.items())})
    return out


def save(model, processor, out_dir: str | Path, r: Recipe, metrics: dict) -> Path:
    import json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.half().save_pretrained(out_dir)
    model.float()
    processor.save_pretrained(out_dir)
    (out_dir / "training.json").write_text(json.dumps({"recipe": asdict(r), "metrics": metrics}, indent=2) + "\n")
    return out_dir


def train(r: Recipe, out_dir: str | Path | None, log=print, test_questions: int = 160,
          tower_state: str | Path | None = None) -> dict:
    """Both stages, then save to `out_dir`. `tower_state`: a file that keeps the stage-1 tower (reused if present);
    with `out_dir=None` only stage 1 runs."""
    torch.manual_seed(r.seed)
    random.seed(r.seed)
    model, processor = build_model(r)
    t0 = time.perf_counter()
    if tower_state and Path(tower_state).exists():
        saved = torch.load(tower_state)
        model.model.vision_tower.load_state_dict(saved["state"])
        tower = saved["stats"]
        log(f"loaded the stage-1 tower from {tower_state}: {tower}")
    else:
        tower = train_tower(model, r, log)
        if tower_state:
            torch.save({"state": model.model.vision_tower.state_dict(), "stats": tower}, tower_state)
    t1 = time.perf_counter()
    if out_dir is None:
        return {"tower": tower, "tower_s": t1 - t0}
    model.eval()
    scenes, feats = cache_features(model, r, log)
    snapshot = lambda stats: save(model, processor, f"{out_dir}-full-views", r, {"lm_held_out": stats})  # noqa: E731
    lm = train_lm(model, processor, scenes, feats, r, log, eval_every=250, on_pruned_views=snapshot)
    t2 = time.perf_counter()
    metrics = {"tower": tower, "lm_held_out": lm, "tower_s": t1 - t0, "lm_s": t2 - t1}
    save(model, processor, out_dir, r, metrics)
    test = evaluate(model, processor, syn.samples("test", test_questions, r.seed))
    metrics["test"] = test
    log(f"test (greedy, {test_questions} questions): {test}")
    save(model, processor, out_dir, r, metrics)
    return metrics
