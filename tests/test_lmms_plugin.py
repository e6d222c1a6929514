"""The lmms-eval plugin model `pruned_lvlm` and the local `visiondrop_demo` task, on the tiny random LLaVA-1.5.

Random weights answer garbage: these tests check structure (files, keys, counts) and equalities, never accuracy.
"""
import json
import os
import subprocess
import sys

import pytest
from lmms_eval.api.instance import GenerationResult, Instance
from PIL import Image

from visiondrop.harness import TASKS_DIR
from visiondrop.harness.lmms_model import PrunedLVLM, _parse_value
from visiondrop.harness.prompting import expand_to_square, mean_colour, vicuna_v1_prompt
from visiondrop.testing.tiny import demo_image

RUN_INFO_KEYS = {"method", "budget", "policy", "image_aspect_ratio", "conv_template", "measured_tokens_mean",
                 "samples"}


def test_cli_writes_results(tiny_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf_datasets")}
    command = [sys.executable, "-m", "lmms_eval", "--model", "pruned_lvlm",
               "--model_args", f"pretrained={tiny_dir},method=visiondrop,budget=64",
               "--tasks", "visiondrop_demo", "--include_path", str(TASKS_DIR), "--limit", "4",
               "--gen_kwargs", "max_new_tokens=4", "--output_path", str(tmp_path / "out"), "--log_samples"]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    # The CLI exits 0 even when the evaluation fails: the results file is the real check.
    results = sorted((tmp_path / "out").rglob("*_results.json"))
    assert done.returncode == 0 and results, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads(results[0].read_text())
    assert "exact_match,none" in record["results"]["visiondrop_demo"]
    assert record["n-samples"]["visiondrop_demo"] == {"original": 160, "effective": 4}  # the shipped test split
    samples = [json.loads(line) for line in next((tmp_path / "out").rglob("*_samples_*.jsonl")).open()]
    assert len(samples) == 4 and all(isinstance(s["filtered_resps"], str) for s in samples)


def test_simple_evaluate_with_an_instance(tiny_dir):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    lm = PrunedLVLM(pretrained=str(tiny_dir), method="visiondrop", budget=64, batch_size=2)
    manager = TaskManager(include_path=str(TASKS_DIR))
    results = simple_evaluate(model=lm, tasks=["visiondrop_demo"], task_manager=manager, limit=3,
                              bootstrap_iters=0, datetime_str="20250101_000000", gen_kwargs="max_new_tokens=4")
    assert set(results["results"]["visiondrop_demo"]) >= {"exact_match,none"}
    assert results["n-samples"]["visiondrop_demo"]["effective"] == 3
    info = lm.run_info
    assert RUN_INFO_KEYS <= set(info)
    assert info["method"] == "visiondrop" and info["budget"] == 64 and info["policy"]["method"] == "visiondrop"
    assert info["image_aspect_ratio"] == "pad" and info["conv_template"] == "vicuna_v1"
    assert info["samples"] == 3 and info["measured_tokens_mean"] == 64
    assert lm.model is not None  # lmms-eval's clean() after the run must not drop the model


DOCS = [{"image": demo_image(0, (400, 300)), "question": "What is in the image?"},
        {"image": None, "question": "Colour?"},  # text-only: no <image> in the prompt, passes unpruned
        {"image": demo_image(2), "question": "Is there a red circle in the picture? Answer yes or no."},
        {"image": demo_image(3, (200, 336)), "question": "How many shapes?"}]


def _requests(kind: str, **gen_kwargs) -> list[Instance]:
    def visual(doc):
        return [] if doc["image"] is None else [doc["image"]]

    def request(i, doc):
        generation = {"max_new_tokens": 4, "until": ["\n\n"], "temperature": 0, **gen_kwargs}
        second = generation if kind == "generate_until" else " yes"
        return Instance(request_type=kind, arguments=(doc["question"], second, visual, i, "demo", "test"), idx=0,
                        metadata={"task": "demo", "doc_id": i, "repeats": 1})

    return [request(i, doc) for i, doc in enumerate(DOCS)]


def test_batch_of_three_equals_batch_of_one(tiny_dir):
    outputs = []
    for batch_size in (1, 3):
        lm = PrunedLVLM(pretrained=str(tiny_dir), method="visiondrop", budget=64, batch_size=batch_size)
        lm.task_dict = {"demo": {"test": DOCS}}
        answers = lm.generate_until(_requests("generate_until"))
        scores = lm.loglikelihood(_requests("loglikelihood"))
        assert all(isinstance(s, GenerationResult) and isinstance(s.text[1], bool) for s in scores)
        outputs.append((answers, [s.text[0] for s in scores], lm.run_info))
    (answers_1, nll_1, info_1), (answers_3, nll_3, info_3) = outputs
    assert len(answers_1) == len(DOCS) and all(isinstance(a, str) for a in answers_1)
    assert answers_1 == answers_3
    assert nll_1 == pytest.approx(nll_3, abs=1e-4) and all(n > 0 for n in nll_1)
    assert info_1["samples"] == info_3["samples"] == 2 * len(DOCS)
    assert info_1["measured_tokens_mean"] == info_3["measured_tokens_mean"] == 64


def test_beam_search_batch_equals_alone(tiny_dir):
    answers, maps = [], []
    for batch_size in (1, 3):
        lm = PrunedLVLM(pretrained=str(tiny_dir), method="visiondrop", budget=64, batch_size=batch_size)
        lm.task_dict = {"demo": {"test": DOCS}}
        answers.append(lm.generate_until(_requests("generate_until", num_beams=3)))
        maps.append(lm.position_maps.to_dict())  # each sample's trace read once, not once per beam
        assert lm.position_maps.cuts["encoder"].samples == 3 and lm.run_info["measured_tokens_mean"] == 64
    assert answers[0] == answers[1] and all(isinstance(a, str) for a in answers[0])
    assert maps[0] == maps[1]


def test_expand_to_square_pads_with_the_mean_colour():
    background = mean_colour([0.48145466, 0.4578275, 0.40821073])  # CLIP's mean, as LLaVA pads
    assert background == (122, 116, 104)
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    square = expand_to_square(image, background)
    assert square.size == (40, 40)
    assert square.getpixel((0, 0)) == square.getpixel((39, 39)) == background  # bands above and below
    assert square.getpixel((20, 20)) == square.getpixel((0, 10)) == (255, 0, 0)  # centred, full width
    assert expand_to_square(square, background) is square
    tall = expand_to_square(Image.new("RGB", (11, 20), (0, 0, 255)), background)
    assert tall.size == (20, 20) and tall.getpixel((0, 0)) == background and tall.getpixel((4, 0)) == (0, 0, 255)


def test_prompt_and_model_args():
    assert vicuna_v1_prompt("Q?", True).endswith(" USER: <image>\nQ? ASSISTANT:")
    assert vicuna_v1_prompt("Q?", False).startswith("A chat between a curious human")
    assert "<image>" not in vicuna_v1_prompt("Q?", False)
    assert _parse_value("[8,16,24]") == [8, 16, 24]
    assert _parse_value('{"encoder": [42, 6]}') == {"encoder": [42, 6]}
    assert _parse_value("last_token") == "last_token" and _parse_value("None") is None and _parse_value(3) == 3
