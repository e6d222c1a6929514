"""Tiny, randomly initialised LLaVA-1.5, LLaVA-NeXT (1.6) and Video-LLaVA checkpoints built offline.

The models keep the real layer structure of ``llava-hf/llava-1.5-7b-hf`` and
``llava-hf/llava-v1.6-vicuna-7b-hf`` (24-layer CLIP ViT-L/14-336 tower with 577 positions,
32-layer Llama decoder, 2-layer GELU projector, vision_feature_layer=-2; for NeXT also the
AnyRes grid pinpoints and the learned ``image_newline``) at a tiny width, so that pruning code
sees the same shapes, layer counts and token layout as the real model while running in seconds on CPU.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, PreTrainedTokenizerFast

from ..families import Family, Shape, TokenIds, family_by_type, family_for
from ..families.llava import LLAVA

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]  # ids 0..4; unk/bos/eos match Llama

_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
_CORPUS = [
    _SYSTEM,
    "USER: What is this? ASSISTANT: This is a photo of a red square on a blue background.",
    "USER: Is there a cat in the image? Answer the question using a single word or phrase. ASSISTANT: No",
    "USER: Is there a dog in the picture? ASSISTANT: Yes",
    "USER: What color is the circle? ASSISTANT: The circle is green.",
    "USER: What colour is the car? ASSISTANT: White",
    "USER: How many people are there? ASSISTANT: There are two people.",
    "USER: How many apples are on the table? ASSISTANT: Three",
    "USER: What shape is the sign? ASSISTANT: It is a triangle.",
    "USER: Describe the image in detail. ASSISTANT: The image shows a yellow circle, "
    "a black rectangle and an orange triangle in front of a gray wall.",
    "yes no maybe one two three four five six seven eight nine ten zero",
    "red green blue yellow orange purple pink brown black white gray",
    "circle square rectangle triangle star line dot oval",
    "Who is holding the umbrella? Where is the man standing? Which side is the tree on?",
    "left right top bottom above below next to behind in front of the",
]
def build_tokenizer(vocab_size: int, extra_special: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a small LLaVA-style corpus, with LLaVA's special tokens (and <image>),
    then `extra_special` (a family's own, `Family.special_tokens`)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + list(extra_special),
        # Full byte alphabet so that any input text is encodable without <unk>.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s>:1 $B:1", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        model_max_length=4096,
    )


def token_ids(tokenizer: PreTrainedTokenizerFast, family: Family = LLAVA) -> TokenIds:
    """The ids a model config of `family` built for `tokenizer` carries."""
    return TokenIds(vocab=len(tokenizer), image=tokenizer.convert_tokens_to_ids(family.image_token),
                    bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id,
                    special={t: tokenizer.convert_tokens_to_ids(t) for t in family.special_tokens})


def _build(
    out_dir: str | Path,
    family: Family,
    *,
    seed: int = 0,
    text_layers: int = 32,
    vision_layers: int = 24,
    hidden: int = 64,
    vision_hidden: int = 64,
    heads: int = 4,
    kv_heads: int | None = None,
    vocab_size: int = 512,
    init_std: float = 0.2,
) -> Path:
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(vocab_size, family.special_tokens)
    shape = Shape(hidden=hidden, intermediate=2 * hidden, layers=text_layers, heads=heads, vision_hidden=vision_hidden,
                  vision_intermediate=2 * vision_hidden, vision_layers=vision_layers, vision_heads=heads,
                  kv_heads=kv_heads)
    config = family.build_config(shape, token_ids(tokenizer, family), init_std)
    torch.manual_seed(seed)
    model = family.model_class(config)
    # Stored in float16 like the real checkpoint: halves the folder (~4.5 MB); load_tiny upcasts.
    model.to(torch.float16).save_pretrained(out_dir)
    family.build_processor(tokenizer).save_pretrained(out_dir)
    return out_dir


def build_tiny(model_type: str, out_dir: str | Path, **knobs) -> Path:
    """Build, save and return the path of a tiny random model of the registered family `model_type` (model,
    tokenizer, processor), saved like a user's checkpoint: the real depths of the family's first checkpoint
    (`Family.checkpoints`; grouped-query attention with 2 key-value heads where it has it) at a tiny width.

    knobs (keywords, see `_build`: seed, text_layers, vision_layers, hidden, vision_hidden, heads, kv_heads,
    vocab_size, init_std): ``vocab_size`` is the BPE training target; the model's vocabulary is the trained
    tokenizer's size. ``init_std`` is larger than the usual 0.02 so that random logits are far from uniform.
    """
    family = family_by_type(model_type)
    real = family.checkpoints[0].shape
    depths = {"text_layers": real.layers, "vision_layers": real.vision_layers, "kv_heads": 2 if real.kv_heads else None}
    return _build(out_dir, family, **{**depths, **knobs})


def load_tiny(
    path: str | Path, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32
) -> tuple[torch.nn.Module, Any]:
    """Load a folder written by a tiny-model builder of any family (`build_tiny`),
    as a user loads a checkpoint.

    The model class and the processor follow the saved config's family; the model is returned in eval mode.
    """
    family = family_for(AutoConfig.from_pretrained(path))
    model = family.model_class.from_pretrained(path, attn_implementation=attn_implementation, dtype=dtype).eval()
    return model, family.load_processor(path)


def demo_image(seed: int, size: tuple[int, int] = (336, 336)) -> Image.Image:
    """Deterministic synthetic RGB image (width, height) = ``size``: random shapes on a random background."""
    rng = np.random.default_rng(seed)
    width, height = size
    image = Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 7))):
        x0, x1 = sorted(int(v) for v in rng.integers(0, width, 2))
        y0, y1 = sorted(int(v) for v in rng.integers(0, height, 2))
        box = (x0, y0, max(x1, x0 + 8), max(y1, y0 + 8))  # keep shapes visible at any size
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.rectangle(box, fill=fill)
        else:
            draw.ellipse(box, fill=fill)
    return image


def build_tiny_clip_text(out_dir: str | Path, vision_hidden: int = 64, seed: int = 0) -> Path:
    """Build, save and return the path of a tiny random CLIP checkpoint for CDPruner's `text_tower=`: a 12-layer
    text tower at width 64 with its tokenizer (CLIP's byte-level vocabulary layout, no merges: each word becomes
    its characters) and a vision side `vision_hidden` wide whose `post_layernorm` and `visual_projection` CDPruner
    applies to the LLaVA tower's features (its one encoder layer is never run)."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    out_dir = Path(out_dir)
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(out_dir)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=12,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=len(vocab) - 2,
                         eos_token_id=2, pad_token_id=1, projection_dim=64),  # eos 2: pooled at the largest id, as real CLIP
        vision_config=dict(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_hidden_layers=1,
                           num_attention_heads=4, image_size=336, patch_size=14, projection_dim=64),
        projection_dim=64,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(out_dir)
    return out_dir


