"""Every registered method on the tiny Qwen2.5-VL: windowed ViT without CLS, 2x2 merger, M-RoPE, dynamic resolution.

The shared contract (full budget, batch == alone with three image sizes, cache == replay, counts, remove(),
unreachable budgets) runs on this family in tests/test_contract.py; here: SDPA == eager, ratios, beam search, and what
is Qwen's own: kept tokens keep their M-RoPE positions (a cut equals the stock model with the dropped tokens masked
out at the stock positions), and the encoder view undoes the tower's window order.
"""
import pytest
import torch

import visiondrop
from helpers import IMAGE_METHODS, SHARE_METHODS, assert_equal_up_to_reordering, flops_and_counter, greedy, measure_counts
from visiondrop.families import family_of, flops_dims
from visiondrop.families.qwen2_5_vl import NOMINAL_SIDE
from visiondrop.methods import method
from visiondrop.testing.tiny import demo_image, load_tiny

QUESTIONS = ["What is in the image?", "Is there a red circle in the picture? Answer yes or no.", "Colour?"]
SIZES = [(224, 224), (280, 196), (168, 336)]  # (width, height): 8x8, 10x7 and 6x12 visual tokens
NEW_TOKENS = 4


def prompt(processor, question: str, image: bool = True) -> str:
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def batch_of(processor, questions: list[str], images: list) -> dict:
    text = [prompt(processor, q, img is not None) for q, img in zip(questions, images)]
    present = [img for img in images if img is not None]
    return dict(processor(text=text, images=present or None, padding=True, return_tensors="pt"))


def run(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens [B, T] and the logits of every step [B, T, V]."""
    out = model.generate(**batch, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, batch["input_ids"].shape[1]:], torch.stack(out.logits, 1)


def budget(name: str) -> float:
    """The method's declared budget (of a 576-token image; the nominal Qwen image has 576 too)."""
    return method(name).example_budget


@pytest.fixture(scope="module")
def qwen(tiny_qwen):
    model, processor = tiny_qwen
    processor.tokenizer.padding_side = "left"
    images = [demo_image(i, size) for i, size in enumerate(SIZES)]
    return model, processor, images


@pytest.fixture(scope="module")
def eager(tiny_qwen_dir):
    return load_tiny(tiny_qwen_dir, attn_implementation="eager")[0]


@pytest.mark.parametrize("name", IMAGE_METHODS)
def test_sdpa_equals_eager(qwen, eager, name):
    model, processor, images = qwen
    batch = batch_of(processor, QUESTIONS[:2], images[:2])
    with visiondrop.apply(model, name, budget(name)) as handle:
        tokens, logits = run(model, batch)
        kept = [[k.tolist() for k in sample] for sample in handle.trace.kept]
    with visiondrop.apply(eager, name, budget(name)) as handle:
        eager_tokens, eager_logits = run(eager, batch)
        assert [[k.tolist() for k in sample] for sample in handle.trace.kept] == kept
    assert_equal_up_to_reordering(eager_logits, logits, f"{name}: eager vs SDPA")
    assert torch.equal(eager_tokens, tokens)


@pytest.fixture(scope="module")
def nominal(qwen):
    """One sample with the nominal 672x672 image: 576 visual tokens, the budgets' reference."""
    model, processor, _ = qwen
    return batch_of(processor, QUESTIONS[:1], [demo_image(5, (NOMINAL_SIDE, NOMINAL_SIDE))])


def described_mean(described: dict) -> float:
    return described.get("mean_tokens_entering_layers", described.get("equivalent_tokens", 576))


@pytest.mark.parametrize("name", SHARE_METHODS)
def test_ratio_keeps_that_share_of_each_image(qwen, name):
    """ratio=r: every image keeps about r of its own visual tokens (mean over the layers, counted with hooks)."""
    model, processor, images = qwen
    ratio = budget(name) / 576
    for image in images:
        single = batch_of(processor, QUESTIONS[:1], [image])
        n = int((single["input_ids"] == model.config.image_token_id).sum())
        measured, handle = measure_counts(model, single, name, ratio=ratio)
        nominal_share = described_mean(handle.policy.describe()) / 576
        assert abs(sum(measured) / len(measured) - nominal_share * n) <= 2, (name, n, measured)


def stock_positions(model, batch: dict) -> torch.Tensor:
    """The stock model's M-RoPE positions [3, B, L] of a prompt."""
    return model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"],
                                      attention_mask=batch["attention_mask"])[0]


