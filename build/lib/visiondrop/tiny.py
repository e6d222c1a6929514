"""Tiny, randomly initialised LLaVA-1.5 and LLaVA-NeXT (1.6) checkpoints built offline.

The models keep the real layer structure of ``llava-hf/llava-1.5-7b-hf`` and
``llava-hf/llava-v1.6-vicuna-7b-hf`` (24-layer CLIP ViT-L/14-336 tower with 577 positions,
32-layer Llama decoder, 2-layer GELU projector, vision_feature_layer=-2; for NeXT also the
AnyRes grid pinpoints and the learned ``image_newline``) at a tiny width, so that pruning code
sees the same shapes, layer counts and token layout as the real model while running in seconds on CPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoConfig,
    AutoProcessor,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]  # ids 0..4; unk/bos/eos match Llama
# llava-v1.6 AnyRes candidate resolutions, (height, width).
NEXT_GRID_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]

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
_CHAT_TEMPLATE = (  # llava-1.5 ("USER: <image>\n... ASSISTANT:") format
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def _build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
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


def _vision_config(layers: int, width: int, heads: int, init_std: float) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        image_size=336,
        patch_size=14,
        num_hidden_layers=layers,
        hidden_size=width,
        intermediate_size=2 * width,
        num_attention_heads=heads,
        hidden_act="quick_gelu",
        # CLIP scales attention/MLP init by width; this only widens patch and position embeddings.
        initializer_range=init_std,
    )


def _text_config(tokenizer, layers: int, width: int, heads: int, init_std: float) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        num_hidden_layers=layers,
        hidden_size=width,
        intermediate_size=2 * width,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=4096,
        initializer_range=init_std,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _common_config_kwargs(tokenizer) -> dict:
    """Settings shared by the LlavaConfig and LlavaNextConfig of the real checkpoints."""
    return dict(
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=576,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _processor_kwargs(tokenizer) -> dict:
    return dict(
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token
        chat_template=_CHAT_TEMPLATE,
    )


def _build(
    out_dir: str | Path,
    kind: str,
    *,
    seed: int = 0,
    text_layers: int = 32,
    vision_layers: int = 24,
    hidden: int = 64,
    vision_hidden: int = 64,
    heads: int = 4,
    vocab_size: int = 512,
    init_std: float = 0.2,
) -> Path:
    out_dir = Path(out_dir)
    tokenizer = _build_tokenizer(vocab_size)
    # The PIL backends need no torchvision. They save under the torchvision class name
    # ("CLIPImageProcessor" / "LlavaNextImageProcessor"), so AutoProcessor picks the torchvision
    # backend where that is installed, as for the real checkpoints, and the PIL one otherwise.
    image_kwargs = dict(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        do_center_crop=True,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )
    config_kwargs = dict(
        vision_config=_vision_config(vision_layers, vision_hidden, heads, init_std),
        text_config=_text_config(tokenizer, text_layers, hidden, heads, init_std),
        **_common_config_kwargs(tokenizer),
    )
    if kind == "llava":
        image_processor = CLIPImageProcessorPil(**image_kwargs)
        processor = LlavaProcessor(image_processor=image_processor, **_processor_kwargs(tokenizer))
        model_class, config = LlavaForConditionalGeneration, LlavaConfig(**config_kwargs)
    elif kind == "llava_next":
        image_processor = LlavaNextImageProcessorPil(
            **image_kwargs, image_grid_pinpoints=NEXT_GRID_PINPOINTS, do_pad=True
        )
        processor = LlavaNextProcessor(image_processor=image_processor, **_processor_kwargs(tokenizer))
        model_class = LlavaNextForConditionalGeneration
        config = LlavaNextConfig(**config_kwargs, image_grid_pinpoints=NEXT_GRID_PINPOINTS)
    else:
        raise ValueError(f"unknown kind {kind!r}")

    torch.manual_seed(seed)
    model = model_class(config)
    # Stored in float16 like the real checkpoint: halves the folder (~4.5 MB); load_tiny_llava upcasts.
    model.to(torch.float16).save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def build_tiny_llava(out_dir: str | Path, **knobs) -> Path:
    """Build, save and return the path of a tiny random LLaVA-1.5 (model, tokenizer, processor).

    knobs (keywords, see `_build`: seed, text_layers, vision_layers, hidden, vision_hidden, heads, vocab_size,
    init_std): ``vocab_size`` is the BPE training target; the model's vocabulary is the trained tokenizer's size.
    ``init_std`` is larger than the usual 0.02 so that random logits are far from uniform.
    """
    return _build(out_dir, "llava", **knobs)


def build_tiny_llava_next(out_dir: str | Path, **knobs) -> Path:
    """Build, save and return the path of a tiny random LLaVA-NeXT (llava-v1.6-vicuna-7b-hf layout).

    Same tower, decoder, tokenizer and knobs as :func:`build_tiny_llava`, plus the AnyRes image
    processor (base 336x336 view + up to 4 crops of 336x336 chosen from ``NEXT_GRID_PINPOINTS``)
    and the model's ``image_newline`` parameter.
    """
    return _build(out_dir, "llava_next", **knobs)


_MODEL_CLASSES = {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration}


def load_tiny_llava(
    path: str | Path, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32
) -> tuple[
    LlavaForConditionalGeneration | LlavaNextForConditionalGeneration, LlavaProcessor | LlavaNextProcessor
]:
    """Load a folder written by :func:`build_tiny_llava` or :func:`build_tiny_llava_next`.

    The model class follows the saved config's ``model_type``; the model is returned in eval mode.
    """
    model_class = _MODEL_CLASSES[AutoConfig.from_pretrained(path).model_type]
    model = model_class.from_pretrained(
        path, attn_implementation=attn_implementation, dtype=dtype
    ).eval()
    processor = AutoProcessor.from_pretrained(path)
    return model, processor


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
