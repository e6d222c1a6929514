"""Run a video method's official LLaVA-OneVision code (a LLaVA-NeXT fork), unmodified, on the tiny LLaVA-OneVision,
and record what it computes.

Not a test. Two steps, two environments (vidcom2/README.md, dycoke/README.md):

    PYTHONPATH=. python tests/parity/official_onevision.py prepare WORK    # the project's stack, at the repo root
    $SCRATCH/venv/bin/python official_onevision.py run METHOD WORK CHECKOUT OUT [OPTION]   # the official environment

METHOD: vidcom2 (github.com/xuyang-liu16/VidCom2), dycoke (github.com/KD-TAO/DyCoke; OPTION: its dycoke_p), holitom
(github.com/cokeshao/HoliTom, in its own venv with transformers 4.51.3, holitom/README.md; OPTION: the video's scenes)
or fastvid (github.com/LunarShen/FastVID's fastvid_llavaonevision/LLaVA-NeXT, transformers 4.51.3, fastvid/README.md;
OPTION: the video's scenes).

`prepare` builds `build_tiny("llava_onevision", seed=0)` (SigLIP 26 layers at 384/14, Qwen2 28 layers, random weights)
and writes it in the original LLaVA-NeXT format the official code loads: `LlavaQwenForCausalLM` weights
(`model.vision_tower.vision_tower.*`, `model.mm_projector` mlp2x_gelu, `model.image_newline`) and a SigLIP folder named
by `mm_vision_tower` (in an offline Hugging Face cache under WORK/hf_home): `testing.tiny.build_tiny_siglip_head` of
the tiny model's tower, 27 layers, since `SigLipVisionTower.load_model` deletes the last one (a copy of layer 25; the
checkpoint's own tower weights replace the other 26 anyway), with a random post-layernorm and pooling head, which
FastVID's `SigLipVisionAbstract` loads from it (the harness: `head=` that folder). It also writes the inputs of every method's frame count (`video_inputs`, `inputs_F.pt`). `run`
loads the model as the fork's `llava/model/builder.py` does for `llava_qwen` (`from_pretrained`, in float32 on the CPU
with sdpa attention), switches the method on as the fork's `lmms_eval/models/llava_onevision.py` does (VidCom2:
`cus_prepare_inputs_labels_for_multimodal` bound with COMPRESSOR=vidcom2, R_RATIO; DyCoke: the builder's `dycoke*`
attributes and `image_token_start_index`; HoliTom: WRAPPER=holitom and its variables, `model = holitom(model)`; FastVID:
its builder's `overwrite_config` of lmms-eval's `fastvid_*` settings, then `model.build_vision_abstract()`), and
generates greedily with `images=[video]`, `modalities=["video"]`. FastVID's DPC-kNN tie-breaking noise (`torch.rand`)
returns zeros during the run, as the harness adds none (fastvid/README.md).
VidCom2's generate times itself with CUDA events: they get CPU stand-ins. Hooks (observation only) record the tokens
entering every decoder layer and what the method's stage before the LLM received and returned (`vidcom2_compression`,
`dycole_ttm`, HoliTom's `holitom` per window), HoliTom's positions entering layer HOLITOM_k, and DyCoke's decode-time
key selection (`kv_cache` as layer `dycoke_l` reads it), FastVID's side information (`set_my_kwargs`: the frames'
pooled probe attention and global features) and the positions entering layer 0 (its `keep_indexs`); they change
nothing the official code computes.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

SHIFT, NEW_TOKENS = 24, 6
#: per method: frames of the video, the official settings (VidCom2's R_RATIO; DyCoke's lmms-eval defaults)
SETTINGS = {"vidcom2": {"frames": 4, "R_RATIO": 0.25},
            "dycoke": {"frames": 8, "dycoke_k": 0.7, "dycoke_p": 0.8, "dycoke_l": 3,
                       "dycoke_num_tokens_per_frame": 196},
            # scripts/eval_ov-7b_holitom.sh's second setting (full HoliTom: HOLITOM_k/r switch the inner merge on)
            "holitom": {"frames": 8, "scenes": 1, "RETAIN_RATIO": 0.15, "T": 0.80, "HOLITOM_k": 18, "HOLITOM_r": 0.5},
            # scripts/eval.sh's settings; 16 frames, so that DySeg's c - 1 = 7 cuts leave segments of several frames
            "fastvid": {"frames": 16, "scenes": 1, "fastvid_retention_ratio": 0.10, "fastvid_DySeg_c": 8,
                        "fastvid_DySeg_tau": 0.9, "fastvid_STPrune_d": 0.4, "fastvid_DTM_p": 4,
                        "fastvid_DTM_beta": 0.6}}
QUESTION = "What moves in the video? Answer briefly."
IMAGE_TOKEN_INDEX = -200
# The real checkpoints' tower name: the builder picks SigLipVisionTower by it (an existing path would be CLIP), so
# the tiny tower is stored under this name in an offline Hugging Face cache (WORK/hf_home).
SIGLIP = "google/siglip-so400m-patch14-384"


def video_inputs(processor, frames: int, scenes: int = 1) -> dict:
    """A video of `frames` frames (synthetic scenes, `scenes` consecutive runs of equally many frames, panned by 24 pixels
    a frame) and the chat-template prompt, as the project's processor encodes them."""
    from visiondrop.harness.prompting import build_prompt
    from visiondrop.testing.tiny import demo_image

    scene = [np.asarray(demo_image(s, (384, 384))) for s in range(scenes)]
    frames = np.stack([np.roll(scene[f * scenes // frames], SHIFT * f, axis=1) for f in range(frames)])
    text = build_prompt(processor, QUESTION, True, "chat_template", "video")
    return dict(processor(text=[text], videos=[frames], return_tensors="pt"))


def inputs_file(frames: int, scenes: int) -> str:
    return f"inputs_{frames}.pt" if scenes == 1 else f"inputs_{frames}x{scenes}.pt"


def prepare(work: Path) -> None:
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig
    from to_original_llava import original_llava_name  # beside this file

    from visiondrop.testing.tiny import build_tiny, build_tiny_siglip_head, load_tiny

    hf = build_tiny("llava_onevision", work / "hf", seed=0)
    config = json.loads((hf / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    weights = {k: v.float().contiguous() for k, v in load_file(hf / "model.safetensors").items()}

    siglip = work / "hf_home" / "hub" / f"models--{SIGLIP.replace('/', '--')}"
    (siglip / "refs").mkdir(parents=True, exist_ok=True)
    (siglip / "refs" / "main").write_text("0" * 40)
    build_tiny_siglip_head(siglip / "snapshots" / ("0" * 40), AutoConfig.from_pretrained(hf).vision_config, tower=hf)

    renamed = {}
    for k, v in weights.items():
        if k.startswith("vision_tower."):
            renamed["model.vision_tower.vision_tower.vision_model." + k.removeprefix("vision_tower.")] = v
        elif k == "image_newline":
            renamed["model.image_newline"] = v
        elif (name := original_llava_name(k)) is not None:  # the language model, its head, the projector
            renamed[name] = v
        else:
            raise KeyError(f"unexpected weight {k}")
    (work / "llava").mkdir(parents=True, exist_ok=True)
    save_file(renamed, work / "llava" / "model.safetensors", metadata={"format": "pt"})
    (work / "llava" / "config.json").write_text(json.dumps({
        "architectures": ["LlavaQwenForCausalLM"], "model_type": "llava_qwen", "torch_dtype": "float32",
        **{k: text[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                                "num_hidden_layers", "vocab_size", "max_position_embeddings", "rms_norm_eps",
                                "hidden_act", "bos_token_id", "eos_token_id", "tie_word_embeddings")},
        "rope_theta": text["rope_parameters"]["rope_theta"], "use_sliding_window": False, "sliding_window": 32768,
        "max_window_layers": text["max_window_layers"], "attention_dropout": 0.0, "use_cache": True,
        "mm_vision_tower": SIGLIP, "mm_hidden_size": vision["hidden_size"],
        "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
        "mm_patch_merge_type": "spatial_unpad", "mm_newline_position": "one_token", "image_aspect_ratio": config[
            "vision_aspect_ratio"], "image_grid_pinpoints": config["image_grid_pinpoints"],
        "mm_spatial_pool_mode": "bilinear", "mm_spatial_pool_stride": 2, "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False, "add_faster_video": False, "delay_load": False}, indent=1))

    _, processor = load_tiny(hf)
    # every method's video, and HoliTom's two-scene one (`run holitom ... 2`: two windows)
    for frames, scenes in sorted({(s["frames"], s.get("scenes", 1)) for s in SETTINGS.values()} | {(8, 2)}):
        inputs = video_inputs(processor, frames, scenes)
        ids = inputs["input_ids"][0].tolist()
        video = [i for i, t in enumerate(ids) if t == config["video_token_index"]]
        assert video == list(range(video[0], video[-1] + 1)), "one contiguous video block expected"
        collapsed = ids[:video[0]] + [IMAGE_TOKEN_INDEX] + ids[video[-1] + 1:]  # as tokenizer_image_token gives it
        torch.save({"input_ids": torch.tensor([collapsed]), "video": inputs["pixel_values_videos"][0].float(),
                    "video_tokens": len(video)}, work / inputs_file(frames, scenes))


class CpuEvent:
    """Stands in for torch.cuda.Event in the fork's timing code (it measures, it computes nothing)."""

    def __init__(self, **kwargs):
        pass

    def record(self) -> None:
        pass

    def elapsed_time(self, other: "CpuEvent") -> float:
        return 0.0


def observe(module, name: str, calls: list) -> None:
    """Wrap `module.name` so that each call's input and output are recorded; what it returns is unchanged."""
    original = getattr(module, name)

    def observed(features, *args, **kwargs):
        kept = original(features, *args, **kwargs)
        calls.append((features.detach().clone(), kept.detach().clone(), args, kwargs))
        return kept

    setattr(module, name, observed)


def observe_side(qwen2, calls: list) -> None:
    """Record what FastVID's `generate` passes to `Qwen2Model.set_my_kwargs` (its side information); unchanged."""
    original = qwen2.set_my_kwargs

    def observed(**kwargs):
        calls.append({k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})
        return original(**kwargs)

    qwen2.set_my_kwargs = observed


#: the setting the optional last argument of `run` replaces
OPTION = {"dycoke": "dycoke_p", "holitom": "scenes", "fastvid": "scenes"}


def run(method: str, work: Path, checkout: Path, out: Path, option: float | None = None) -> None:
    settings = dict(SETTINGS[method])
    if option is not None:
        settings[OPTION[method]] = type(settings[OPTION[method]])(option)
    os.environ.update(HF_HOME=str((work / "hf_home").resolve()), HF_HUB_OFFLINE="1")
    import transformers

    sys.path.insert(0, str(checkout))
    import types

    import llava.model.llava_arch as arch
    from llava.model.language_model.llava_qwen import LlavaQwenForCausalLM

    # VidCom2's generate times itself with CUDA events; on this CPU-only machine they are no-op stand-ins.
    torch.cuda.Event, torch.cuda.synchronize = CpuEvent, lambda *a, **k: None
    config = {}
    if method == "fastvid":  # llava/model/builder.py with the overwrite_config lmms-eval's llava_onevision passes
        from llava.model.language_model.llava_qwen import LlavaQwenConfig

        config = LlavaQwenConfig.from_pretrained(work / "llava")
        for key, value in {"mm_spatial_pool_stride": 2, "mm_spatial_pool_mode": "bilinear",
                           **{k: v for k, v in settings.items() if k.startswith("fastvid_")}}.items():
            setattr(config, key, value)
        config = {"config": config}
    model = LlavaQwenForCausalLM.from_pretrained(work / "llava", low_cpu_mem_usage=True, torch_dtype=torch.float32,
                                                 attn_implementation="sdpa", **config).eval()
    if method == "fastvid":
        model.build_vision_abstract()  # SigLipVisionAbstract: the head of SigLipVisionModel.from_pretrained(SIGLIP)
    vision_tower = model.get_vision_tower()
    if not vision_tower.is_loaded:
        vision_tower.load_model()
    inputs = torch.load(work / inputs_file(settings["frames"], settings.get("scenes", 1)))
    compressions, lengths, key_selections = [], [], []
    if method == "vidcom2":  # lmms_eval/models/llava_onevision.py with COMPRESSOR=vidcom2
        os.environ["R_RATIO"] = str(settings["R_RATIO"])
        import token_compressor.vidcom2.models.llava as official_ov
        model.prepare_inputs_labels_for_multimodal = types.MethodType(
            official_ov.cus_prepare_inputs_labels_for_multimodal, model)
        observe(official_ov, "vidcom2_compression", compressions)
    elif method == "holitom":  # lmms_eval/models/llava_onevision.py with WRAPPER=holitom: `holitom(model)`
        os.environ.update(WRAPPER="holitom",
                          **{k: str(settings[k]) for k in ("RETAIN_RATIO", "T", "HOLITOM_k", "HOLITOM_r")})
        sys.path.insert(0, str(checkout.parent))
        from holitom import holitom
        model = holitom(model)
        observe(model, "holitom", compressions)
        # the sequence positions the inner merge keeps (its `keep_indexs`, the position ids of layers >= HOLITOM_k)
        model.model.layers[settings["HOLITOM_k"]].register_forward_pre_hook(
            lambda m, a, kw: key_selections.append(kw["position_ids"][0].clone()), with_kwargs=True)
    elif method == "fastvid":  # its side information as generate passes it on, and the positions entering layer 0
        observe_side(model.model, compressions)
        model.model.layers[0].register_forward_pre_hook(
            lambda m, a, kw: key_selections.append(kw["position_ids"][0].clone()), with_kwargs=True)
    else:  # llava/model/builder.py's load_pretrained_model(..., dycoke=True, ...), as lmms-eval's llava_onevision calls
        # it
        model.dycoke = True
        for key in ("dycoke_l", "dycoke_p", "dycoke_num_tokens_per_frame", "dycoke_k"):
            setattr(model, key, settings[key])
        # the video's first position (lmms-eval's default 14 is the length of the real Qwen2 system prompt before it)
        model.image_token_start_index = settings["image_token_start_index"] = \
            inputs["input_ids"][0].tolist().index(IMAGE_TOKEN_INDEX)
        observe(arch, "dycole_ttm", compressions)
        model.model.layers[settings["dycoke_l"]].register_forward_pre_hook(
            lambda m, a, kw: key_selections.append(kw["past_key_value"].kv_cache), with_kwargs=True)
    hooks = [layer.register_forward_pre_hook(lambda m, a, kw: lengths.append(
        (kw["hidden_states"] if "hidden_states" in kw else a[0]).shape[1]), with_kwargs=True)
        for layer in model.model.layers]
    rand = torch.rand  # FastVID's DPC-kNN tie-breaking noise: zeros (the harness adds none)
    torch.rand = lambda *args, **kwargs: torch.zeros(*args, **{k: v for k, v in kwargs.items() if k != "generator"})
    with torch.no_grad():
        result = model.generate(inputs["input_ids"], images=[inputs["video"]], modalities=["video"],
                                image_sizes=[(384, 384)], do_sample=False, max_new_tokens=NEW_TOKENS,
                                min_new_tokens=NEW_TOKENS, output_logits=True, return_dict_in_generate=True,
                                use_cache=True, pad_token_id=0)
    torch.rand = rand
    for h in hooks:
        h.remove()
    if method == "holitom":  # one `holitom` call per window; it merges (averages) tokens: its outputs are recorded
        kept = torch.cat([window for _, window, _, _ in compressions])
        features, args, kwargs = inputs["video"], (), {"windows": len(compressions)}
        kept_indices = torch.zeros(0)
    elif method == "fastvid":  # the video positions entering layer 0 in the prefill (its sorted keep_indexs)
        (side,), start = compressions, inputs["input_ids"][0].tolist().index(IMAGE_TOKEN_INDEX)
        positions = key_selections[0]
        kept_indices = positions[(positions >= start) & (positions < start + side["video_token_len"])] - start
        features, kept, args, kwargs = positions, None, (), {}
    else:
        (features, kept, args, kwargs), = compressions
        # the output rows are input rows (a gather), in the official output order; their input indices are what it kept
        matches = (kept[:, None, :] == features[None, :, :]).all(-1)
        assert (matches.sum(1) == 1).all(), "every kept row must be exactly one input row"
        kept_indices = matches.float().argmax(1)
    layers = len(model.model.layers)
    n_text = inputs["input_ids"].shape[1] - 1
    per_layer = [n - n_text for n in lengths[:layers]]
    steps = [lengths[i * layers:(i + 1) * layers] for i in range(len(lengths) // layers)]
    # HoliTom's inner merge shortens the prefill from layer HOLITOM_k on; the decode steps are one token everywhere
    assert all(len(set(s)) == 1 for s in steps[method == "holitom":]), "every decoder layer sees the same tokens"
    torch.save({
        "method": method, "tokens": result.sequences[0].tolist(), "logits": torch.stack(result.logits, 1)[0].float(),
        "visual_tokens_per_layer": per_layer, "kept_indices": kept_indices.tolist(),
        "video_tokens_before": inputs["video_tokens"] if method == "holitom" else side["video_token_len"]
        if method == "fastvid" else features.shape[0],
        "step_lengths": [s[-1] for s in steps],
        "stage_output": kept.float() if method == "holitom" else None,
        # DyCoke: per decode step, the sequence positions layers >= dycoke_l attend to (None: all)
        "key_selections": key_selections[1:] if method == "dycoke" else [],
        # HoliTom: the sequence positions entering layer HOLITOM_k in the prefill (the inner merge's keep_indexs)
        "inner_positions": key_selections[0].tolist() if method == "holitom" else None,
        # FastVID: what its generate passed to `set_my_kwargs` (a_f pooled 14x14 per frame, g_f per frame)
        "frame_attn_weights": side["frame_attn_weights"].float() if method == "fastvid" else None,
        "frame_global_features": side["frame_global_features"].float() if method == "fastvid" else None,
        "settings": {**settings, "shift": SHIFT, "question": QUESTION, "new_tokens": NEW_TOKENS,
                     "stage_args": [list(map(str, args)), {k: str(v) for k, v in kwargs.items()}]},
        "versions": {"torch": str(torch.__version__), "transformers": transformers.__version__},
        "input_ids": inputs["input_ids"][0].tolist(),
    }, out)
    print(json.dumps({"tokens": result.sequences[0].tolist(), "visual_tokens_per_layer": per_layer[:3],
                      "kept": len(kept_indices), "of": features.shape[0],
                      "key_selections": [None if k is None else len(k) for k in key_selections[1:]]}))


if __name__ == "__main__":
    if sys.argv[1:2] == ["prepare"] and len(sys.argv) == 3:
        prepare(Path(sys.argv[2]))
    elif sys.argv[1:2] == ["run"] and len(sys.argv) in (6, 7) and sys.argv[2] in SETTINGS:
        run(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5]),
            float(sys.argv[6]) if len(sys.argv) == 7 else None)
    else:
        raise SystemExit(f"usage: official_onevision.py prepare WORK | run {{{','.join(SETTINGS)}}} WORK CHECKOUT OUT "
                         "[dycoke_p | scenes]")
