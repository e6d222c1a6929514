"""Write the parity model (../shared/reference/parity/visiondrop/hf_model, llava-hf format) in the ORIGINAL LLaVA
format the official CDPruner and VScan code loads (LlavaLlamaForCausalLM + model.mm_projector, mlp2x_gelu), with
mm_vision_tower = a copy of ../shared/reference/parity/cdpruner/clip_text (a CLIPModel whose vision side is exactly
the LLaVA tower: checked here), as the fixtures in tests/parity/cdpruner and tests/parity/vscan were made.

    python tests/parity/to_original_llava.py OUT_DIR   (VISIONDROP_SHARED defaults to ../shared)

`original_llava_name` is the renaming every original LLaVA format shares (LLaVA-NeXT's too: official_onevision.py).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

PARITY = Path(os.environ.get("VISIONDROP_SHARED", "../shared")) / "reference" / "parity"


def original_llava_name(key: str) -> str | None:
    """The original LLaVA name of a llava-hf weight of the language model, its head or the two-layer projector
    (mlp2x_gelu: `model.mm_projector.0` and `.2`); None for the others (the vision tower, OneVision's newline), which
    each original format places its own way."""
    if key.startswith("language_model.model."):
        return "model." + key.removeprefix("language_model.model.")
    if key == "language_model.lm_head.weight":
        return "lm_head.weight"
    if key.startswith("multi_modal_projector.linear_"):
        layer = {"1": "0", "2": "2"}[key.split(".")[1].removeprefix("linear_")]
        return f"model.mm_projector.{layer}.{key.split('.')[-1]}"
    return None


def original_weights(source: dict) -> tuple[dict, dict]:
    """The llava-hf weights in original LLaVA names, and the vision tower's as a CLIPModel's vision side names them."""
    renamed, vision = {}, {}
    for key, value in source.items():
        name = original_llava_name(key)
        if name is not None:
            renamed[name] = value
        elif key.startswith("vision_tower."):
            vision["vision_model." + key.removeprefix("vision_tower.")] = value
        else:
            raise KeyError(f"unexpected weight {key}")
    return renamed, vision


def original_config(text: dict, clip: Path) -> dict:
    """The original LLaVA config of the llava-hf `text` config, with the CLIP folder `clip` as its tower."""
    return {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", "torch_dtype": "float32",
            **{k: text[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                                    "vocab_size", "max_position_embeddings", "rms_norm_eps", "bos_token_id",
                                    "eos_token_id", "pad_token_id", "tie_word_embeddings")},
            "num_key_value_heads": text["num_attention_heads"], "rope_theta": text["rope_parameters"]["rope_theta"],
            "hidden_act": "silu", "pretraining_tp": 1, "attention_bias": False, "use_cache": True,
            "mm_vision_tower": str(clip), "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
            "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": 64, "mm_use_im_start_end": False,
            "mm_use_im_patch_token": False, "mm_patch_merge_type": "flat", "image_aspect_ratio": "pad",
            "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right"}


def convert(out: Path) -> Path:
    """Write the model to `out`/model and its tower to `out`/clip; returns the model's folder."""
    (out / "model").mkdir(parents=True, exist_ok=True)
    shutil.copytree(PARITY / "cdpruner" / "clip_text", out / "clip", dirs_exist_ok=True)
    renamed, vision = original_weights(load_file(PARITY / "visiondrop" / "hf_model" / "model.safetensors"))
    clip = load_file(out / "clip" / "model.safetensors")
    assert all((clip[k].float() == v.float()).all() for k, v in vision.items()), "clip_text's vision side differs"
    save_file({k: v.float().contiguous() for k, v in renamed.items()}, out / "model" / "model.safetensors",
              metadata={"format": "pt"})
    text = json.loads((PARITY / "visiondrop" / "hf_model" / "config.json").read_text())["text_config"]
    (out / "model" / "config.json").write_text(json.dumps(original_config(text, out / "clip"), indent=1))
    return out / "model"


if __name__ == "__main__":
    print(convert(Path(sys.argv[1]).absolute()))
