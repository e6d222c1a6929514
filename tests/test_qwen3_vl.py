"""Qwen3-VL on the tiny offline model with the real structure (27-block ViT with DeepStack after blocks 8/16/24,
patch 16, 36-layer Qwen3 decoder with grouped-query attention and interleaved M-RoPE), saved and loaded with
`from_pretrained`.

The shared contract (full budget, batch == alone with three image sizes and a text-only sample, cache == replay,
unreachable budgets) runs on this family in tests/test_contract.py, the lmms-eval plugin's demo task in
tests/test_qwen.py, videos in tests/test_qwen3_vl_video.py; here: the pre-decoder selection fed to the
stock decoder by hand (the kept tokens' embeddings, original 3-D positions and DeepStack rows: the test that
catches misaligned DeepStack rows), counts with hooks meet the ratio, the encoder view, DeepStack rows of
merged tokens, and the MoE variant.
"""
import pytest
import torch

import visiondrop
from helpers import SHARE_METHODS, flops_and_counter, measure_counts
from visiondrop.families import family_of, flops_dims, info_of
from visiondrop.methods import method
from visiondrop.testing.tiny import demo_image

QUESTIONS = ["What is in the image?", "Is there a red circle in the picture? Answer yes or no.", "Colour?"]
SIZES = [(256, 256), (320, 224), (192, 384)]  # (width, height): 8x8, 10x7 and 6x12 visual tokens (32 px each)
NEW_TOKENS = 4


def batch_of(processor, questions: list[str], images: list) -> dict:
    text = [processor.apply_chat_template([{"role": "user", "content": ([{"type": "image"}] if img else [])
                                            + [{"type": "text", "text": q}]}], add_generation_prompt=True)
            for q, img in zip(questions, images)]
    present = [img for img in images if img is not None]
    return dict(processor(text=text, images=present or None, padding=True, return_tensors="pt"))


def budget(name: str) -> float:
    """The method's declared budget (of a 576-token image; the nominal Qwen3-VL image has 576 too)."""
    return method(name).example_budget


def described_mean(described: dict) -> float:
    return described.get("mean_tokens_entering_layers", described.get("equivalent_tokens", 576))


@pytest.fixture(scope="module")
def qwen3(tiny_qwen3):
    model, processor = tiny_qwen3
    processor.tokenizer.padding_side = "left"
    return model, processor, [demo_image(i, size) for i, size in enumerate(SIZES)]


def test_the_tiny_model_has_the_real_structure(qwen3):
    model, processor, images = qwen3
    vision, text = model.config.vision_config, model.config.text_config
    assert (vision.depth, vision.patch_size, list(vision.deepstack_visual_indexes)) == (27, 16, [8, 16, 24])
    assert (text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (36, 4, 2)
    assert text.rope_parameters["mrope_interleaved"] and sum(text.rope_parameters["mrope_section"]) == \
        text.head_dim // 2
    batch = batch_of(processor, QUESTIONS[:1], images[1:2])
    assert int((batch["input_ids"] == model.config.image_token_id).sum()) == 70
    info = info_of(model)
    assert (info.n_visual, info.n_layers, info.vision_layer, info.cls_kept) == (576, 36, 26, False)


def stock_positions(model, batch: dict) -> torch.Tensor:
    """The stock model's M-RoPE positions [3, B, L] of a prompt."""
    return model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"],
                                      attention_mask=batch["attention_mask"])[0]


