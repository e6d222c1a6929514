"""Run an official LLaVA-1.5 fork of a pruning method, unmodified, on the parity model, and record what it computes.

Not a test: it runs in the official code's own environment (transformers 4.37.2, see each fixture's
`official.json` -> `versions`), outside the project's stack:

    venv/bin/python tests/parity/official_llava.py convert OUT_DIR
    venv/bin/python tests/parity/official_llava.py run --repo FORK --method M --case C --out DIR [--kwarg k=v] [--env K=V]

`convert` rebuilds the llava-hf parity model (../shared/reference/parity/visiondrop/hf_model) in the original LLaVA
format: `LlavaLlamaForCausalLM` weights with `model.mm_projector` (mlp2x_gelu) and a separate CLIP folder named by
`mm_vision_tower` (select layer -2, patch features), as the official builders load LLaVA-1.5.
`run` loads it as the fork's `llava/model/builder.py` does (`LlavaLlamaForCausalLM.from_pretrained(path,
low_cpu_mem_usage=True, **kwargs)` + `vision_tower.load_model()`), in float32 on the CPU, and calls its `generate`
as `llava/eval/model_vqa_loader.py` does (greedy, 8 new tokens, the 576 image ids collapsed to one -200). Hooks
(observation only) record the logits, the tokens entering every decoder layer, the KV lengths, the decode positions,
the vision tower's attentions and the fork's `encode_images` result; they change nothing the fork computes.
The fork's own `.cuda()` calls (HiPrune, MustDrop) are made no-ops on this CPU-only machine. MustDrop's fork is
loaded as its builder does with `--sparse` (`LlavaLlamaDynamicForCausalLM`) and generates with its thresholds first
(`--thresholds G I`, its scripts' `--global_thr`, `--individual_thr`); its decisions are observed by recomputation.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

PARITY = Path(os.environ.get("VISIONDROP_SHARED", Path(__file__).resolve().parents[3] / "shared")) / "reference" / "parity"
IMAGE_TOKEN_INDEX = -200


def convert(out: Path) -> None:
    from safetensors.torch import load_file
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    hf = PARITY / "visiondrop" / "hf_model"
    config = json.loads((hf / "config.json").read_text())
    weights = load_file(hf / "model.safetensors")
    weights = {k: v.float() for k, v in weights.items()}
    text, vision = config["text_config"], config["vision_config"]

    clip_dir = out.resolve() / "clip"
    vcfg = CLIPVisionConfig(**{k: vision[k] for k in (
        "hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "image_size", "patch_size",
        "projection_dim", "hidden_act", "layer_norm_eps", "num_channels")})
    clip = CLIPVisionModel(vcfg)
    prefix = next(p for p in ("model.vision_tower.", "vision_tower.") if any(k.startswith(p) for k in weights))
    tower = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    tower = {k[len("vision_model."):] if k.startswith("vision_model.") else k: v for k, v in tower.items()}
    missing = clip.vision_model.load_state_dict(tower, strict=True)
    clip.save_pretrained(clip_dir, safe_serialization=True)
    side = vision["image_size"]
    CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(clip_dir)

    lm = {}
    for k, v in weights.items():
        if k.startswith(prefix):
            continue
        for old, new in (("model.language_model.", "model."), ("language_model.model.", "model."),
                         ("language_model.lm_head.", "lm_head."), ("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
                         ("multi_modal_projector.linear_1.", "model.mm_projector.0."),
                         ("model.multi_modal_projector.linear_2.", "model.mm_projector.2."),
                         ("multi_modal_projector.linear_2.", "model.mm_projector.2.")):
            if k.startswith(old):
                k = new + k[len(old):]
                break
        lm[k] = v
    llava_config = {
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
        "hidden_size": text["hidden_size"], "intermediate_size": text["intermediate_size"],
        "num_attention_heads": text["num_attention_heads"], "num_key_value_heads": text["num_key_value_heads"],
        "num_hidden_layers": text["num_hidden_layers"], "vocab_size": text["vocab_size"],
        "max_position_embeddings": text["max_position_embeddings"], "rms_norm_eps": text["rms_norm_eps"],
        "rope_theta": text["rope_parameters"]["rope_theta"], "hidden_act": "silu", "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "pretraining_tp": 1, "attention_bias": False,
        "torch_dtype": "float32", "use_cache": True,
        "mm_vision_tower": str(clip_dir), "mm_vision_select_layer": config["vision_feature_layer"],
        "mm_vision_select_feature": "patch", "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": vision["hidden_size"],
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "mm_patch_merge_type": "flat",
        "image_aspect_ratio": "pad", "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right",
        "freeze_mm_mlp_adapter": False, "tune_mm_mlp_adapter": False,
    }
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(llava_config, indent=2))
    save_file(lm, out / "model.safetensors", metadata={"format": "pt"})
    print(f"converted to {out} ({len(lm)} LLM tensors, CLIP in {clip_dir}; {missing})")


class Recorder:
    """Observation hooks: what enters every decoder layer, the logits, the KV lengths."""

    def __init__(self, model, n_text: int):
        self.n_text, self.prefill_lengths, self.decode_positions, self.last_logits = n_text, [], [], []
        self.hooks = [layer.register_forward_pre_hook(self.enter, with_kwargs=True)
                      for layer in model.model.layers]
        self.hooks.append(model.lm_head.register_forward_hook(self.logits))
        self.step = -1

    def enter(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        positions = kwargs.get("position_ids")
        if hidden.shape[1] > 1:
            self.prefill_lengths.append(hidden.shape[1])
        else:
            if module is self.first_layer:
                self.decode_positions.append([])
            self.decode_positions[-1].append(int(positions[0, -1]))

    def logits(self, module, args, output):
        self.last_logits.append(output[0, -1].detach().clone())

    def close(self):
        for hook in self.hooks:
            hook.remove()


def run(args) -> None:
    for item in args.env:
        key, value = item.split("=", 1)
        os.environ[key] = value
    torch.Tensor.cuda = lambda self, *a, **k: self  # the fork's .cuda() calls: this machine has no GPU
    sys.path.insert(0, str(Path(args.repo).resolve()))
    if args.method == "mustdrop":  # its builder loads the sparse class with --sparse, as its eval scripts pass
        from llava.model.language_model.sparse_llava_llama import LlavaLlamaDynamicForCausalLM as LlavaLlamaForCausalLM
    else:
        from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM

    kwargs = {}
    for item in args.kwarg:
        key, value = item.split("=", 1)
        kwargs[key] = json.loads(value)
    model = LlavaLlamaForCausalLM.from_pretrained(args.model, low_cpu_mem_usage=True, torch_dtype=torch.float32,
                                                  **kwargs)
    tower = model.get_vision_tower()
    if not tower.is_loaded:
        tower.load_model()
    tower.to(dtype=torch.float32)
    model.eval()

    raw = torch.load(PARITY / "visiondrop" / "inputs.pt")
    ids, start, n_img = raw["input_ids"][0], int(raw["image_token_start"]), int(raw["n_image_tokens"])
    official_ids = torch.cat([ids[:start], torch.tensor([IMAGE_TOKEN_INDEX]), ids[start + n_img:]]).unsqueeze(0)
    n_text = official_ids.shape[1] - 1

    captured = {}
    encode = model.encode_images

    def encode_images(images):
        result = encode(images)
        captured["encode"] = result
        return result

    model.encode_images = encode_images
    tower_forward = tower.vision_tower.forward

    def tower_capture(*a, **k):
        out = tower_forward(*a, **k)
        if isinstance(getattr(out, "attentions", None), (tuple, list)):  # MustDrop returns its key set there
            captured["attentions"] = [t.detach().clone() for t in out.attentions]
            captured["hidden_states"] = [t.detach().clone() for t in out.hidden_states]
        return out

    tower.vision_tower.forward = tower_capture

    tome_margins, first_metric = [], []
    if args.method == "tome":
        lightcompress_tome(args.lightcompress, model, tome_margins, kwargs_tome(args), first_metric)
    layers = tower.vision_tower.vision_model.encoder.layers
    tower_tokens = []
    tower_hooks = [layer.register_forward_pre_hook(lambda m, a: tower_tokens.append(a[0].shape[1])) for layer in layers]

    mustdrop = mustdrop_observer(model) if args.method == "mustdrop" else None
    # MustDrop's generate takes its thresholds first (`model.generate(args.global_thr, args.individual_thr, ...)`)
    thresholds = tuple(args.thresholds) if args.method == "mustdrop" else ()
    recorder = Recorder(model, n_text)
    recorder.first_layer = model.model.layers[0]
    with torch.inference_mode():
        out = model.generate(*thresholds, official_ids, images=raw["pixel_values"].float(), image_sizes=[(336, 336)],
                             do_sample=False, temperature=0, top_p=None, num_beams=1, max_new_tokens=8, use_cache=True)
    recorder.close()
    for hook in tower_hooks:
        hook.remove()
    sequences = out[0] if isinstance(out, tuple) else out
    # the fork's generate gets inputs_embeds only: transformers 4.37 returns BOS + the new tokens
    tokens = sequences[0, -8:].tolist()
    step_logits = torch.stack(recorder.last_logits[:len(tokens)])
    encoded = captured["encode"]
    record = {"tower_tokens_per_layer": tower_tokens,
        "greedy_tokens": tokens,
        "visual_tokens_per_layer": [n - n_text for n in recorder.prefill_lengths],
        "seq_len_per_layer_prefill": recorder.prefill_lengths,
        "decode_position_ids_per_layer": recorder.decode_positions,
    }
    if isinstance(encoded, tuple) and mustdrop is None:  # the forks that prune return an index mask beside the features
        record["kept_indices_sorted"] = encoded[1][0].nonzero()[:, 0].tolist()
    if tome_margins:
        record["merge_decisions"] = tome_margins
    tensors = {"step_logits": step_logits, "prefill_last_logits": step_logits[0],
               # per CLIP layer, as the forks reduce them: FasterVLM's head-mean CLS row over the patches
               # (`attn[:, :, 0, 1:].mean(1)`), HiPrune's head- and query-mean received attention (`attn.mean(1).mean(1)[:, 1:]`)
               "cls_attention_head_mean": [a[:, :, 0, 1:].mean(dim=1)[0] for a in captured.get("attentions", [])],
               "received_attention_mean": [a.mean(dim=1).mean(dim=1)[0, 1:] for a in captured.get("attentions", [])],
               "layer0_key_mean": first_metric[0] if first_metric else None}
    if mustdrop is not None:
        record |= mustdrop.record(encoded[1], thresholds)
        tensors |= mustdrop.tensors
    record["settings"] = {"from_pretrained": kwargs, "generate_thresholds": list(thresholds), "environment": dict(item.split("=", 1) for item in args.env)}
    record["settings"]["tome_r"] = kwargs_tome(args) if args.method == "tome" else None
    record["margins"] = margins(args.method, record, tensors, kwargs)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{args.case}.json").write_text(json.dumps(record))
    torch.save(tensors, out_dir / f"{args.case}.pt")
    print(args.case, tokens, record["visual_tokens_per_layer"][:3], record["tower_tokens_per_layer"], record["margins"])


class mustdrop_observer:
    """Observation of MustDrop's three decisions, recomputed beside the fork's own calls (which run unchanged): the
    spatial merge after CLIP layer 0 (each 3x3 window's mean pairwise cosine against the 0.8 threshold, the merged
    windows in the fork's topk order), the key set (top ceil(0.08 (N - 1)) of CLIP layer 23's head-mean CLS row over
    the merged tokens) and every dual attention filter (the head-mean attention of the text rows on the visual
    tokens: its sum over the rows against global_thr x the total, its max against individual_thr)."""

    def __init__(self, model):
        from llava.model.multimodal_encoder import clip_encoder

        self.tensors, self.windows, self.filters = {}, {}, []
        pooling = clip_encoder.conditional_pooling

        def observed_pooling(feat, threshold, window_size):
            patches = feat[0, 1:]
            side, w = int(patches.shape[0] ** 0.5), int(window_size[0])
            grid = patches.view(side // w, w, side // w, w, -1).permute(0, 2, 1, 3, 4).reshape(-1, w * w, patches.shape[-1])
            unit = grid / grid.norm(dim=-1, keepdim=True)
            cos = unit @ unit.transpose(1, 2)
            similarity = (cos.sum((1, 2)) - cos.diagonal(dim1=1, dim2=2).sum(1)) / (w * w * (w * w - 1))
            self.tensors["window_similarity"] = similarity
            self.windows = {"threshold": threshold, "window": w, "merged": int((similarity >= threshold).sum())}
            return pooling(feat, threshold, window_size)

        clip_encoder.conditional_pooling = observed_pooling
        last = model.get_vision_tower().vision_tower.vision_model.encoder.layers[-1].self_attn
        last.register_forward_hook(lambda m, a, out: self.tensors.__setitem__(
            "key_layer_cls_attention_head_mean", out[1][0, :, 0, 1:].mean(0).detach().clone()))
        decoder, dual = model.model, model.model.dual_attention_filter

        def observed_filter(attn, v_token_start, img_seq, global_thr=1.0, individual_thr=0.0):
            text = attn.shape[2] - img_seq - v_token_start
            rows = attn[0, :, v_token_start + img_seq:, v_token_start:v_token_start + img_seq].mean(0)
            total, peak = rows.sum(0), rows.max(0).values
            bar = total.sum() * global_thr
            dropped = (total < bar) & (peak < individual_thr)
            # a token's decision rests on its nearest threshold: dropped, both below; kept, the one it clears
            dist = torch.where(dropped, torch.minimum((bar - total) / bar, (individual_thr - peak) / individual_thr),
                               torch.maximum((total - bar) / bar, (peak - individual_thr) / individual_thr))
            self.tensors[f"cut{len(self.filters)}_global_attention"] = total.detach().clone()
            self.tensors[f"cut{len(self.filters)}_individual_attention"] = peak.detach().clone()
            result = dual(attn, v_token_start, img_seq, global_thr, individual_thr)
            self.filters.append({"tokens": img_seq, "text_rows": text, "kept_by_filter": int((~dropped).sum()),
                                 "filter_kept_indices": result[0].tolist(), "gap_rel": float(dist.abs().min())})
            return result

        decoder.dual_attention_filter = observed_filter

    def record(self, key_set, thresholds) -> dict:
        from math import ceil

        similarity = self.tensors["window_similarity"]
        merged = similarity >= self.windows["threshold"]
        order = similarity.topk(int(merged.sum())).indices
        cls_row = self.tensors["key_layer_cls_attention_head_mean"]
        key = ceil(0.08 * cls_row.shape[0])
        top = similarity[order]
        return {"merged_windows_in_order": order.tolist(), "key_set": key_set[0].tolist(),
                "encoder_tokens": 576 - 8 * int(merged.sum()), "filters": self.filters,
                "global_thr": thresholds[0], "individual_thr": thresholds[1],
                "mustdrop_margins": {
                    "what": "relative gaps: window similarity to the 0.8 threshold; between the merged windows' "
                            "similarities (their topk order is the merged tokens' order); the key set's top-k of "
                            "layer 23's CLS row; every dual-filter token to its deciding threshold",
                    "window_threshold": {"gap_rel": float(((similarity - 0.8).abs() / 0.8).min())},
                    "merged_window_order": {"gap_rel": float((top[:-1] - top[1:]).min() / top[0]) if len(top) > 1
                                            else None, "exact_ties": int((top[:-1] == top[1:]).sum())},
                    "key_set": topk_gap(cls_row, key),
                    "filters": [{"gap_rel": f["gap_rel"]} for f in self.filters]}}


def kwargs_tome(args) -> object:
    return json.loads(args.tome_r) if args.tome_r else None


def lightcompress_tome(root: str, model, decisions: list, r, first_metric: list) -> None:
    """Patch the vision tower as LightCompress's `ToMe(config, model, blocks)` does (`special: {method: ToMe, r: r}`),
    loading its module unmodified; its package's `__init__` (every method, the whole llmc stack) is replaced by
    empty packages and its registry by a no-op. Observation only: each bipartite matching's decisions and margins
    are recorded (the gap between the r-th and (r+1)-th best edge, and each merged token's best-minus-second
    partner similarity)."""
    import importlib
    import math
    import types

    root = Path(root).resolve()
    for name, folder in (("llmc", "llmc"), ("llmc.compression", "llmc/compression"),
                         ("llmc.compression.token_reduction", "llmc/compression/token_reduction"),
                         ("llmc.utils", None)):
        package = types.ModuleType(name)
        package.__path__ = [str(root / folder)] if folder else []
        sys.modules[name] = package
    registry = types.ModuleType("llmc.utils.registry_factory")
    registry.TOKEN_REDUCTION_REGISTRY = types.SimpleNamespace(register=lambda name: (lambda cls: cls))
    sys.modules["llmc.utils.registry_factory"] = registry
    tome = importlib.import_module("llmc.compression.token_reduction.tome")
    matching = tome.bipartite_soft_matching

    def observed(metric, r, class_token=False, distill_token=False):
        unit = metric / metric.norm(dim=-1, keepdim=True)
        scores = unit[..., ::2, :] @ unit[..., 1::2, :].transpose(-1, -2)
        if class_token:
            scores[..., 0, :] = -math.inf
        top2 = scores.topk(2, dim=-1).values[0]
        edges = top2[:, 0].sort(descending=True).values
        r_eff = min(r, (metric.shape[1] - int(class_token)) // 2)
        if not decisions:  # the first layer's metric, identical to the unpruned tower's: the fragile cases' precondition
            first_metric.append(metric[0].detach().clone())
        decisions.append({"tokens": metric.shape[1], "r": r_eff,
                          "edge_gap_at_r": float(edges[r_eff - 1] - edges[r_eff]) if r_eff > 0 else None,
                          "min_partner_gap": float((top2[:, 0] - top2[:, 1])[top2[:, 0].argsort(descending=True)[:r_eff]].min())
                          if r_eff > 0 else None})
        return matching(metric, r, class_token, distill_token)

    tome.bipartite_soft_matching = observed
    stub = types.SimpleNamespace(pruning_config={"is_video_model": False, "image_token_index": None,
                                                 "vision_token_start_index": None, "image_token_length": 576})
    blocks = model.get_vision_tower().vision_tower.vision_model.encoder.layers
    tome.ToMe({"special": {"method": "ToMe", "r": r}}, stub, blocks)


def topk_gap(scores: torch.Tensor, k: int) -> dict:
    """The gap between the k-th and (k+1)-th largest score: how far a top-k decision clears float32 noise."""
    ranked = scores.sort(descending=True).values
    if k >= len(ranked):
        return {"k": k, "gap_abs": None, "note": "keeps everything"}
    gap = float(ranked[k - 1] - ranked[k])
    return {"k": k, "gap_abs": gap, "gap_rel": gap / abs(float(ranked[k - 1])), "kth": float(ranked[k - 1])}


def margins(method: str, record: dict, tensors: dict, kwargs: dict) -> dict:
    """The margin of every selection decision of the case, from the fork's own attention maps."""
    if method == "fastervlm":
        return {"what": "topk of layer 22's head-mean CLS attention: gap between the T-th and (T+1)-th score",
                "cls_topk": topk_gap(tensors["cls_attention_head_mean"][22], kwargs["visual_token_num"])}
    if method == "mustdrop":
        return record.pop("mustdrop_margins")
    if method == "tome":
        decisions = record["merge_decisions"][:23]  # layers 0..22 make LLaVA's features; layer 23's are unused
        return {"what": "per CLIP layer 0..22: gap between the r-th and (r+1)-th best edge (which a-tokens merge) "
                        "and the smallest best-minus-second partner similarity among the merged (into which b)",
                "min_edge_gap": min(d["edge_gap_at_r"] for d in decisions if d["r"]),
                "min_partner_gap": min(d["min_partner_gap"] for d in decisions if d["r"])}
    if method == "hiprune":
        retention, alpha = int(os.environ["HIPRUNE_RETENTION"]), float(os.environ["HIPRUNE_ALPHA"])
        object_layer = int(os.environ["HIPRUNE_OBJECT_LAYER"]) - 1
        anchors = round(retention * alpha / 5)
        shallow, deep = tensors["received_attention_mean"][object_layer], tensors["received_attention_mean"][22]
        anchor_idx = shallow.topk(anchors).indices
        near = torch.cat([anchor_idx, anchor_idx - 1, anchor_idx + 1, anchor_idx - 24, anchor_idx + 24]).clamp(0, 575)
        taken = torch.zeros(576, dtype=torch.bool)
        taken[near.unique()] = True
        record["anchor_indices"] = anchor_idx.tolist()
        record["anchor_and_buffer_indices_sorted"] = taken.nonzero()[:, 0].tolist()
        return {"what": "anchors: top-k of the object layer's received attention (head mean, query mean, patch columns);"
                        " registers: top-(T - anchors and buffers) of layer 22's received attention minus 1 on the "
                        "anchors and buffers; gap between the k-th and (k+1)-th score",
                "anchors": topk_gap(shallow, anchors),
                "registers": topk_gap(deep - taken.int(), retention - int(taken.sum()))}
    return {}


