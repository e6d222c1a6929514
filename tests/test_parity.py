"""Every method against its official implementation, number for number: one row per official run and option set
(../shared/reference/parity, and tests/parity for the runs made here; how a row is checked, fragile rows included:
tests/parity.py). The per-method files test each method's rules by hand and what else of the official runs is the
method's own."""
import functools

import pytest
import torch
import torch.nn.functional as F

from baselines.cdpruner import conditional_kernel, load_text_tower, relevance
from baselines.vispruner import diverse_rounds
from parity import PARITY, Case, Run, check_case, load_case, parity_inputs, require_bit_exact
from visiondrop.core import EncoderView
from visiondrop.families.llava import clip_encoder_view, tower_layers

IMAGE_START, N_IMAGE = 35, 576  # the fixtures' image block, in sequence positions


def visiondrop_kept(official: dict) -> list[list[int]]:
    """The original patch indices kept unmerged at every cut of the official run (CLS and merged tokens left out)."""
    enc = official["encoder"]
    cls_and_patches = [i - 1 for i in enc["kept_dominant_indices_sorted"]]  # 577-space -> patch index, CLS -> -1
    kept = [[i for i in cls_and_patches if i >= 0]]
    block = cls_and_patches + [-1] * enc["contextual"]
    for stage in official["llm_stages"]:
        chosen = [block[i] for i in stage["kept_dominant_indices_sorted"]]
        kept.append([i for i in chosen if i >= 0])
        block = chosen + [-1] * stage["contextual"]
    return kept


def visiondrop_schedule(official: dict) -> dict:
    s = official["settings"]
    return {"schedule": {"encoder": [s["dominant"], s["contextual"]], "layers": s["layer_list"],
                         "decoder": s["image_token_list"]}}


def fastv_scores(run: Run) -> None:
    torch.testing.assert_close(run.recorded["scores"][0][0], run.stored["cut_scores"], atol=1e-7, rtol=1e-5)


def pyramiddrop_scores(run: Run) -> None:
    scores = run.recorded["scores"]
    assert len(scores) == len(run.official["llm_stages"])  # the prefill's cuts only; decode steps never re-score
    for stage, ours in enumerate(scores):  # official scores are about 1e-2; ours agree to about 1e-7
        torch.testing.assert_close(ours[0], run.stored[f"llm_stage{stage}_scores"], atol=1e-6, rtol=0)


def sparsevlm_cuts(run: Run) -> None:
    for s, cut in enumerate(run.official["cuts"]):
        torch.testing.assert_close(run.recorded["scores"][s][0], run.stored[f"cut{s}_scores"], rtol=1e-4, atol=1e-9)
        # stage-local keeps also pin which merged tokens of earlier cuts survived
        assert run.handle.trace.selections[s][0][0].tolist() == cut["kept_stage_local_sorted"]
        assert run.handle.trace.selections[s][0][1].shape[0] == cut["recycle"]["cluster_num"]


def sparsevlm_described(official: dict) -> dict:
    return {"tokens_per_layer": official["visual_tokens_per_layer"],
            "equivalent_tokens": official["equivalent_tokens_sparsevlm_own_convention"]["value"],
            "mean_tokens_entering_layers": official["equivalent_tokens_mean_over_layers"]}


def visionzip_kept(official: dict) -> list[list[int]]:
    # official indices are 577-space (0 = CLS, 1 + p = patch p); the trace lists patches p, CLS left out
    kept = [i - 1 for i in official["encoder"]["kept_dominant_indices_sorted"] if i > 0]
    assert kept == official["encoder"]["dominant_patch_indices_0_575_sorted"]
    return [kept]