def hand_fed_logits(model, batch: dict, kept: list[torch.Tensor], shift_deepstack: bool = False) -> torch.Tensor:
    """The stock decoder's last logits [B, V] on each prompt with only its `kept` image tokens: their stock
    embeddings, their stock 3-D positions and their stock DeepStack rows, fed by hand (left-padded again).
    shift_deepstack: give each kept token the DeepStack rows of the token after it instead (a misalignment)."""
    image_id = model.config.image_token_id
    with torch.no_grad():
        encoded = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
        embeds = model.get_input_embeddings()(batch["input_ids"])
        positions = stock_positions(model, batch)
    rows, deepstack, keeps, visual_masks = [], [[] for _ in encoded.deepstack_features], [], []
    for b, keep in enumerate(kept):
        real = batch["attention_mask"][b].bool()
        slots = (batch["input_ids"][b] == image_id).nonzero()[:, 0]
        keep_slots = torch.zeros_like(real)
        keep_slots[slots[keep]] = True
        chosen = (real & (batch["input_ids"][b] != image_id)) | keep_slots
        seq = embeds[b].clone()
        seq[slots] = encoded.pooler_output[b].to(seq.dtype)
        rows.append((seq[chosen], positions[:, b, chosen]))
        visual_masks.append(keep_slots[chosen])
        ds_keep = (keep + 1).clamp(max=len(slots) - 1) if shift_deepstack else keep
        for level, features in enumerate(encoded.deepstack_features):
            deepstack[level].append(features[b][ds_keep])
        keeps.append(chosen)
    length = max(r[0].shape[0] for r in rows)
    pad = [length - r[0].shape[0] for r in rows]
    inputs_embeds = torch.stack([torch.cat([e.new_zeros(p, e.shape[1]), e]) for (e, _), p in zip(rows, pad)])
    position_ids = torch.stack([torch.cat([q.new_zeros(3, p), q], 1) for (_, q), p in zip(rows, pad)], 1)
    mask = torch.stack([torch.arange(length) >= p for p in pad]).long()
    visual = torch.stack([torch.cat([torch.zeros(p, dtype=torch.bool), v]) for v, p in zip(visual_masks, pad)])
    with torch.no_grad():
        hidden = model.model.language_model(
            inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=position_ids, visual_pos_masks=visual,
            deepstack_visual_embeds=[torch.cat(level) for level in deepstack]).last_hidden_state
        return model.lm_head(hidden[:, -1])


@pytest.mark.parametrize("name,options", [("random", {}), ("divprune", {}),
                                          ("visionzip", {"dominant": 40, "contextual": 0}), ("vispruner", {})])
def test_pre_decoder_selection_equals_the_stock_decoder_fed_by_hand(qwen3, name, options):
    """A selection before the decoder (in the decoder's input: random, DivPrune; in the encoder cut: VisionZip
    without merging, VisPruner) equals the stock decoder fed the kept tokens' embeddings, original 3-D positions and
    DeepStack rows by hand; the kept tokens' DeepStack rows shifted by one token change the logits far beyond
    float noise (what the test catches)."""
    model, processor, images = qwen3
    batch = batch_of(processor, QUESTIONS[:2], images[1:])
    with visiondrop.apply(model, name, None if options else budget(name), **options) as handle, torch.no_grad():
        pruned = model(**batch).logits[:, -1]
        kept = [sample[0] for sample in handle.trace.kept]
    assert all(0 < len(k) < n for k, n in zip(kept, (70, 72)))
    torch.testing.assert_close(pruned, hand_fed_logits(model, batch, kept), atol=1e-4, rtol=1e-4)
    misaligned = hand_fed_logits(model, batch, kept, shift_deepstack=True)
    assert (misaligned - pruned).abs().max() > 1e-2


@pytest.mark.parametrize("name", SHARE_METHODS)
def test_ratio_keeps_that_share_of_each_image(qwen3, name):
    """ratio=r: every image keeps about r of its own visual tokens (mean over the 36 layers, counted with forward
    pre-hooks on the decoder layers)."""
    model, processor, images = qwen3
    ratio = budget(name) / 576
    for image in images:
        single = batch_of(processor, QUESTIONS[:1], [image])
        n = int((single["input_ids"] == model.config.image_token_id).sum())
        measured, handle = measure_counts(model, single, name, ratio=ratio)
        assert len(measured) == 36 and handle.trace.tokens_per_layer == [measured]
        nominal_share = described_mean(handle.policy.describe()) / 576
        assert abs(sum(measured) / len(measured) - nominal_share * n) <= 2, (name, n, measured)


