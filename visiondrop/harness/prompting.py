"""LLaVA evaluation preprocessing as small pure functions: the prompt text and the expand-to-square image.

LLaVA-1.5's own evaluation (`--conv-mode vicuna_v1`, `image_aspect_ratio=pad`) produced the published numbers;
the llava-hf processor and chat template differ on both counts (centre crop, no system sentence), so the
harness rebuilds the original preprocessing here and offers the processor's behaviour as an option.
"""
from __future__ import annotations

from typing import Any

from PIL import Image

VICUNA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the human's questions.")
CONV_TEMPLATES = ("vicuna_v1", "llava_hf", "chat_template")
#: the answer-format suffix LLaVA's short-answer tasks append, which CDPruner's evaluation removes from its instruction
ANSWER_FORMAT = "\nAnswer the question using a single word or phrase."
ASPECT_RATIOS = ("pad", "none")


def instruction(question: str) -> str:
    """The instruction a text-conditioned method selects for (CDPruner): the question without LLaVA's answer-format
    suffix, as the official `model_vqa_loader` passes it (`question.replace(ANSWER_FORMAT, "")`)."""
    return question.replace(ANSWER_FORMAT, "")


def with_image_token(question: str, has_image: bool, kind: str = "image") -> str:
    """LLaVA puts the image (Video-LLaVA: the video, kind="video") before the question (`<image>\\n{question}`)
    unless the task already placed it."""
    token = f"<{kind}>"
    if has_image and token not in question:
        return f"{token}\n{question}"
    return question


def vicuna_v1_prompt(question: str, has_image: bool, kind: str = "image") -> str:
    """The vicuna_v1 conversation of LLaVA's eval scripts, up to the assistant's turn."""
    return f"{VICUNA_V1_SYSTEM} USER: {with_image_token(question, has_image, kind)} ASSISTANT:"


def chat_template_prompt(processor: Any, question: str, has_image: bool, kind: str = "image") -> str:
    """The checkpoint's own chat template (llava-hf: `USER: <image>\\n{question} ASSISTANT:`, no system text;
    Qwen2.5-VL: its system turn, then `<|vision_start|><|image_pad|><|vision_end|>{question}` as the user's)."""
    content = [{"type": kind}] if has_image and f"<{kind}>" not in question else []
    content.append({"type": "text", "text": question})
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def build_prompt(processor: Any, question: str, has_image: bool, conv_template: str = "vicuna_v1",
                 kind: str = "image") -> str:
    """The prompt of one sample; kind: "image" or "video" (its placeholder, `<image>` or `<video>`)."""
    if conv_template == "vicuna_v1":
        return vicuna_v1_prompt(question, has_image, kind)
    if conv_template in ("llava_hf", "chat_template"):  # the checkpoint's own (llava-hf's, Qwen2.5-VL's)
        return chat_template_prompt(processor, question, has_image, kind)
    raise ValueError(f"unknown conv_template {conv_template!r}; available: {', '.join(CONV_TEMPLATES)}")


def mean_colour(image_mean: list[float] | tuple[float, ...]) -> tuple[int, ...]:
    """The background LLaVA pads with: the image processor's normalisation mean as 0-255 RGB (CLIP: 122,116,104)."""
    return tuple(int(x * 255) for x in image_mean)


def expand_to_square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """LLaVA's `expand2square`: paste the image centred on a square canvas of its longer side."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), background)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square
