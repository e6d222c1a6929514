"""Write the parity model (../shared/reference/parity/visiondrop/hf_model, llava-hf format) in the ORIGINAL LLaVA
format the official CDPruner and VScan code loads (LlavaLlamaForCausalLM + model.mm_projector, mlp2x_gelu), with
mm_vision_tower = a copy of ../shared/reference/parity/cdpruner/clip_text (a CLIPModel whose vision side is exactly
the LLaVA tower: checked here), as the fixtures in tests/parity/cdpruner and tests/parity/vscan were made.

    python tests/parity/to_original_llava.py OUT_DIR   (VISIONDROP_SHARED defaults to ../shared)
"""
import json
import os
import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

parity = Path(os.environ.get("VISIONDROP_SHARED", "../shared")) / "reference" / "parity"
out = Path(sys.argv[1]).absolute()
(out / "model").mkdir(parents=True, exist_ok=True)
shutil.copytree(parity / "cdpruner" / "clip_text", out / "clip", dirs_exist_ok=True)
source = load_file(parity / "visiondrop" / "hf_model" / "model.safetensors")
renamed, vision = {}, {}
for key, value in source.items():
    if key.startswith("language_model.model."):
        renamed["model." + key.removeprefix("language_model.model.")] = value
    elif key == "language_model.lm_head.weight":
        renamed["lm_head.weight"] = value
    elif key.startswith("multi_modal_projector.linear_"):
        layer = {"1": "0", "2": "2"}[key.split(".")[1].removeprefix("linear_")]
        renamed[f"model.mm_projector.{layer}.{key.split('.')[-1]}"] = value
    elif key.startswith("vision_tower."):
        vision["vision_model." + key.removeprefix("vision_tower.")] = value
    else:
        raise KeyError(f"unexpected weight {key}")
clip = load_file(out / "clip" / "model.safetensors")
assert all((clip[k].float() == v.float()).all() for k, v in vision.items()), "clip_text's vision side differs"
save_file({k: v.float().contiguous() for k, v in renamed.items()}, out / "model" / "model.safetensors",
          metadata={"format": "pt"})
text = json.loads((parity / "visiondrop" / "hf_model" / "config.json").read_text())["text_config"]
config = {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", "torch_dtype": "float32",
          **{k: text[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                                  "vocab_size", "max_position_embeddings", "rms_norm_eps", "bos_token_id",
                                  "eos_token_id", "pad_token_id", "tie_word_embeddings")},
          "num_key_value_heads": text["num_attention_heads"], "rope_theta": text["rope_parameters"]["rope_theta"],
          "hidden_act": "silu", "pretraining_tp": 1, "attention_bias": False, "use_cache": True,
          "mm_vision_tower": str(out / "clip"), "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
          "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": 64, "mm_use_im_start_end": False,
          "mm_use_im_patch_token": False, "mm_patch_merge_type": "flat", "image_aspect_ratio": "pad",
          "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right"}
(out / "model" / "config.json").write_text(json.dumps(config, indent=1))
print(out / "model")