def test_encoder_view_is_the_towers_output_with_its_deepstack_rows(qwen3):
    """The view's visual tokens (four patches each) through the merger are the stock image features, its side
    features through the DeepStack mergers the stock DeepStack rows; the mean attention received sums to one per
    head over the patches (four per token)."""
    model, processor, images = qwen3
    batch = batch_of(processor, QUESTIONS[:2], images[1:])
    family = family_of(model)
    group = family.image_groups(family.images(model, batch["pixel_values"], (batch["image_grid_thw"],), {}))
    with torch.no_grad():
        stock = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
        for i, images_one in enumerate(group):
            view = family.encoder_view(model, images_one)
            features = stock.pooler_output[i]
            assert not view.has_cls and view.hidden.shape[1] == features.shape[0] and view.side.shape[2] == 3
            torch.testing.assert_close(family.projector(model)(view.hidden)[0], features, atol=1e-5, rtol=1e-5)
            rows = family.side_projector(model)(view.side)[0]
            for level, deepstack in enumerate(stock.deepstack_features):
                torch.testing.assert_close(rows[:, level], deepstack[i], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(view.importance.sum(-1) * 4, torch.ones(1, view.importance.shape[1]))
            assert view.share == features.shape[0] / 576


def test_merged_tokens_carry_their_members_deepstack_rows(qwen3):
    """VisionZip's contextual tokens enter the decoder with DeepStack rows merged by the same weights as the tokens
    themselves (anchor + mean of members, before the DeepStack mergers): captured where the language model
    receives them, the rows of the kept tokens are the stock rows, those of the merged ones the DeepStack mergers
    of their members' combination."""
    model, processor, images = qwen3
    batch = batch_of(processor, QUESTIONS[:1], images[1:2])
    family = family_of(model)
    with torch.no_grad():
        stock = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
        view = family.encoder_view(model, family.images(model, batch["pixel_values"], (batch["image_grid_thw"],), {}))
    seen = {}
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True)
    try:
        with visiondrop.apply(model, "visionzip", dominant=54, contextual=10) as handle, torch.no_grad():
            model(**batch)
            sel = handle.policy.select_encoder(view)
    finally:
        hook.remove()
    (kept,) = handle.trace.kept[0]  # 54 * 70 / 576 -> 7 dominant tokens, 10 * 70 / 576 -> 1 contextual
    assert len(kept) == 7 and sel.weights.shape == (1, 1, 70) and torch.equal(sel.keep[0], kept)
    received = torch.stack(seen["deepstack_visual_embeds"], 1)  # [70 slots, 3, D]: 8 filled, then zeros
    stock_rows = torch.stack([level[0] for level in stock.deepstack_features], 1)
    torch.testing.assert_close(received[:7], stock_rows[kept], atol=1e-5, rtol=1e-5)
    members = sel.weights[0] @ view.side[0].flatten(1)  # anchor + mean of members, before the mergers
    expected = family.side_projector(model)(members.view(1, 1, *view.side.shape[2:]))[0, 0]
    torch.testing.assert_close(received[7], expected, atol=1e-5, rtol=1e-5)
    assert not received[8:].any()


def test_moe_is_the_30b_a3b_layout(tiny_of):
    """The MoE family (its decoder layers differ only in the MLP) runs the whole contract in tests/test_contract.py
    on its tiny model; here its structure: the checkpoint's 128 experts, 8 routed a token, 48 layers; the tiny model
    keeps the depth and routing with 8 experts, 2 routed (`Qwen3_VL_MoE.build_config`)."""
    from visiondrop.families import checkpoint_config

    full = checkpoint_config("qwen3-vl-30b-a3b").text_config
    assert (full.num_experts, full.num_experts_per_tok, full.moe_intermediate_size, full.num_hidden_layers,
            full.head_dim, full.num_key_value_heads) == (128, 8, 768, 48, 128, 4)
    model, _ = tiny_of("qwen3_vl_moe")
    assert type(model).__name__ == "Qwen3VLMoeForConditionalGeneration"
    text = model.config.text_config
    assert (text.num_experts, text.num_experts_per_tok, text.num_hidden_layers) == (8, 2, 48)
    assert info_of(model).n_layers == 48

