"""The video-native methods (`Method.video_only`) on Qwen2.5-VL videos: two videos of different lengths and sizes in
one left-padded batch (M-RoPE positions kept), and each method's own algorithm on known inputs.

Video-LLaVA's videos run them in tests/test_video_llava.py (every registered method); images are refused
(tests/test_contract.py). Qwen2.5-VL's processor here has no video processor (it needs torchvision), so the videos are
given as the model takes them: patches, `video_grid_thw`, and `<|video_pad|>` placeholders between the vision markers.
"""
import pytest
import torch

import visiondrop
from helpers import videos_batch_equals_alone
from visiondrop.families import family_of
from visiondrop.methods import METHODS, method
from visiondrop.testing.tiny import load_tiny

VIDEO_METHODS = [name for name in METHODS if method(name).video_only]
QUESTIONS = ["What happens in the video?", "Does the red shape move? Answer briefly."]
GRIDS = [(8, 8, 8), (7, 8, 12)]  # temporal grids x patch rows x patch columns: 8 frames of 16 tokens, 7 of 24
NEW_TOKENS = 3
DTYPE = torch.float64  # a batch and each video alone give the same scores to the last bit
#: methods run at their official setting here instead of a ratio: PruneVid's first stage is not budget-controlled,
#: and on these small random videos it keeps half the tokens, more than any share its budget could then reach
OFFICIAL = {"prunevid": {"alpha": 0.4}}


def patches(seed: int, grid: tuple[int, int, int]) -> torch.Tensor:
    """A video's patches as the processor gives them [t x h x w, 3 x 2 x 14 x 14]: a still scene, a part of which
    changes from frame to frame (so frames are partly redundant, as real videos are)."""
    t, h, w = grid
    generator = torch.Generator().manual_seed(seed)
    scene = torch.randn(h * w, 3 * 2 * 14 * 14, generator=generator, dtype=DTYPE)
    frames = scene.repeat(t, 1, 1)
    moving = torch.rand(t, h * w, 1, generator=generator, dtype=DTYPE) < 0.3
    frames = torch.where(moving, torch.randn(frames.shape, generator=generator, dtype=DTYPE), frames)
    return frames.flatten(0, 1)


def encode(processor, questions: list[str], grids: list[tuple[int, int, int]], seeds: list[int]) -> dict:
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    texts = [f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
             f"{'<|video_pad|>' * (t * h * w // 4)}<|vision_end|>{q}<|im_end|>\n<|im_start|>assistant\n"
             for q, (t, h, w) in zip(questions, grids)]
    batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    video = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    batch["mm_token_type_ids"] = (batch["input_ids"] == video).int() * 2
    batch["pixel_values_videos"] = torch.cat([patches(s, g) for s, g in zip(seeds, grids)])
    batch["video_grid_thw"] = torch.tensor(grids)
    return batch


@pytest.fixture(scope="module")
def qwen(tiny_qwen_dir):
    return load_tiny(tiny_qwen_dir, dtype=DTYPE)


@pytest.fixture(scope="module")
def videos(qwen):
    model, processor = qwen
    batch = encode(processor, QUESTIONS, GRIDS, [0, 1])
    singles = [encode(processor, [q], [g], [s]) for q, g, s in zip(QUESTIONS, GRIDS, [0, 1])]
    return batch, singles


def run(model, inputs):
    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(out.logits, 1)


def test_a_video_is_the_sample_visual_block_frame_after_frame(qwen, videos):
    model, _ = qwen
    batch, _ = videos
    family = family_of(model)
    assert batch["attention_mask"].min() == 0, "prompts must differ in length to test left padding"
    assert family.image_token_mask(model, batch["input_ids"], None).sum(1).tolist() == [128, 168]
    assert family.video_frames(model, batch["input_ids"], batch).tolist() == [8, 7]


