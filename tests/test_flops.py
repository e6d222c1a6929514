"""FLOPs: the paper's four points, the formula against torch's FLOP counter on a real forward, overhead, the CLI."""
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig

from helpers import inputs
from visiondrop.families import flops_dims
from visiondrop.api import METHODS
from visiondrop.methods import method as registered
from visiondrop.efficiency.flops import (checkpoint_dims, decode_step_flops, flop_counter, main, measure_schedule,
                                         method_decode_flops, method_flops, overhead_flops, prefill_flops, schedule)

ROOT = Path(__file__).resolve().parents[1]
VD64 = (96,) * 8 + (70,) * 8 + (52,) * 8 + (38,) * 8  # methods.md 1(f)


@pytest.mark.parametrize("model, method, budget, paper, tolerance", [
    ("llava-1.5-7b", "none", None, 9.06, 0.01),
    ("llava-1.5-7b", "visiondrop", 64, 2.11, 0.02),
    ("llava-next-7b", "none", None, 46.25, 0.01),
    ("llava-next-7b", "visiondrop", 320, 7.70, 0.03),
])
def test_reproduces_the_paper(model, method, budget, paper, tolerance):
    total = method_flops(model, method, budget).total / 1e12
    assert abs(total - paper) <= tolerance * paper, f"{model} {method} {budget}: {total:.3f} T vs paper {paper} T"


def test_schedules_are_measured_or_derived():
    vd = schedule(checkpoint_dims("llava-1.5-7b"), "visiondrop", 64)  # measured on the proxy
    assert vd.tokens_per_layer == VD64 and vd.projected == 96
    assert [(c.layer, c.kept, c.merged) for c in vd.cuts] == [(None, 84, 12), (8, 60, 10), (16, 44, 8), (24, 32, 6)]
    nxt = schedule(checkpoint_dims("llava-next-7b"), "visiondrop", 320)
    assert nxt.tokens_per_layer == tuple(n for n in (480, 350, 260, 190) for _ in range(8))
    assert (nxt.projected, nxt.crops, len(nxt.cuts)) == (480, 5, 5 + 3)
    full = schedule(checkpoint_dims("llava-1.5-7b"), "none")
    assert full.tokens_per_layer == (576,) * 32 and full.projected is None and not full.cuts


def test_lm_head_and_attention_convention():
    """LM head on every prefill position of the last layer; attention over the full square (2 n^2 d MACs)."""
    dims = checkpoint_dims("llava-1.5-7b")
    one, two = (prefill_flops(dims, [576] * 32, text) for text in (0, 1))
    d, m, n = dims.hidden, dims.intermediate, 576
    assert two.lm_head - one.lm_head == 2 * d * dims.vocab
    assert two.decoder - one.decoder == 32 * 2 * ((4 * d * d + 3 * d * m) + 2 * ((n + 1) ** 2 - n ** 2) * d)


def test_from_config_reads_llava_and_llava_next():
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32064)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14)
    assert flops_dims(LlavaConfig(text_config=text, vision_config=vision)) == checkpoint_dims("llava-1.5-7b")
    # the preset's 49 extra tokens are a calibration of the paper's NeXT accounting, not a config field
    nxt = flops_dims(LlavaNextConfig(text_config=text, vision_config=vision))
    assert nxt == replace(checkpoint_dims("llava-next-7b"), extra_tokens=0) and nxt.n_visual == 2880


@pytest.mark.parametrize("method, budget", [("none", None), ("visiondrop", 64)])
def test_formula_matches_torch_flop_counter(tiny, method, budget):
    """The formula, fed the measured counts and the real text length, gives what FlopCounterMode counts."""
    model, processor = tiny
    batch = inputs(processor, ["What is in the image?"])
    with flop_counter() as counter:
        sched = measure_schedule(model, batch, method, budget)
    dims = flops_dims(model.config)
    text = batch["input_ids"].shape[1] - dims.n_visual
    formula = prefill_flops(dims, sched.tokens_per_layer, text, projected_tokens=sched.projected,
                            overhead=overhead_flops(dims, method, sched.cuts, text))
    measured = counter.get_total_flops()
    assert formula.total == pytest.approx(measured, rel=0.02)
    modules = {name.rsplit(".", 1)[-1]: sum(counts.values()) for name, counts in counter.get_flop_counts().items()}
    for part, module in (("vision", "vision_tower"), ("projector", "multi_modal_projector"), ("lm_head", "lm_head")):
        assert getattr(formula, part) == pytest.approx(modules[module], rel=0.02), part
    assert sched.tokens_per_layer == ((576,) * 32 if method == "none" else VD64)
    assert (formula.overhead > 0) == (method != "none")