@pytest.fixture(scope="module")
def nominal(qwen3):
    """One sample with the nominal 768x768 image: 576 visual tokens, the budgets' reference."""
    model, processor, _ = qwen3
    return batch_of(processor, QUESTIONS[:1], [demo_image(5, (768, 768))])


@pytest.mark.parametrize("name", ["none", "visionzip", "fastv"])
def test_flops_formula_matches_torch_flop_counter(qwen3, nominal, name):
    """The formula (27 full-attention tower layers, the merger and the three DeepStack mergers on what is projected,
    the encoder cut's scoring and DeepStack merge) gives what FlopCounterMode counts on the nominal image."""
    model, _, _ = qwen3
    assert int((nominal["input_ids"] == model.config.image_token_id).sum()) == 576
    formula, counter = flops_and_counter(model, nominal, name, None if name == "none" else 64)
    assert formula.total == pytest.approx(counter.get_total_flops(), rel=1e-6)
    modules = {key.rsplit(".", 1)[-1]: sum(counts.values()) for key, counts in counter.get_flop_counts().items()}
    assert modules["lm_head"] == pytest.approx(formula.lm_head, rel=1e-6)
    assert (formula.overhead > 0) == (name != "none")


def test_flops_presets_are_the_checkpoints_configs():
    from transformers import Qwen3VLConfig, Qwen3VLMoeConfig

    from visiondrop.efficiency.flops import checkpoint_dims, method_flops

    vision = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096)
    config = Qwen3VLConfig(vision_config=vision, text_config=dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128))
    assert flops_dims(config) == checkpoint_dims("qwen3-vl-8b")
    moe = Qwen3VLMoeConfig(vision_config={**vision, "out_hidden_size": 2048}, text_config=dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=48, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8))
    assert flops_dims(moe) == checkpoint_dims("qwen3-vl-30b-a3b")
    dims = checkpoint_dims("qwen3-vl-30b-a3b")  # active parameters: 8 experts of 768 and the router, heads of 128
    assert (dims.intermediate, dims.router, dims.head_dim, dims.side_projectors) == (8 * 768, 128, 128, 3)
    full, vz = method_flops("qwen3-vl-8b", "none"), method_flops("qwen3-vl-8b", "visionzip", 64)
    assert vz.vision == full.vision and vz.decoder < full.decoder / 4 and 0 < vz.overhead < 0.05 * vz.decoder
    assert vz.projector == pytest.approx(full.projector * 64 / 576)  # merger + 3 DeepStack mergers, kept tokens only
    moe_full = method_flops("qwen3-vl-30b-a3b", "none")
    assert moe_full.decoder < full.decoder / 2  # 3B active parameters against 8B


def test_latency_benchmark_builds_the_8b_architecture_at_tiny_width():
    """The benchmark's Qwen3-VL: the 8B layout at a tiny width, the nominal 768 image between its vision tokens with
    M-RoPE token types; full and VisionZip rows measured, FLOPs by the preset's formula at that width."""
    from visiondrop.efficiency.flops import method_flops
    from visiondrop.efficiency.latency import benchmark, make_inputs
    from visiondrop.families import checkpoint_config

    config = checkpoint_config("qwen3-vl-8b", "tiny")
    full_config = checkpoint_config("qwen3-vl-8b", "full")
    assert (full_config.text_config.num_key_value_heads, full_config.text_config.num_hidden_layers,
            list(full_config.vision_config.deepstack_visual_indexes),
            full_config.text_config.rope_parameters["mrope_section"]) == (8, 36, [8, 16, 24], [24, 20, 20])
    inputs = make_inputs(config, torch.device("cpu"), torch.float32)
    ids = inputs["input_ids"][0]
    image = (ids == config.image_token_id).nonzero()[:, 0]
    assert len(image) == 576 and inputs["image_grid_thw"].tolist() == [[1, 48, 48]]
    assert ids[image[0] - 1] == config.vision_start_token_id and ids[image[-1] + 1] == config.vision_end_token_id
    result = benchmark("qwen3-vl-8b", width="tiny", device="cpu", methods=["none", "visionzip"], repeats=1,
                       warmup=0, new_tokens=2, out=None, batch_sizes=[1])
    full, vz = result.rows
    assert (full.status, vz.status) == ("ok", "ok") and (full.tokens, vz.tokens) == (576, 64.0)
    assert vz.tflops == method_flops(flops_dims(config), "visionzip", 64).total / 1e12