def dart_pivots_and_scores(run: Run) -> None:
    cut = run.official["cut"]
    (norms,), ((image, text),), (order,), (features,) = (run.recorded[name] for name in DART_RECORDED)
    assert image[0].tolist() == cut["image_pivots_topk_order"]
    assert (text[0] - IMAGE_START - N_IMAGE).tolist() == cut["text_pivots_topk_order_relative"]
    assert order[0].tolist() == cut["pivot_processing_order_positions"]
    image_block = slice(IMAGE_START, IMAGE_START + N_IMAGE)
    torch.testing.assert_close(norms[0, image_block], run.stored["image_key_l1_norms"], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(norms[0, IMAGE_START + N_IMAGE:], run.stored["text_key_l1_norms"], atol=1e-4,
                               rtol=1e-5)
    negative_cos = -(features[0, order[0]] @ features[0, image_block].T)  # rows in processing order
    torch.testing.assert_close(negative_cos, run.stored["pivot_neg_cos_over_image"], atol=1e-5, rtol=1e-5)


DART_RECORDED = ("key_norms", "pivots", "processing_order", "features")


def vispruner_view(model, inputs: dict) -> EncoderView:
    """What VisPruner selects from: the eager CLIP tower at layer 22."""
    with torch.no_grad():
        return clip_encoder_view(model.model.vision_tower, inputs["pixel_values"], 22, eager_encoder=True)


def cls_row(view: EncoderView) -> torch.Tensor:
    """The CLS attention row over the patches, mean over heads: what VisPruner ranks by."""
    return view.importance[:, :, 1:].mean(dim=1)[0]


def vispruner_important_kept(run: Run) -> None:
    """The important set is decided far above float32 noise (relative gap 4e-4); the diverse rounds are not."""
    kept = run.kept()
    assert len(kept) == 1 and len(set(kept[0])) == 128
    assert set(run.official["important_indices_sorted"]) <= set(kept[0])
    # the eager pass leaves the tower's own attention
    assert run.model.config.vision_config._attn_implementation == "sdpa"

CLIP_TEXT = str(PARITY / "cdpruner" / "clip_text")  # the tiny CLIP text side the CDPruner fixtures used


def cdpruner_options(official: dict) -> dict:
    settings = official["settings"]
    return {"budget": settings["visual_token_num"], "text_tower": CLIP_TEXT, "instruction": settings["instruction"]}


def cdpruner_kernel_inputs(model, inputs: dict) -> dict[str, torch.Tensor]:
    """What decides CDPruner's fragile picks: the projected patches (its similarity) and the kernel's diagonal (its
    relevance squared), from the eager tower and the tiny CLIP text side."""
    instruction = load_case("cdpruner", "cd32")[0]["settings"]["instruction"]
    with torch.no_grad():
        view = clip_encoder_view(model.model.vision_tower, inputs["pixel_values"], 22, eager_encoder=True)
        patches = view.hidden[:, 1:]
        projected = model.model.multi_modal_projector(patches)
        tower = load_text_tower(CLIP_TEXT)
        scores = relevance(tower.image_embeds(patches), tower.text_embeds(instruction, patches.device))
    return {"projected_visual_tokens": projected[0],
            "kernel_diag": torch.diagonal(conditional_kernel(projected, scores)[0])}


def cdpruner_stable_picks(run: Run) -> None:
    """The picks before the first fragile step (a near-tie, or the NaN) are the official ones on any CPU."""
    stable = run.official["stable_prefix_picks"]
    assert set(run.official["kept_indices_selection_order"][:stable]) <= set(run.kept()[0])


def vscan_kept(official: dict) -> list[list[int]]:
    """The kept patch indices at the encoder cut and after layer 16 (the shared fixture's layout, or this repo's)."""
    if "encoder_stage" in official:
        return [official["encoder_stage"]["kept_indices_sorted"], official["llm_stage"]["kept_indices_0_575"]]
    return [official["encoder_kept_indices_sorted"], official["llm_kept_indices_0_575"]]


def vscan_merge_gaps(case: str, model, inputs: dict) -> dict[str, torch.Tensor]:
    """What decides VScan's fragile merges: each dropped patch's top-1 minus top-2 cosine to the kept ones, on the
    projected features of the eager tower (with the official kept set)."""
    kept = vscan_kept(load_case("vscan", case)[0])[0]
    with torch.no_grad():
        view = clip_encoder_view(model.model.vision_tower, inputs["pixel_values"], 22, eager_encoder=True)
        projected = model.model.multi_modal_projector(view.hidden[0, 1:])
    mask = torch.zeros(projected.shape[0], dtype=torch.bool)
    mask[kept] = True
    top = F.cosine_similarity(projected[~mask].unsqueeze(1), projected[mask].unsqueeze(0), dim=2).topk(2, dim=1)
    return {"merge_top1_minus_top2_cos": top.values[:, 0] - top.values[:, 1]}


def vscan_encoder_kept(run: Run) -> None:
    """The scans' sets are decided far above float noise (margins 14x to 950x); the merges are not."""
    assert run.kept()[0] == vscan_kept(run.official)[0]


def tome_layer0_metric(model, inputs: dict) -> dict:
    """What ToMe's first matching ranks by: CLIP layer 0's keys averaged over heads, identical to the unpruned
    tower's; its fragile cases (merge decisions within 1-7 float32 ulps) hold where it reproduces bit for bit."""
    tower = model.model.vision_tower
    clip, layer = getattr(tower, "vision_model", tower), tower_layers(tower)[0]
    with torch.no_grad():
        keys = layer.self_attn.k_proj(layer.layer_norm1(clip.pre_layrnorm(clip.embeddings(inputs["pixel_values"]))))
    return {"layer0_key_mean": keys.view(*keys.shape[:2], -1, layer.self_attn.head_dim).transpose(1, 2).mean(1)[0]}


def not_fragile(run: Run) -> None:
    assert not run.official["fragile"]


def mustdrop_kept(official: dict) -> list[list[int]]:
    """Every token the spatial merge left, then each filter's survivors with the key set added back, as places
    after the merge (official: each filter's own indices and the key set's places, stage by stage)."""
    block, keys, kept = list(range(official["encoder_tokens"])), official["key_set"], []
    kept.append(list(block))
    for cut in official["filters"]:
        local = sorted(set(cut["filter_kept_indices"]) | set(keys))
        keys = [local.index(k) for k in keys]
        block = [block[i] for i in local]
        kept.append(list(block))
    return kept


def mustdrop_key_set(run: Run) -> None:
    """The key set, in the official topk order: the tower's last layer's CLS row after the merge."""
    assert run.handle.policy._keys[0].tolist() == run.official["key_set"]
    not_fragile(run)


CASES = [
    Case("visiondrop/none", "none", {}),
    *[Case("visiondrop/vd32", "visiondrop", options, variant,
           cuts=lambda official: ["encoder", "layer 8", "layer 16", "layer 24"], kept=visiondrop_kept)
      for variant, options in (("budget", {"budget": 32}), ("schedule", visiondrop_schedule))],
    *[Case("fastv/fastv192", "fastv", options, variant, cuts=lambda official: ["layer 2"],
           kept=lambda official: [official["cut"]["kept_indices_sorted"]],
           described=lambda official: {"equivalent_tokens": official["equivalent_tokens_mean_over_layers"]},
           record=("scores",), check=fastv_scores)
      for variant, options in (("budget", {"budget": 192}), ("keep", {"keep": 166}))],
    *[Case("pyramiddrop/pd64", "pyramiddrop", options, variant,
           cuts=lambda official: [f"layer {stage['before_layer']}" for stage in official["llm_stages"]],
           kept=lambda official: [stage["kept_indices_original_0_575"] for stage in official["llm_stages"]],
           described=lambda official: {"keep_counts": official["settings"]["keep_counts"]},
           record=("scores",), check=pyramiddrop_scores)
      for variant, options in (("budget", {"budget": 64}), ("options", lambda official: {
          "layer_list": official["settings"]["layer_list"], "decay": official["settings"]["lambda"]}))],
    # the official run seeded torch with manual_seed(0) right before generate; `seed=0` draws the same noise
    *[Case("sparsevlm/sparsevlm192", "sparsevlm", {"budget": 192, "seed": seed}, variant, seed=global_seed,
           cuts=lambda official: ["layer 3", "layer 7", "layer 16"],
           kept=lambda official: [cut["kept_original_indices_sorted"] for cut in official["cuts"]],
           described=sparsevlm_described, record=("scores",), check=sparsevlm_cuts)
      for variant, seed, global_seed in (("global_rng", "global", 0), ("seed_option", 0, None))],
    *[Case("visionzip/vz64", "visionzip", options, variant, cuts=lambda official: ["encoder"], kept=visionzip_kept,
           described=lambda official: {"equivalent_tokens": 64})
      for variant, options in (("budget", {"budget": 64}), ("options", {"dominant": 54, "contextual": 10}))],
    *[Case("dart/dart128", "dart", options, variant, cuts=lambda official: ["layer 2"],
           kept=lambda official: [official["cut"]["kept_indices_sorted"]],
           described=lambda official: {"truncation": 128, "keep": official["cut"]["n_kept"],
                                       "equivalent_tokens": official["equivalent_tokens_mean_over_layers"]},
           record=DART_RECORDED, check=dart_pivots_and_scores)
      for variant, options in (("truncation", {"truncation": 128}), ("budget", {"budget": 159.75}))],
    Case("divprune/dp64", "divprune", {"budget": 64}, cuts=lambda official: ["layer 0"],
         kept=lambda official: [official["kept_indices_sorted"]],
         described=lambda official: {"method": "divprune", "keep": 64, "layers": [0], "equivalent_tokens": 64}),
    Case("vispruner/vp128", "vispruner", {"budget": 128}, cuts=lambda official: ["encoder"],
         kept=lambda official: [official["kept_indices_sorted"]],
         described=lambda official: {"method": "vispruner", "encoder_layer": 22, "important": 64, "diverse": 64,
                                     "eager_encoder": True, "equivalent_tokens": 128},
         precondition=lambda model, inputs: {"cls_attention_head_mean": cls_row(vispruner_view(model, inputs))},
         robust=vispruner_important_kept),
    # cd32: not fragile, strict against the shared run on any CPU (its kernel bit for bit: tests/test_cdpruner.py)
    Case("cdpruner/cd32", "cdpruner", cdpruner_options, cuts=lambda official: ["encoder"],
         kept=lambda official: [official["kept_indices_sorted"]],
         described=lambda official: {"per_crop": 32, "text": "clip", "guard": False, "equivalent_tokens": 32}),
    *[Case(f"cdpruner/cd{budget}", "cdpruner", cdpruner_options, cuts=lambda official: ["encoder"],  # made here
           kept=lambda official: [official["kept_indices_sorted"]],
           described=lambda official: {"per_crop": official["settings"]["visual_token_num"]},
           precondition=cdpruner_kernel_inputs, robust=cdpruner_stable_picks) for budget in (64, 128, 192)],
    *[Case(f"vscan/vscan{budget}", "vscan", {"budget": budget}, cuts=lambda official: ["encoder", "layer 16"],
           kept=vscan_kept, described=lambda official: {"layers": [16], "equivalent_tokens": sum(
               official["visual_tokens_per_layer"]) / 32},
           precondition=functools.partial(vscan_merge_gaps, f"vscan{budget}"), robust=vscan_encoder_kept)
      # 64: the shared case (robust part), strict against the run that reproduces on this CPU (the shared one, or
      # the one made here on AVX-512: tests/parity.py); 128 and 192 made here
      for budget in (64, 128, 192)],
    # this repository's own fixtures (tests/parity/): FasterVLM's and HiPrune's top-k boundaries clear float32 noise
    *[Case(f"fastervlm/fv{budget}", "fastervlm", {"budget": budget}, cuts=lambda official: ["encoder"],
           kept=lambda official: [official["kept_indices_sorted"]], robust=not_fragile)
      for budget in (288, 144, 58, 29)],
    *[Case(f"hiprune/hp{budget}", "hiprune", {"budget": budget, "eager_encoder": eager}, variant,
           cuts=lambda official: ["encoder"], kept=lambda official: [official["kept_indices_sorted"]],
           robust=not_fragile)
      for budget in (192, 128, 64) for variant, eager in (("eager", True), ("sdpa", False))],
    *[Case(f"tome/{name}", "tome", options, cuts=lambda official: ["encoder"], kept=lambda official: [[]],
           described=lambda official: {"equivalent_tokens": official["visual_tokens_per_layer"][0]},
           precondition=tome_layer0_metric, robust=lambda run: run.official["fragile"] or None)
      for name, options in (("tome208", {"r": 16}), ("tome192", {"budget": 192}), ("tome128", {"budget": 128}),
                            ("tome64", {"budget": 64}))],
    # the decode steps include MustDrop's cache stage (layers 2-14 cut to the last filter's tokens, shifted positions)
    *[Case(f"mustdrop/{name}", "mustdrop", options, variant, kept=mustdrop_kept,
           cuts=lambda official: ["encoder", "layer 3", "layer 7", "layer 11", "layer 15"],
           described=lambda official: {"global_thr": official["global_thr"],
                                       "individual_thr": official["individual_thr"],
                                       "tokens_per_layer": official["visual_tokens_per_layer"]},
           robust=mustdrop_key_set)
      for name, variant, options in (("md192", "budget", {"budget": 192}), ("md128", "budget", {"budget": 128}),
                                     ("md64", "budget", {"budget": 64}),
                                     ("md64", "thresholds", {"global_thr": 0.011, "individual_thr": 0.01}),
                                     ("md64vizwiz", "", {"global_thr": 0.005, "individual_thr": 0.001}))],
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_official(parity_model, case):
    check_case(parity_model, case)


def test_vispruner_scores_and_both_stages_are_bit_identical_to_official(parity_model):
    """The eager tower's head-mean CLS attention, the important set in argsort order, and the diverse list in the
    official final order (kept a's by descending score, then the b's) after its 56 rounds. Robust on any CPU: the
    row within float32 noise and the important set; strict where the row reproduces bit for bit."""
    official, stored = load_case("vispruner", "vp128")
    view = vispruner_view(parity_model, parity_inputs())
    attention = cls_row(view)
    torch.testing.assert_close(attention, stored["cls_attention_head_mean"], atol=0, rtol=1e-5)
    order = attention.argsort(dim=-1, descending=True, stable=True)
    assert sorted(order[:64].tolist()) == official["important_indices_sorted"]
    official, _ = require_bit_exact("vispruner/vp128", {"cls_attention_head_mean": attention})
    assert order[:64].tolist() == official["important_indices_argsort_order"]
    features = view.hidden[:, 1:]
    unit = features / features.norm(dim=-1, keepdim=True)
    assert diverse_rounds(unit, order[64:].unsqueeze(0), 64)[0].tolist() == official["diverse_indices_official_order"]