def test_none_equivalent_settings_are_the_stock_model(qwen, videos):
    model, _ = qwen
    batch, _ = videos
    with torch.no_grad():
        reference, reference_logits = run(model, batch)
        for name, options in [("none", {}), ("evs", {"pruning_rate": 0.0}), *((n, {"ratio": 1.0}) for n in
                                                                               VIDEO_METHODS)]:
            with visiondrop.apply(model, name, **options) as handle:
                tokens, logits = run(model, batch)
            assert torch.equal(tokens, reference), name
            torch.testing.assert_close(logits, reference_logits, atol=1e-9, rtol=1e-9, msg=lambda m: f"{name}: {m}")
            assert handle.trace.tokens_per_layer == [[128] * 28, [168] * 28], name


@pytest.mark.parametrize("name", VIDEO_METHODS)
def test_batch_of_two_videos_equals_each_alone(qwen, videos, name):
    """Videos of different lengths and sizes: the batch equals each alone (kept tokens, logits, tokens); the tokens
    entering each decoder layer, counted with forward pre-hooks, are the trace's; each keeps the ratio of its own;
    cached decoding equals re-running the prompt with the prefill's decisions."""
    model, _ = qwen
    batch, singles = videos
    ratio = method(name).example_budget / 576
    given = OFFICIAL.get(name, {"ratio": ratio})
    _, trace = videos_batch_equals_alone(model, name, run, batch, singles, NEW_TOKENS, **given)
    for i, (t, h, w) in enumerate(GRIDS):
        n_visual = t * h * w // 4
        measured = trace.tokens_per_layer[i]  # counted with forward pre-hooks alone
        assert len(measured) == 28
        mean = sum(measured) / len(measured)  # whole tokens a frame; counts rounded per group where not exact
        tolerance = t * (1 if method(name).exact_count else 2)
        assert name in OFFICIAL or abs(mean - ratio * n_visual) <= tolerance, f"{name}: {measured}"