@pytest.mark.parametrize("model_name", ["qwen3-vl-8b", "qwen3-vl-30b-a3b"])
def test_hydra_model_configs(tmp_path, tiny_qwen3_dir, model_name):
    """`model=qwen3-vl-8b` runs a job with the tiny checkpoint at a retention ratio (max_pixels in its identity);
    `model=qwen3-vl-30b-a3b` composes as the 8B's with its own checkpoint."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from visiondrop.harness import job

    root = Path(__file__).resolve().parents[1]
    with initialize_config_dir(config_dir=str(root / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=[
            f"results_dir={tmp_path}/runs", "limit=2", f"model={model_name}", "model.device=cpu",
            "model.dtype=float32", "model.max_pixels=65536", "method=visionzip", "budget.ratio=0.111111111"])
    assert cfg.model.name == model_name and cfg.model.n_visual == 576 and cfg.model.conv_template == "chat_template"
    if model_name != "qwen3-vl-8b":
        assert cfg.model.pretrained == "Qwen/Qwen3-VL-30B-A3B-Instruct"
        return
    cfg.model.pretrained = str(tiny_qwen3_dir)
    [record] = job.run_job(cfg)
    assert record["budget"] == 64.0 and record["model"] == "qwen3-vl-8b"
    assert record["identity"]["preprocessing"] == {"image_aspect_ratio": "none", "conv_template": "chat_template",
                                                   "max_pixels": 65536}
    # 64 visual tokens per image at this max_pixels, and VisionZip keeps 64/576 of each image's own
    assert 0 < record["measured_tokens"] <= 7 and record["tflops"] > 0


def test_early_decoder_merges_carry_deepstack_rows(qwen3):
    """SparseVLM pruning the output of layer 0 (a cut before layer 1, ahead of DeepStack's additions after layers 1
    and 2) recycles tokens into clusters whose DeepStack rows are their members' rows by the clustering's weights:
    a batch equals each alone; a policy that merges there without stating its weights is refused, clearly."""
    from visiondrop.api import Handle
    from visiondrop.engine import Policy, Selection

    model, processor, images = qwen3
    batch = batch_of(processor, QUESTIONS[:2], images[1:])
    singles = [batch_of(processor, [q], [img]) for q, img in zip(QUESTIONS[:2], images[1:])]
    options = {"layers": [0, 6, 15], "keep_lists": [200, 100, 50]}
    with visiondrop.apply(model, "sparsevlm", **options) as handle, torch.no_grad():
        assert handle.policy.cut_layers[0] == 1
        together = model(**batch).logits[:, -1]
        selection = handle.trace.selections[0][0]
        assert selection[1].shape[0] > 0 and selection[2].shape == (selection[1].shape[0], 70)
        for i, single in enumerate(singles):
            torch.testing.assert_close(model(**single).logits[:, -1], together[i:i + 1], atol=1e-4, rtol=1e-4)

    class MergesWithoutWeights(Policy):
        name, cut_layers = "merges-without-weights", (1,)

        def select_decoder(self, cut):
            rows = cut.visual_rows(cut.hidden)
            return Selection(torch.arange(4).expand(rows.shape[0], -1), rows[:, 4:5])

    with Handle(model, MergesWithoutWeights()), torch.no_grad(), pytest.raises(ValueError, match="merge weights"):
        model(**batch)
