import json

import pytest
import torch
from transformers import AutoProcessor, LlavaNextForConditionalGeneration

from helpers import assert_equal_up_to_reordering
from visiondrop.families.llava_next import GRID_PINPOINTS as NEXT_GRID_PINPOINTS
from visiondrop.testing.tiny import demo_image

PROMPT = "USER: <image>\nWhat is this? ASSISTANT:"

# (width, height) -> (AnyRes views incl. the 336x336 base view, <image> tokens after expansion).
# Tokens = 576 (base) + unpadded grid of the chosen pinpoint + one image_newline per grid row.
EXPECTED = {
    (336, 336): (3, 1176),  # ties resolve to the first pinpoint, 336x672 (h, w): 576 + 24*24 + 24
    (672, 336): (3, 1752),  # wide -> 336x672: 576 + 24*48 + 24
    (336, 672): (3, 1776),  # tall -> 672x336: 576 + 48*24 + 48
    (500, 400): (5, 2438),  # -> 672x672, unpadded to 43 rows: 576 + 43*42 + 43
}


def test_saved_folder_loads_with_auto_classes(tiny_next_dir, tiny_next):
    assert (tiny_next_dir / "model.safetensors").is_file()
    assert sum(f.stat().st_size for f in tiny_next_dir.iterdir()) < 8 * 2**20
    config = json.loads((tiny_next_dir / "config.json").read_text())
    assert config["model_type"] == "llava_next" and config["dtype"] == "float16"
    loaded_model = LlavaNextForConditionalGeneration.from_pretrained(tiny_next_dir)
    assert isinstance(loaded_model, LlavaNextForConditionalGeneration)
    processor = AutoProcessor.from_pretrained(tiny_next_dir)
    assert type(processor).__name__ == "LlavaNextProcessor"
    assert type(processor.image_processor).__name__ in ("LlavaNextImageProcessorPil", "LlavaNextImageProcessor")
    assert processor.image_processor.image_grid_pinpoints == NEXT_GRID_PINPOINTS
    assert processor.image_processor.do_pad
    assert processor.num_additional_image_tokens == 1 and processor.patch_size == 14
    assert processor.tokenizer.padding_side == "left"
    model, loaded = tiny_next
    assert isinstance(model, LlavaNextForConditionalGeneration) and type(loaded) is type(processor)


def test_layer_structure_matches_llava_v16(tiny_next):
    model, _ = tiny_next
    assert not model.training and model.dtype == torch.float32
    vision = model.model.vision_tower
    assert len(vision.encoder.layers) == 24
    assert vision.embeddings.num_positions == 577
    assert len(model.model.language_model.layers) == 32
    assert model.model.image_newline.shape == (model.config.text_config.hidden_size,)
    assert model.config.vision_feature_layer == -2
    assert model.config.vision_feature_select_strategy == "default"
    assert model.config.image_seq_length == 576
    assert model.config.image_grid_pinpoints == NEXT_GRID_PINPOINTS


@pytest.mark.parametrize("size", list(EXPECTED), ids=lambda s: f"{s[0]}x{s[1]}")
def test_image_token_count_matches_packed_features(tiny_next, size, record_property):
    model, processor = tiny_next
    width, height = size
    batch = processor(images=demo_image(0, size=size), text=PROMPT, return_tensors="pt")
    crops, expected_tokens = EXPECTED[size]
    assert batch["pixel_values"].shape == (1, crops, 3, 336, 336)
    assert batch["image_sizes"].tolist() == [[height, width]]
    n_tokens = (batch["input_ids"] == model.config.image_token_id).sum().item()

    with torch.no_grad():
        features = model.model.get_image_features(
            pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"]
        ).pooler_output
        logits = model(**batch).logits
    assert [f.shape for f in features] == [(n_tokens, model.config.text_config.hidden_size)]
    assert logits.shape == (1, batch["input_ids"].shape[1], len(processor.tokenizer))
    record_property("image_tokens", n_tokens)
    record_property("crops", crops)
    print(f"{width}x{height}: crops={crops} image_tokens={n_tokens}")
    assert n_tokens == expected_tokens

    out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, batch["input_ids"].shape[1] + 4)


def test_batch_of_mixed_aspect_ratios_generates(tiny_next):
    model, processor = tiny_next
    sizes = [(672, 336), (500, 400)]  # 3 and 5 views: the wide image's pixel_values are zero-padded
    images = [demo_image(i, size=s) for i, s in enumerate(sizes)]
    prompts = [PROMPT, "USER: <image>\nDescribe the image in detail. ASSISTANT:"]
    batch = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    assert batch["pixel_values"].shape == (2, 5, 3, 336, 336)
    assert batch["pixel_values"][0, 3:].abs().sum() == 0
    assert batch["image_sizes"].tolist() == [[h, w] for w, h in sizes]
    counts = (batch["input_ids"] == model.config.image_token_id).sum(1).tolist()
    assert counts == [EXPECTED[s][1] for s in sizes]
    # Left padding: the shorter row is padded at the front and every row ends with the prompt.
    assert (batch["attention_mask"][:, -1] == 1).all()
    assert (batch["attention_mask"][:, 0] == 0).any()

    out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, batch["input_ids"].shape[1] + 4)

    # Each row agrees with the same prompt run alone (padding and image packing are per sample).
    with torch.no_grad():
        batched = model(**batch).logits[:, -1]
        for i, (prompt, image) in enumerate(zip(prompts, images)):
            single = processor(images=image, text=prompt, return_tensors="pt")
            assert_equal_up_to_reordering(batched[i], model(**single).logits[0, -1], f"row {i} in a batch vs alone")