@pytest.mark.parametrize("name, options", [("evs", {"ratio": 0.5}), ("fastvid", {"retention": 0.5, "beta": 1.0})])
def test_kept_video_tokens_keep_their_positions(qwen, videos, name, options):
    """EVS (which keeps whole the first frame) and FastVID (its anchors absorbing nothing at beta = 1) keep the same
    positions as the stock model gives the kept tokens: masking the dropped tokens out of the stock model gives the
    pruned logits."""
    model, _ = qwen
    _, singles = videos
    single = singles[0]
    with visiondrop.apply(model, name, **options) as handle, torch.no_grad():
        pruned = model(**single).logits[:, -1]
    kept = handle.trace.kept[0][0]
    if name == "evs":
        assert kept[:16].tolist() == list(range(16)) and kept.numel() == 64
    else:  # 8 of 16 tokens a grid: 5 salient, 3 anchors, where DySeg cuts every pair of the 8 grids (c = 8)
        assert kept.numel() == 64 and sorted(set((kept // 16).tolist())) == list(range(8))
    video = single["input_ids"][0] == model.config.video_token_id
    mask = single["attention_mask"].clone()
    mask[0, video.nonzero()[:, 0][~torch.isin(torch.arange(128), kept)]] = 0
    with torch.no_grad():
        positions, _ = model.model.get_rope_index(single["input_ids"], single["mm_token_type_ids"], None,
                                                  single["video_grid_thw"], attention_mask=single["attention_mask"])
        masked = model(**{**single, "attention_mask": mask}, position_ids=positions).logits[:, -1]
    torch.testing.assert_close(pruned, masked, atol=1e-9, rtol=1e-9)


def test_evs_equals_vllm():
    """baselines.evs keeps exactly the tokens vLLM's own `compute_retention_mask` keeps (tests/parity/evs)."""
    from pathlib import Path

    from baselines.evs import retained

    cases = torch.load(Path(__file__).parent / "parity" / "evs" / "fixture.pt")["cases"]
    assert len(cases) == 96 and any(not c["mask"].all() for c in cases)
    for case in cases:
        t, h, w = case["thw"]
        ours = retained(case["embeds"], t, case["q"])
        assert torch.equal(ours, case["mask"].nonzero()[:, 0]), (case["thw"], case["merge"], case["q"])
        assert case["mask"][: h * w // case["merge"] ** 2].all()  # the first frame, whole


def test_vidcom2_equals_the_official_function():
    """baselines.vidcom2 keeps exactly the tokens the official `vidcom2_compression` keeps (tests/parity/vidcom2)."""
    from pathlib import Path

    from baselines.vidcom2 import retained

    cases = torch.load(Path(__file__).parent / "parity" / "vidcom2" / "fixture.pt")["cases"]
    assert len(cases) == 16
    uneven = 0
    for case in cases:
        for base, kept in case["kept"].items():
            assert torch.equal(retained(case["features"], case["frames"], base), kept), (case["model"], base)
            per_frame = case["features"].shape[0] // case["frames"]
            uneven += len(set((kept // per_frame).bincount().tolist())) > 1
    assert uneven  # some videos give their frames different budgets


def test_dycoke_equals_the_official_function():
    """baselines.dycoke keeps exactly the tokens, in the order, the official `dycole_ttm` (at its HEAD) keeps (its bug
    included: the last frame of an odd count dropped), and refuses what it fails on."""
    from pathlib import Path

    from baselines.dycoke import DyCoke, temporal_merge

    cases = torch.load(Path(__file__).parent / "parity" / "dycoke" / "fixture.pt")["cases"]
    for case in cases:
        if "error" in case:
            with pytest.raises(ValueError, match="fails on videos of .* frames"):
                DyCoke(None, None, 0.7, fix_bugs=False).pruned_tokens(case["frames"], 24)
            continue
        per_frame = case["features"].shape[0] // case["frames"]
        for k, kept in case["kept"].items():
            m = DyCoke(None, None, k, fix_bugs=False).pruned_tokens(case["frames"], per_frame)
            assert torch.equal(temporal_merge(case["features"], case["frames"], m, fix_bugs=False), kept), k
    fixed = temporal_merge(cases[2]["features"], 5, 7, fix_bugs=True)  # 5 frames: the last one stays whole
    official = cases[2]["kept"][0.7]
    assert torch.equal(fixed[:len(official)], official) and fixed[len(official):].tolist() == list(range(96, 120))


def test_prunevid_first_stage_equals_the_official_function():
    """baselines.prunevid's first stage gives the official `merge_frames_dynamic`'s segments, group sizes and merged
    tokens (its tie-breaking noise zeroed on both sides; tests/parity/prunevid)."""
    from pathlib import Path

    from baselines.prunevid import merge_video

    cases = torch.load(Path(__file__).parent / "parity" / "prunevid" / "fixture.pt")["cases"]
    assert any(sum(c["static_sizes"]) for c in cases) and any(len(c["window_sizes"]) > 1 for c in cases)
    for case in cases:
        tokens, slots, groups, weights = merge_video(case["features"], case["frames"], case["tau"])
        torch.testing.assert_close(weights @ case["features"], tokens)  # each token is its weights' mean
        assert [sum(g[1:]) + g[0] for g in groups] == [s + d for s, d in zip(case["static_sizes"],
                                                                               case["dynamic_sizes"])]
        assert [g[0] for g in groups] == case["static_sizes"]
        assert len(groups) == len(case["window_sizes"]) and slots.shape[0] == tokens.shape[0]
        torch.testing.assert_close(tokens, case["merged"], atol=1e-6, rtol=1e-6)


def test_the_video_methods_experiment_reaches_every_budget_it_sweeps():
    """Every job of `experiment=video_methods` reaches its ratio on Video-LLaVA-7B in the method's own count."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from visiondrop.core import ModelInfo
    from visiondrop.methods import policy_for

    configs = Path(__file__).parents[1] / "configs"
    sweep = OmegaConf.load(configs / "experiment" / "video_methods.yaml").hydra.sweeper.params
    info = ModelInfo(n_visual=2056, n_layers=32, vision_layer=22, cls_kept=True, crops=8, video=True)
    chosen = [OmegaConf.load(configs / "method" / f"{name}.yaml") for name in sweep.method.split(",")]
    assert {m.name for m in chosen} == {"none", *VIDEO_METHODS} - {"dycoke"}
    for m in (m for m in chosen if m.name != "none"):
        for ratio in (float(r) for r in str(sweep["budget.ratio"]).split(",")):
            described = policy_for(info, m.name, ratio=ratio, **m.options).describe()
            assert abs(described["equivalent_tokens"] - ratio * 2056) <= 8, (m.name, ratio, described)
    with pytest.raises(ValueError, match="smallest reachable budget is 776"):
        policy_for(info, "dycoke", ratio=0.25)


def test_evs_at_rate_zero_is_the_stock_video_llava(tiny_video, demo_videos):
    """On Video-LLaVA's 8-frame videos too, a method that keeps every token (EVS at q = 0) is the stock model."""
    from visiondrop.harness.video import read_frames

    model, processor = tiny_video
    prompt = "USER: <video>\nWhat happens? ASSISTANT:"
    video = dict(processor(text=[prompt], videos=[read_frames(demo_videos[0])], return_tensors="pt"))
    with torch.no_grad():
        reference = model(**video).logits
        with visiondrop.apply(model, "evs", pruning_rate=0.0) as handle:
            logits = model(**video).logits
    assert handle.trace.tokens_per_layer == [[2056] * 32]
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)


def equals_the_official_onevision_run(folder: str, fixture: str, model_dir, method_name: str, **options):
    """The harness on the tiny LLaVA-OneVision gives the official run's (tests/parity/<folder>/<fixture>, made by
    tests/parity/official_onevision.py) greedy tokens, logits of the prefill and every decode step within 1e-3,
    kept frame tokens (in the official output order), and visual tokens entering every decoder layer (forward
    pre-hooks). Returns the official record and the harness's trace of the generation."""
    import importlib.util
    from pathlib import Path

    from helpers import greedy_with_logits, measure_counts

    parity = Path(__file__).parent / "parity"
    spec = importlib.util.spec_from_file_location("official_onevision", parity / "official_onevision.py")
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    official = torch.load(parity / folder / fixture)
    model, processor = load_tiny(model_dir)
    batch = runner.video_inputs(processor, official["settings"]["frames"], official["settings"].get("scenes", 1))
    ids = batch["input_ids"][0]
    video = ids == model.config.video_token_id
    assert ids[~video].tolist() == [t for t in official["input_ids"] if t != runner.IMAGE_TOKEN_INDEX]
    with visiondrop.apply(model, method_name, **options) as handle:
        tokens, logits = greedy_with_logits(model, batch, runner.NEW_TOKENS)
        kept = handle.trace.kept[0][0]
    assert tokens[0].tolist() == official["tokens"]
    torch.testing.assert_close(logits[0], official["logits"], atol=1e-3, rtol=0)
    if official["kept_indices"]:  # pruning methods: the kept frame tokens (a merging method's are averages)
        frame_tokens = official["video_tokens_before"]  # the newline after them is kept by both
        assert kept[kept < frame_tokens].tolist() == official["kept_indices"]  # in the official output order
    counts, _ = measure_counts(model, batch, method_name, **options)
    assert counts == official["visual_tokens_per_layer"]
    return official, handle.trace


def test_vidcom2_on_llava_onevision_equals_the_official_model(tiny_onevision_dir):
    """VidCom2 at R_RATIO 0.25 through github.com/xuyang-liu16/VidCom2's LLaVA-NeXT code (tests/parity/vidcom2)."""
    equals_the_official_onevision_run("vidcom2", "ov_fixture.pt", tiny_onevision_dir, "vidcom2", base_scale=0.25)


@pytest.mark.parametrize("fixture,stages", [("ov_fixture.pt", {}), ("ov_ttm_fixture.pt", {"dycoke_p": None})],
                         ids=["both_stages", "merging_alone"])
def test_dycoke_on_llava_onevision_equals_the_official_model(tiny_onevision_dir, fixture, stages):
    """DyCoke (K = 0.7, P = 0.8, L = 3) through github.com/KD-TAO/DyCoke's LLaVA-NeXT fork at its HEAD: both stages,
    and the temporal merging alone (the official run with dycoke_p = 0 keeps every token at decode time; here the
    decode-time stage is off) (tests/parity/dycoke/README.md)."""
    official, trace = equals_the_official_onevision_run("dycoke", fixture, tiny_onevision_dir, "dycoke", dycoke_k=0.7,
                                                        **stages)
    if stages:  # the official stage keeps every key (in a permuted order); here none is selected
        prefill = official["step_lengths"][0]
        assert all(len(set(positions)) == prefill + step + 1  # the cache, the new token included
                   for step, positions in enumerate(official["key_selections"]) if positions is not None)
        return
    # the visual tokens layers >= dycoke_l attend to at each decode step (None: all), as positions in the video
    start, n = official["settings"]["image_token_start_index"], official["visual_tokens_per_layer"][0]
    theirs = [None if positions is None else sorted(p - start for p in positions if start <= p < start + n)
              for positions in official["key_selections"]]
    ours = [None if step[3][0] is None else step[3][0].nonzero().flatten().tolist() for step in trace.decode_steps]
    assert ours == theirs and None in ours and any(ours)  # a step attends to all (similarity >= 0.9), others select


@pytest.mark.parametrize("fixture", ["ov_fixture.pt", "ov_two_scenes_fixture.pt"], ids=["one_window", "two_windows"])
def test_holitom_on_llava_onevision_equals_the_official_model(tiny_onevision_dir, fixture):
    """HoliTom as scripts/eval_ov-7b_holitom.sh runs it (RETAIN_RATIO 0.15, T 0.8, HOLITOM_k 18, HOLITOM_r 0.5) through
    github.com/cokeshao/HoliTom's LLaVA-NeXT code, whose layer 17 attends without a causal mask in the prefill
    (causal_scoring_layer=False reproduces it); a video of one panned scene (one window) and of two (two windows, the
    density merges at retention below 1) (tests/parity/holitom/README.md)."""
    official, trace = equals_the_official_onevision_run("holitom", fixture, tiny_onevision_dir, "holitom",
                                                        retain_ratio=0.15, tau=0.8, causal_scoring_layer=False)
    start, visual = official["input_ids"].index(-200), official["visual_tokens_per_layer"][0]
    inner = [p - start for p in official["inner_positions"] if start <= p < start + visual]
    # the inner merge keeps the same visual tokens (positions among the 197 entering layer 18: merged tokens, newline)
    assert trace.selections[1][0][0].tolist() == inner


def test_fastvid_on_llava_onevision_equals_the_official_model(tiny_onevision_dir, tmp_path, monkeypatch):
    """FastVID as scripts/eval.sh runs it (retention 0.10, DySeg_c 8, tau 0.9, STPrune_d 0.4, DTM_p 4, DTM_beta 0.6)
    through github.com/LunarShen/FastVID's LLaVA-NeXT code, a_f and g_f from the pooling head of the tower's SigLIP
    checkpoint (a tiny one holding the model's tower, as the official run loads it), on a 16-frame video: segments of
    1 to 4 frames (tests/parity/fastvid/README.md). The decoder cut sees the official a_f (pooled 14 x 14) and g_f."""
    from transformers import AutoConfig

    from baselines.fastvid import FastVID
    from visiondrop.testing.tiny import build_tiny_siglip_head

    head = build_tiny_siglip_head(tmp_path / "siglip", AutoConfig.from_pretrained(tiny_onevision_dir).vision_config,
                                  tower=tiny_onevision_dir)
    seen, select = [], FastVID.select_decoder
    monkeypatch.setattr(FastVID, "select_decoder", lambda self, cut: seen.append(cut) or select(self, cut))
    official, _ = equals_the_official_onevision_run("fastvid", "ov_fixture.pt", tiny_onevision_dir, "fastvid",
                                                    retention=0.1, head=str(head))
    frame_tokens = official["video_tokens_before"]
    torch.testing.assert_close(seen[0].tower_rows[0, :frame_tokens], official["frame_attn_weights"], atol=1e-6, rtol=0)
    torch.testing.assert_close(seen[0].tower_crops[0], official["frame_global_features"], atol=1e-6, rtol=0)