@pytest.mark.parametrize("name,options", [("random", {}), ("visionzip", {"dominant": 40, "contextual": 0})])
def test_kept_tokens_keep_their_positions(qwen, name, options):
    """Dropping before the decoder equals the stock model with the dropped image tokens masked out at the stock
    positions: the kept tokens keep their M-RoPE positions, and so does the text after them."""
    model, processor, images = qwen
    batch = batch_of(processor, QUESTIONS[:2], images[1:])
    positions = stock_positions(model, batch)
    with visiondrop.apply(model, name, budget(name) if not options else None, **options) as handle, torch.no_grad():
        pruned = model(**batch).logits[:, -1]
        kept = [sample[0] for sample in handle.trace.kept]
    mask = batch["attention_mask"].clone()
    for b, keep in enumerate(kept):
        slots = (batch["input_ids"][b] == model.config.image_token_id).nonzero()[:, 0]
        dropped = torch.ones(len(slots), dtype=torch.bool)
        dropped[keep] = False
        assert 0 < int(dropped.sum()) < len(slots)
        mask[b, slots[dropped]] = 0
    with torch.no_grad():
        masked = model(**{**batch, "attention_mask": mask}, position_ids=positions).logits[:, -1]
    assert_equal_up_to_reordering(pruned, masked, "pruned vs masked")  # the same sums over other lengths


def test_encoder_view_is_the_towers_output_in_raster_order(qwen):
    """The view's visual tokens (four patches each) projected by the merger are the stock image features; the
    mean attention received sums to one per head over the patches (four per token)."""
    model, processor, images = qwen
    batch = batch_of(processor, QUESTIONS[:2], images[1:])
    family = family_of(model)
    group = family.image_groups(family.images(model, batch["pixel_values"], (batch["image_grid_thw"],), {}))
    with torch.no_grad():
        stock = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output
        for images_one, features in zip(group, stock):
            view = family.encoder_view(model, images_one)
            assert not view.has_cls and view.hidden.shape[1] == features.shape[0]
            torch.testing.assert_close(family.projector(model)(view.hidden)[0], features, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(view.importance.sum(-1) * 4, torch.ones(1, view.importance.shape[1]))
            assert view.share == features.shape[0] / 576


def test_merged_tokens_take_the_centre_of_the_grid(qwen):
    """VisionZip's contextual tokens enter the decoder at the centre of the image's grid (10x7 tokens at rows
    s..s+6, columns s..s+9: (s, s+3, s+4)), its dominant ones at their stock positions; the text after the image
    keeps its own."""
    model, processor, images = qwen
    batch = batch_of(processor, QUESTIONS[:1], images[1:2])
    stock = stock_positions(model, batch)[:, 0]
    image = batch["input_ids"][0] == model.config.image_token_id
    block, start = stock[:, image], int(stock[0, image][0])
    assert family_of(model).merged_position(block).tolist() == [start, start + 3, start + 4]
    seen = []
    hook = model.model.language_model.rotary_emb.register_forward_pre_hook(lambda m, args: seen.append(args[1]))
    try:
        with visiondrop.apply(model, "visionzip", dominant=54, contextual=10) as handle, torch.no_grad():
            model(**batch)
    finally:
        hook.remove()
    (kept,) = handle.trace.kept[0]  # 54 * 70 / 576 -> 7 dominant tokens, 10 * 70 / 576 -> 1 contextual
    first = int(image.long().argmax())
    positions = seen[0][:, 0]
    assert torch.equal(positions[:, first:first + 7], block[:, kept]) and len(kept) == 7
    assert positions[:, first + 7].tolist() == [start, start + 3, start + 4]
    assert torch.equal(positions[:, first + 8:], stock[:, first + 70:]) and torch.equal(positions[:, :first],
                                                                                          stock[:, :first])


@pytest.mark.parametrize("checkpoint,max_pixels", [("tiny_qwen_dir", 224 * 224), ("tiny_qwen3_dir", 256 * 256)])
def test_demo_task_through_the_plugin(request, checkpoint, max_pixels):
    """The local demo task runs through the lmms-eval plugin on the tiny Qwen2.5-VL (and Qwen3-VL): chat template,
    max_pixels, a batch of two equal to one at a time."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from visiondrop.harness import TASKS_DIR
    from visiondrop.harness.lmms_model import PrunedLVLM

    infos, logged = [], []
    for batch_size in (1, 2):
        lm = PrunedLVLM(pretrained=str(request.getfixturevalue(checkpoint)), method="visionzip", budget=64,
                        batch_size=batch_size, max_pixels=max_pixels)
        results = simple_evaluate(model=lm, tasks=["visiondrop_demo"], task_manager=TaskManager(
            include_path=str(TASKS_DIR)), limit=3, bootstrap_iters=0, log_samples=True,
            datetime_str="20250101_000000", gen_kwargs="max_new_tokens=4")
        assert set(results["results"]["visiondrop_demo"]) >= {"exact_match,none"}
        logged.append([s["resps"] for s in results["samples"]["visiondrop_demo"]])
        infos.append(lm.run_info)
    assert logged[0] == logged[1]
    info = infos[0]
    assert info["conv_template"] == "chat_template" and info["processor_options"] == {"max_pixels": max_pixels}
    assert lm.processor.image_processor.size.longest_edge == max_pixels  # the processor stores max_pixels there
    # at most 64 visual tokens per image at this max_pixels: VisionZip keeps 64/576 of them (round(54/9) + round(10/9))
    assert info["samples"] == 3 and info["measured_tokens_mean"] <= 7


@pytest.mark.parametrize("name", ["none", "visionzip", "visiondrop", "fastv"])
def test_flops_formula_matches_torch_flop_counter(qwen, nominal, name):
    """The formula (windowed and full-attention tower layers, the merger on what is projected, the encoder cut's
    scoring) gives what FlopCounterMode counts on the nominal image; the tower without the merger, and the merger,
    as the formula's vision and projector parts."""
    model, _, _ = qwen
    formula, counter = flops_and_counter(model, nominal, name, None if name == "none" else 64)
    assert formula.total == pytest.approx(counter.get_total_flops(), rel=1e-6)
    modules = {key.rsplit(".", 1)[-1]: sum(counts.values()) for key, counts in counter.get_flop_counts().items()}
    tower = modules["visual"] - (modules["merger"] if name in ("none", "fastv") else 0)  # the merger inside it
    assert (tower, modules["merger"], modules["lm_head"]) == pytest.approx(
        (formula.vision, formula.projector, formula.lm_head), rel=1e-6)
    assert (formula.overhead > 0) == (name != "none")


def test_flops_preset_is_the_7b_config():
    from transformers import Qwen2_5_VLConfig

    from visiondrop.efficiency.flops import checkpoint_dims, method_flops

    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                           fullatt_block_indexes=[7, 15, 23, 31], window_size=112))
    assert flops_dims(config) == checkpoint_dims("qwen2.5-vl-7b")
    full, vz = method_flops("qwen2.5-vl-7b", "none"), method_flops("qwen2.5-vl-7b", "visionzip", 64)
    assert vz.vision == full.vision and vz.decoder < full.decoder / 4 and 0 < vz.overhead < 0.05 * vz.decoder