FRAGILE_BELOW = 1e-5  # relative margin under which a decision is marked fragile (float32 eps is 1.2e-7)


def flat(tree: dict, prefix: str = ""):
    """(key, value) of every leaf of nested dicts."""
    for key, value in tree.items():
        yield from flat(value) if isinstance(value, dict) else [(key, value)]


def assemble(args) -> None:
    """Gather the cases of one method into `official.json` and `official_logits.pt` (the shared fixtures' shape)."""
    import platform

    import tokenizers
    import transformers

    src, dest = Path(args.cases), Path(args.dest)
    cases, logits = {}, {}
    for path in sorted(src.glob("*.json")):
        case, tensors = json.loads(path.read_text()), torch.load(path.with_suffix(".pt"))
        gaps = [v for k, v in flat(case.get("margins", {})) if k in ("gap_rel", "min_edge_gap", "min_partner_gap")
                and v is not None]
        case["fragile"] = bool(gaps) and min(gaps) < FRAGILE_BELOW
        if case["fragile"]:
            case["fragile_reason"] = (f"a selection decision clears the next candidate by {min(gaps):.3g} (relative), "
                                      f"below {FRAGILE_BELOW:g}: within ~100 float32 ulps, so another CPU's kernels "
                                      "may decide it otherwise (methods.md 11.3)")
        cases[path.stem] = case
        logits[path.stem] = {"prefill_last_logits": tensors["prefill_last_logits"],
                             "step_logits": tensors["step_logits"]}
        for name in args.keep_scores:
            key, _, layer = name.partition("@")
            if tensors.get(key) is not None:
                logits[path.stem][f"{key}_layer{layer}" if layer else key] = tensors[key][int(layer)] if layer else tensors[key]
    reference = torch.load(PARITY / "visiondrop" / "official_logits.pt")["none"]["step_logits"]
    fixture = {
        "format": f"{args.method}-parity-fixture/1",
        "what": args.what,
        "official": {"repo": args.official_repo, "commit": args.commit, "fork_root": args.fork_root},
        "command": args.command_line,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__, "python": platform.python_version(),
                     "attention": args.attention, "device": "CPU, float32"},
        "model": {"dir": "../shared/reference/parity/visiondrop/hf_model (llava-hf)", "official_format":
                  "converted by tests/parity/official_llava.py convert: LlavaLlamaForCausalLM + model.mm_projector "
                  "mlp2x_gelu, CLIP folder via mm_vision_tower, mm_vision_select_layer -2, patch features"},
        "inputs": {"file": "../shared/reference/parity/visiondrop/inputs.pt", "seq_len": 631, "image_token_start": 35,
                   "n_text_tokens": 55, "official_ids": "the 576 image ids collapsed to one -200 (56 ids)"},
        "generation": "greedy, use_cache=True, max_new_tokens=8, batch 1, no padding, as llava/eval/model_vqa_loader.py",
        "tolerances": {"logits_max_abs": 0.001, "tokens": "identical", "visual_tokens_per_layer": "identical"},
        "official_side_validation": {
            "what": "the case `none` (keeps everything) against the official unpruned LLaVA-1.5 run in "
                    "../shared/reference/parity/visiondrop", "step_logits_max_abs_diff":
                float((logits["none"]["step_logits"] - reference).abs().max()) if "none" in logits else None},
        "index_conventions": {
            "kept_indices_sorted": "patch index 0..575 (row*24 + col, CLS excluded), ascending: the order in which "
                                   "they enter the LLM (boolean index_mask)",
            "visual_tokens_per_layer": "hidden states entering decoder layer i in prefill, minus the 55 text tokens",
            "decode_position_ids_per_layer": "position id of the new token in every layer, per decode step",
        },
        "logits_file": "official_logits.pt: {case: {'prefill_last_logits': [512], 'step_logits': [8, 512], and the "
                       "scores named " + ", ".join(args.keep_scores) + "}}",
        "cases": cases,
    }
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "official.json").write_text(json.dumps(fixture, indent=1))
    torch.save(logits, dest / "official_logits.pt")
    print(f"wrote {dest} with cases {sorted(cases)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert")
    conv.add_argument("out", type=Path)
    go = sub.add_parser("run")
    go.add_argument("--repo", required=True, help="the fork's root (the folder holding llava/)")
    go.add_argument("--model", required=True, help="the converted model folder")
    go.add_argument("--case", required=True)
    go.add_argument("--method", required=True, choices=["fastervlm", "hiprune", "tome", "mustdrop", "none"])
    go.add_argument("--thresholds", nargs=2, type=float, metavar=("GLOBAL_THR", "INDIVIDUAL_THR"),
                    help="MustDrop's --global_thr and --individual_thr (its generate's first two arguments)")
    go.add_argument("--lightcompress", help="ModelTC/LightCompress root (ToMe as it configures it for LLaVA)")
    go.add_argument("--tome-r", help="LightCompress's r: an int or a JSON list, one per CLIP layer")
    go.add_argument("--out", required=True)
    go.add_argument("--kwarg", action="append", default=[], help="from_pretrained keyword, JSON value")
    go.add_argument("--env", action="append", default=[], help="environment variable the fork reads")
    gather = sub.add_parser("assemble")
    for name in ("cases", "dest", "method", "what", "official_repo", "commit", "fork_root", "command_line"):
        gather.add_argument(f"--{name.replace('_', '-')}", required=True)
    gather.add_argument("--keep-scores", nargs="*", default=[], help="score@layer to keep in the logits file")
    gather.add_argument("--attention", default="LLM sdpa (transformers 4.37.2 default); CLIP eager (the fork asks "
                                                "for output_attentions)", help="the attention the official run used")
    args = parser.parse_args()
    {"convert": lambda: convert(args.out), "run": lambda: run(args), "assemble": lambda: assemble(args)}[args.command]()


if __name__ == "__main__":
    main()
