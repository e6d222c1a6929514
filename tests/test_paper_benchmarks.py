"""`benchmarks=paper_image`: the paper's nine image benchmarks through their lmms-eval tasks, each read from a small
local stand-in in the stock format (the stock task's split name and fields), with each column's convention."""
import json
import math
from pathlib import Path

import pytest
import yaml
from datasets import Dataset

from visiondrop.harness import job
from visiondrop.harness.store import ResultStore
from visiondrop.harness.tables import build_table
from visiondrop.testing.tiny import demo_image

from test_harness import DEMO_MODEL, ROOT, config

ANSWERS = ["yes", "no", "red", "circle", "two", "yes", "no", "blue", "square", "yes"]  # VQA's ten references


def _mmbench(i: int) -> dict:
    return {"index": i, "question": "Which shape is in the top left?", "hint": None if i else "A scene of shapes.",
            "A": "circle", "B": "square", "C": "triangle", "D": None, "answer": "AB"[i], "category": "spatial",
            "L2-category": "perception", "source": "stand-in", "split": "dev", "image": demo_image(i)}


#: per benchmark (name in paper_image.yaml): the stock task's split and a few rows with its fields
STAND_INS = {
    "GQA": ("testdev", [{"id": str(i), "imageId": f"n{i}", "question": "Is there a circle?", "answer": "yes",
                         "image": demo_image(i)} for i in range(2)]),
    "MMB": ("dev", [_mmbench(i) for i in range(2)]),
    "MMB-CN": ("dev", [{**_mmbench(i), "question": "左上角是什么形状?"} for i in range(2)]),
    # MME scores pairs: two questions per image, one perception and one cognition subtask
    "MME": ("test", [{"question_id": f"{category}/{i}.png", "question": f"Is there a {q}? Please answer yes or no.",
                      "answer": a, "category": category, "image": demo_image(i)}
                     for i, category in enumerate(["existence", "commonsense_reasoning"])
                     for q, a in [("circle", "Yes"), ("dog", "No")]]),
    "POPE": ("test", [{"question_id": str(i), "question": "Is there a red object in the image?",
                       "answer": "yes" if i % 2 else "no", "category": "adversarial", "image_source": str(i),
                       "image": demo_image(i)} for i in range(3)]),
    "SQA": ("test", [{"question": "Which colour is the circle?", "hint": "", "choices": ["red", "green", "blue"],
                      "answer": i, "image": demo_image(i)} for i in range(2)]),
    "VQAv2": ("validation", [{"question_id": i, "question": "What colour is the circle?", "answer_type": "other",
                              "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                                          for k, a in enumerate(ANSWERS)], "image": demo_image(i)}
                             for i in range(2)]),
    "TextVQA": ("validation", [{"question_id": i, "question": "what does the sign say?", "answers": ANSWERS,
                                "ocr_tokens": ["stop"], "image": demo_image(i)} for i in range(2)]),
    "VizWiz": ("val", [{"question_id": f"VizWiz_val_{i:08d}", "question": "What colour is this?",
                        "answers": ANSWERS, "category": "other", "image": demo_image(i)} for i in range(2)]),
}


def _overrides(tmp_path: Path) -> list[str]:
    """One README-style `data` override per benchmark, pointing at its stand-in."""
    benchmarks = yaml.safe_load((ROOT / "configs" / "benchmarks" / "paper_image.yaml").read_text())
    overrides = []
    for position, bench in enumerate(benchmarks):
        split, rows = STAND_INS[bench["name"]]
        path = tmp_path / f"{bench['task']}.parquet"
        Dataset.from_list(rows).to_parquet(path)
        extra = "process_docs: null, " if bench["name"] == "GQA" else ""  # stock GQA joins images from the hub
        overrides.append(f"benchmarks.{position}.data={{dataset_path: parquet, {extra}"
                         f"dataset_kwargs: {{data_files: {{{split}: {path}}}}}}}")
    return overrides


def test_the_nine_paper_benchmarks_run_on_local_stand_ins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory (tasks' submission files included)
    cfg = config(tmp_path, f"model.pretrained={DEMO_MODEL}", "method=none", "benchmarks=paper_image", "limit=null",
                 *_overrides(tmp_path))
    records = {r["benchmark"]: r for r in job.run_job(cfg)}
    assert list(records) == ["GQA", "MMB", "MMB-CN", "MME", "POPE", "SQA", "VQAv2", "TextVQA", "VizWiz"]
    for name, record in records.items():
        rows = STAND_INS[name][1]
        assert record["docs"] == record["docs_total"] == len(rows) and not record["partial"], name
        assert record["convention"] and math.isfinite(record["score"]), name
        samples = [json.loads(line) for line in Path(record["path"]).with_suffix(".samples.jsonl").open()]
        assert len(samples) == len(rows), name
        if record["metric"] == "exact_match":  # the column is the mean of the answers' scores, in %
            assert record["score"] == pytest.approx(100 * sum(s["exact_match"] for s in samples) / len(rows)), name

    # MME: perception + cognition, each subtask's pairs scored acc + acc+ (0-200 per subtask)
    mme = records["MME"]
    by_image = {}
    for sample in [json.loads(line) for line in Path(mme["path"]).with_suffix(".samples.jsonl").open()]:
        [(part, scored)] = [(k, v) for k, v in sample.items() if k.startswith("mme_")]
        by_image.setdefault((part, scored["question_id"]), []).append(scored["score"])
    by_hand = sum(100 * sum(s) / 2 + 100 * (sum(s) == 2) for s in by_image.values())
    assert {part for part, _ in by_image} == {"mme_perception_score", "mme_cognition_score"}
    assert mme["score"] == by_hand and mme["unit"] == "points (0-2800)"
    metrics = mme["metrics"]
    assert mme["score"] == metrics["mme_perception_score,none"] + metrics["mme_cognition_score,none"]
    assert list(tmp_path.glob("submissions")) == []  # beside the record instead
    assert list(Path(records["TextVQA"]["path"]).with_suffix(".outputs").glob("submissions/textvqa_*.json"))
    assert 0 <= records["MMB-CN"]["score"] <= 100 and records["MMB-CN"]["task"] == "mmbench_cn_dev_static"

    table, note = build_table(ResultStore(tmp_path / "runs").frame(), None, "demo-llava-1.5")
    assert list(table.columns[1::2][:9]) == list(records)  # every column, in the paper's order, with its n
    assert "MME perception + cognition score" in note and "MMBench-CN dev" in note
    assert table.attrs["units"]["MME"] == "points (0-2800)" and table.attrs["units"]["GQA"] == "%"  # plot axes