def test_latency_benchmark_builds_the_7b_architecture_at_tiny_width():
    """The benchmark's Qwen2.5-VL: the 7B layout at a tiny width, the nominal 672 image between its vision tokens
    with M-RoPE token types; full and VisionZip rows measured, FLOPs by the preset's formula at that width."""
    from visiondrop.efficiency.flops import method_flops
    from visiondrop.efficiency.latency import benchmark, make_inputs
    from visiondrop.families import checkpoint_config

    config = checkpoint_config("qwen2.5-vl-7b", "tiny")
    full_config = checkpoint_config("qwen2.5-vl-7b", "full")
    assert (full_config.text_config.num_key_value_heads, full_config.vision_config.fullatt_block_indexes,
            full_config.text_config.rope_parameters["mrope_section"]) == (4, [7, 15, 23, 31], [16, 24, 24])
    inputs = make_inputs(config, torch.device("cpu"), torch.float32)
    ids = inputs["input_ids"][0]
    image = (ids == config.image_token_id).nonzero()[:, 0]
    assert len(image) == 576 and int((ids != config.image_token_id).sum()) == 63
    assert ids[image[0] - 1] == config.vision_start_token_id and ids[image[-1] + 1] == config.vision_end_token_id
    assert inputs["image_grid_thw"].tolist() == [[1, 48, 48]] and inputs["mm_token_type_ids"].sum() == 576
    result = benchmark("qwen2.5-vl-7b", width="tiny", device="cpu", methods=["none", "visionzip"], repeats=1,
                       warmup=0, new_tokens=2, out=None, batch_sizes=[1])
    full, vz = result.rows
    assert (full.status, vz.status) == ("ok", "ok") and (full.tokens, vz.tokens) == (576, 64.0)
    assert vz.tflops == method_flops(flops_dims(config), "visionzip", 64).total / 1e12