def build_tiny_siglip_head(out_dir: str | Path, vision_config: Any, tower: str | Path | None = None,
                           seed: int = 0) -> Path:
    """Build, save and return the path of a tiny SigLIP checkpoint with its pooling head, for FastVID's `head=`: to a
    tiny LLaVA-OneVision (`vision_config`, its tower's config) what google/siglip-so400m-patch14-384 is to the real
    ones: one layer more (the one the OneVision conversion drops), `vision_use_head`, stored as that checkpoint stores
    it (`vision_model.*`, the names the official LLaVA-NeXT code and every transformers version load). With `tower`
    (a tiny LLaVA-OneVision folder) its embeddings and layers are that model's tower's (the last one twice), so that
    official code loading the tower from this checkpoint (`from_pretrained(mm_vision_tower)`) gets the model's; else
    random. Its `post_layernorm` and head are random at `seed` either way (the layer norms too, not ones and zeros),
    so every checkpoint built from one config and seed has the same head."""
    from safetensors.torch import load_file, save_file
    from transformers import SiglipVisionModel

    out_dir = Path(out_dir)
    config = copy.deepcopy(vision_config)
    config.num_hidden_layers, config.vision_use_head = vision_config.num_hidden_layers + 1, True
    torch.manual_seed(seed)
    model = SiglipVisionModel(config)
    vision = getattr(model, "vision_model", model)
    with torch.no_grad():
        for norm in (vision.post_layernorm, vision.head.layernorm):
            norm.weight.normal_(1.0, 0.2)
            norm.bias.normal_(0.0, 0.2)
    weights = {"vision_model." + k.removeprefix("vision_model."): v.contiguous() for k, v in model.state_dict().items()}
    if tower is not None:
        last = vision_config.num_hidden_layers - 1
        own = {"vision_model." + k.removeprefix("vision_tower."): v.float() for k, v in
               load_file(Path(tower) / "model.safetensors").items()
               if k.startswith("vision_tower.") and ".post_layernorm." not in k}
        own.update({k.replace(f".layers.{last}.", f".layers.{last + 1}."): v.clone() for k, v in own.items()
                    if f".layers.{last}." in k})
        weights.update(own)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(weights, out_dir / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(out_dir)
    return out_dir


def tiny_siglip_head(vision_config: Any) -> Path:
    """A `build_tiny_siglip_head` checkpoint for towers of `vision_config` with one random tower layer (FastVID reads
    its head only; a full-size tower's width stays cheap: the latency benchmark's random models), built once into the
    temporary folder."""
    import hashlib

    one_layer = copy.deepcopy(vision_config)
    one_layer.num_hidden_layers = 0  # the builder adds the one a OneVision conversion drops
    digest = hashlib.sha256(one_layer.to_json_string(use_diff=False).encode()).hexdigest()[:12]
    return built_once(f"visiondrop-tiny-siglip-head-{digest}", lambda out: build_tiny_siglip_head(out, one_layer))


def tiny_clip_text(vision_hidden: int = 64) -> Path:
    """A `build_tiny_clip_text` checkpoint for towers `vision_hidden` wide, built once into the temporary folder."""
    return built_once(f"visiondrop-tiny-clip-text-{vision_hidden}",
                      lambda out: build_tiny_clip_text(out, vision_hidden))


def built_once(name: str, build: Callable[[Path], Path]) -> Path:
    """The checkpoint folder `name` in the temporary folder, built by `build` into it the first time."""
    import tempfile

    path = Path(tempfile.gettempdir()) / name
    if not (path / "model.safetensors").exists():
        staging = Path(tempfile.mkdtemp(prefix=path.name, dir=path.parent))
        build(staging)
        try:
            staging.rename(path)  # atomic: a concurrent builder's copy is as good
        except OSError:
            pass
    return path
