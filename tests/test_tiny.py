import pytest
import torch
from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

from visiondrop.testing.tiny import build_tiny, demo_image

PROMPT = "USER: <image>\nWhat is this? ASSISTANT:"


@pytest.fixture(scope="module")
def inputs(tiny):
    _, processor = tiny
    return processor(images=demo_image(0), text=PROMPT, return_tensors="pt")


def test_saved_folder_loads_with_auto_classes(tiny_dir):
    assert (tiny_dir / "model.safetensors").is_file()
    assert sum(f.stat().st_size for f in tiny_dir.iterdir()) < 8 * 2**20
    assert isinstance(LlavaForConditionalGeneration.from_pretrained(tiny_dir), LlavaForConditionalGeneration)
    assert AutoProcessor.from_pretrained(tiny_dir).image_token == "<image>"
    assert AutoTokenizer.from_pretrained(tiny_dir).padding_side == "left"


def test_layer_structure_matches_llava_15(tiny):
    model, _ = tiny
    assert not model.training
    assert model.dtype == torch.float32
    vision = model.model.vision_tower  # transformers 5.x: CLIPVisionModel has no `.vision_model` wrapper
    assert len(vision.encoder.layers) == 24
    assert vision.embeddings.num_positions == 577
    assert len(model.model.language_model.layers) == 32
    assert model.config.vision_feature_layer == -2
    assert model.config.vision_feature_select_strategy == "default"


def test_processor_expands_image_token(tiny, inputs):
    model, processor = tiny
    image_token_id = model.config.image_token_id
    assert processor.tokenizer.convert_ids_to_tokens(image_token_id) == "<image>"
    assert processor.tokenizer.encode("<image>", add_special_tokens=False) == [image_token_id]
    assert inputs["input_ids"][0, 0].item() == processor.tokenizer.bos_token_id
    assert (inputs["input_ids"] == image_token_id).sum().item() == 576
    assert inputs["pixel_values"].shape == (1, 3, 336, 336)


def test_processor_handles_non_square_images(tiny):
    _, processor = tiny
    out = processor(images=demo_image(1, size=(500, 300)), text=PROMPT, return_tensors="pt")
    assert out["pixel_values"].shape == (1, 3, 336, 336)
    assert (out["input_ids"] == processor.image_token_id).sum().item() == 576


def test_forward_logits_shape_and_diversity(tiny, inputs):
    model, processor = tiny
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], len(processor.tokenizer))
    assert logits[0, -1].std() > 0.5  # random init is not degenerate


def test_generate_returns_new_tokens(tiny, inputs):
    model, _ = tiny
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :]
    assert new.shape == (8,)
    assert len(set(new.tolist())) > 1


def test_outputs_depend_on_image(tiny):
    model, processor = tiny
    firsts = set()
    with torch.no_grad():
        for seed in range(4):
            batch = processor(images=demo_image(seed), text=PROMPT, return_tensors="pt")
            firsts.add(model(**batch).logits[0, -1].argmax().item())
    assert len(firsts) > 1


def test_same_seed_gives_identical_weights(tiny_dir, tmp_path):
    a = LlavaForConditionalGeneration.from_pretrained(tiny_dir).state_dict()  # seed 0
    b = LlavaForConditionalGeneration.from_pretrained(build_tiny("llava", tmp_path / "b", seed=0)).state_dict()
    c = LlavaForConditionalGeneration.from_pretrained(build_tiny("llava", tmp_path / "c", seed=4)).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])


def test_tokenizer_left_pads_batches(tiny):
    _, processor = tiny
    tok = processor.tokenizer
    batch = tok(["yes", "What color is the circle?"], padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 2
    assert mask[1].all() and not mask[0].all()
    n_pad = int((mask[0] == 0).sum())
    assert (ids[0, :n_pad] == tok.pad_token_id).all() and not mask[0, :n_pad].any()
    assert ids[0, n_pad].item() == tok.bos_token_id
    assert tok.decode(ids[1], skip_special_tokens=True) == "What color is the circle?"


def test_chat_template_matches_llava_prompt(tiny):
    _, processor = tiny
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    assert processor.apply_chat_template(conversation, add_generation_prompt=True) == PROMPT


def test_demo_image_is_deterministic():
    assert demo_image(5).tobytes() == demo_image(5).tobytes()
    assert demo_image(5).tobytes() != demo_image(6).tobytes()
    image = demo_image(0, size=(200, 120))
    assert image.mode == "RGB" and image.size == (200, 120)