def test_decode_step_formula_matches_torch_flop_counter(tiny):
    """One decode step after an unpruned prefill: the formula gives what FlopCounterMode counts."""
    import torch

    from visiondrop.engine.compat import CACHE_ARG, cache_kwargs

    model, processor = tiny
    batch = inputs(processor, ["What is in the image?"])
    dims = flops_dims(model.config)
    with torch.no_grad():
        out = model(**batch, use_cache=True)
        step = {"input_ids": out.logits[:, -1:].argmax(-1), **cache_kwargs(getattr(out, CACHE_ARG)),
                "attention_mask": torch.cat([batch["attention_mask"], batch["attention_mask"][:, :1]], 1)}
        with flop_counter() as counter:
            model(**step)
    text = batch["input_ids"].shape[1] - dims.n_visual
    formula = decode_step_flops(dims, schedule(dims, "none"), text)
    assert formula.total == pytest.approx(counter.get_total_flops(), rel=0.02)


def test_decode_time_selections_are_counted():
    """DyCoke's decode steps attend, from layer 3 on, to the int((n - 1) x 0.2) best-scored video tokens and its last
    one (Video-LLaVA's 8 frames, TTM at half the tokens), and pay for the layer-2 attention row; PruneVid's pruned
    caches leave its layers 0-10 the tokens layer 11 keeps."""
    dims = checkpoint_dims("video-llava-7b")
    dycoke = schedule(dims, "dycoke", 1028)
    kept = dycoke.tokens_per_layer[0]
    assert dycoke.decode_keys == (kept,) * 3 + (int((kept - 1) * (1 - 0.8)) + 1,) * 29 and dycoke.decode_scoring == 2
    with_stage, without = (method_decode_flops(dims, "dycoke", 1028, dycoke_p=p) for p in (0.8, None))
    assert with_stage.decoder < without.decoder and with_stage.overhead > 0 == without.overhead
    assert without.total == decode_step_flops(dims, replace(dycoke, decode_keys=None, decode_scoring=None), 63).total
    prunevid = schedule(dims, "prunevid", alpha=0.4)
    assert prunevid.decode_keys == (prunevid.tokens_per_layer[11],) * 11 + prunevid.tokens_per_layer[11:]
    assert method_decode_flops(dims, "prunevid", alpha=0.4).decoder < method_decode_flops(
        dims, "prunevid", alpha=0.4, prune_cache=False).decoder


@pytest.mark.parametrize("method", [m for m in METHODS if m != "none"])
def test_overhead_is_small(method):
    model, budget = ("video-llava-7b", 1028) if registered(method).video_only else ("llava-1.5-7b", 64)
    result = method_flops(model, method, budget)
    assert 0 <= result.overhead < 0.05 * result.decoder
    assert (result.overhead == 0) == (method == "random")


def test_next_baselines_are_measured_on_a_next_proxy():
    full = method_flops("llava-next-7b", "none").total
    fastv = method_flops("llava-next-7b", "fastv", 320)  # keeps 149/2880 of the 2928 tokens (newlines included)
    keep = round(149 * 2928 / 2880)
    expected = prefill_flops(replace(checkpoint_dims("llava-next-7b"), extra_tokens=1), [2928] * 2 + [keep] * 30, 63)
    assert fastv.total - fastv.overhead == pytest.approx(expected.total, rel=1e-9)
    assert method_flops("llava-next-7b", "visionzip", 320).total < method_flops("llava-next-7b", "visionzip", 640).total < full


def test_next_newlines_an_encoder_cut_keeps_count_as_visual_once():
    """VisPruner keeps NeXT's own layout (newline tokens of the rows it keeps): they move from the preset's extra
    tokens to the visual ones, so its decoder sees as many tokens as VisionZip's compact layout at the same budget."""
    vispruner, visionzip = (method_flops("llava-next-7b", m, 320) for m in ("vispruner", "visionzip"))
    assert schedule(checkpoint_dims("llava-next-7b"), "vispruner", 320).tokens_per_layer[0] > 320
    assert vispruner.decoder == visionzip.decoder


def test_next_overhead_is_small():
    result = method_flops("llava-next-7b", "visiondrop", 320)
    assert 0 < result.overhead < 0.05 * result.decoder


def test_errors():
    with pytest.raises(ValueError, match="cannot reach"):
        method_flops("llava-1.5-7b", "visiondrop", 500)
    with pytest.raises(ValueError, match="per-crop budget"):
        method_flops("llava-next-7b", "visiondrop", 2500)
    with pytest.raises(ValueError, match="keeps all"):
        method_flops("llava-1.5-7b", "none", 64)


def test_cli_prints_the_total_last():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "visiondrop.efficiency.flops", "--model", "llava-1.5-7b", "--method", "none"],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
    lines = out.strip().splitlines()
    assert lines[-1] == "total 9.06 TFLOPs"
    assert any(line.startswith("vision encoder") for line in lines)


def test_cli_pruned(capsys):
    main(["--model", "llava-1.5-7b", "--method", "visiondrop", "--budget", "64"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "total 2.09 TFLOPs"
    assert "96 x8, 70 x8, 52 x8, 38 x8" in "\n".join(lines)