def test_hydra_model_config_runs_a_job_with_ratio_budgets(tmp_path, tiny_qwen_dir):
    """`model=qwen2.5-vl-7b` with the tiny checkpoint: a job at a retention ratio, max_pixels in its identity."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from visiondrop.harness import job

    root = Path(__file__).resolve().parents[1]
    with initialize_config_dir(config_dir=str(root / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=[
            f"results_dir={tmp_path}/runs", "limit=2", "model=qwen2.5-vl-7b", f"model.pretrained={tiny_qwen_dir}",
            "model.device=cpu", "model.dtype=float32", "model.max_pixels=50176", "method=visionzip",
            "budget.ratio=0.111111111"])
    [record] = job.run_job(cfg)
    assert record["budget"] == 64.0 and record["model"] == "qwen2.5-vl-7b"
    assert record["identity"]["preprocessing"] == {"image_aspect_ratio": "none", "conv_template": "chat_template",
                                                   "max_pixels": 50176}
    # at most 64 visual tokens per image at this max_pixels, and VisionZip keeps 64/576 of each image's own
    assert 0 < record["measured_tokens"] <= 7 and record["tflops"] > 0


@pytest.mark.parametrize("name", ["none", "visiondrop", "visionzip", "fastv"])
def test_beam_search_batch_equals_each_alone(qwen, name):
    """Beam search reorders the pruned cache's rows: two image sizes in one batch give each one's beams alone
    (and `none` the stock model's)."""
    model, processor, images = qwen
    batch = batch_of(processor, QUESTIONS[:2], images[:2])
    singles = [batch_of(processor, [q], [img]) for q, img in zip(QUESTIONS[:2], images[:2])]
    stock = greedy(model, batch, NEW_TOKENS, num_beams=3) if name == "none" else None
    with visiondrop.apply(model, name, budget(name)):
        together = greedy(model, batch, NEW_TOKENS, num_beams=3)
        alone = [greedy(model, single, NEW_TOKENS, num_beams=3)[0] for single in singles]
    assert all(torch.equal(t, a) for t, a in zip(together, alone)), name
    assert stock is None or torch.equal(together, stock)


def test_patch_cells_scale_each_grid_onto_the_nominal_one(qwen):
    """Positional-bias maps: a 10x7-token image's tokens land at their relative places in the 24x24 grid."""
    model = qwen[0]
    family = family_of(model)
    assert family.patch_grid(model.config) == (1, 24)
    cells = family.patch_cells(model, torch.tensor([1, 14, 20]))  # 7 rows x 10 columns of tokens
    assert cells.shape == (70, 3) and set(cells[:, 0].tolist()) == {0}
    assert cells[0].tolist() == [0, 0, 0] and cells[9].tolist() == [0, 0, 21] and cells[69].tolist() == [0, 20, 21]
    assert cells[10].tolist() == [0, 3, 0]  # row 1 of 7 -> 24 // 7


@pytest.mark.parametrize("name", ["visiondrop", "vispruner"])
def test_an_image_of_one_visual_token_beside_a_wide_one(tiny_qwen, name):
    """A 28x28 image is one visual token: an encoder cut may keep none of it (VisPruner at 25%), and decoder cuts
    may find none left (VisionDrop's later stages); beside a 1000x56 image in a batch it keeps what it keeps alone."""
    model, processor = tiny_qwen
    processor.tokenizer.padding_side = "left"
    images = [demo_image(1, (28, 28)), demo_image(2, (1000, 56))]
    batch = batch_of(processor, QUESTIONS[:2], images)
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 72]]  # min_pixels: one 2x2 group of patches
    with visiondrop.apply(model, name, ratio=0.25) as handle, torch.no_grad():
        model(**batch)
        together = handle.trace
        for i, (question, image) in enumerate(zip(QUESTIONS, images)):
            model(**batch_of(processor, [question], [image]))
            assert [k.tolist() for k in together.kept[i]] == [k.tolist() for k in handle.trace.kept[0]], i
            assert together.tokens_per_layer[i] == handle.trace.tokens_per_layer[0], i
