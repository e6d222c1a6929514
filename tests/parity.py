"""Helpers to compare a run of the harness with a run of an official implementation (../shared/reference/parity)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

PARITY = Path(os.environ.get("VISIONDROP_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "reference" / "parity"


#: fixtures built by this project from the official code (tests/parity/official_llava.py), committed with it
LOCAL_PARITY = Path(__file__).resolve().parent / "parity"


def load_case(method: str, case: str) -> tuple[dict, dict]:
    """(official.json case, official logits of that case), from the shared folder or this repository's own."""
    folder = PARITY / method if (PARITY / method).exists() else LOCAL_PARITY / method
    return (json.loads((folder / "official.json").read_text())["cases"][case],
            torch.load(folder / "official_logits.pt")[case])


def parity_inputs() -> dict:
    raw = torch.load(PARITY / "visiondrop" / "inputs.pt")
    return {k: raw[k] for k in ("input_ids", "attention_mask", "pixel_values")}


def greedy_with_logits(model, inputs: dict, new_tokens: int = 8) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and the logits of the prefill's last position and of every decode step: [new_tokens, V]."""
    out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences[0, inputs["input_ids"].shape[1]:].tolist(), torch.stack(out.logits)[:, 0]


def assert_matches_official(model, inputs: dict, official: dict, logits: dict, handle=None) -> None:
    """Greedy tokens, the logits of the prefill and of every decode step, and (with a trace) per-layer counts."""
    tokens, step_logits = greedy_with_logits(model, inputs, len(official["greedy_tokens"]))
    diff = (step_logits - logits["step_logits"]).abs().max().item()
    assert diff < 1e-3, f"logits differ from the official run by {diff}"
    assert tokens == official["greedy_tokens"]
    if handle is not None:
        n_layers = model.config.text_config.num_hidden_layers
        expected = official.get("visual_tokens_per_layer", [official.get("n_image_tokens", 576)] * n_layers)
        assert handle.trace.tokens_per_layer == [expected]
