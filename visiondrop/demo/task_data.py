"""Data of the `visiondrop_demo` task: the test split of the synthetic shapes benchmark (visiondrop/demo/synthetic.py).

160 scenes, one question each, cycling existence-yes / existence-no (mostly adversarial) / colour at a named
position / shape at a named position; one-word answers scored by exact match. The train split (used only by
scripts/train_demo_model.py) comes from a disjoint seed stream. Rewrite the shipped file with

    python -m visiondrop.demo.task_data
"""
from __future__ import annotations

import io
from pathlib import Path

from . import synthetic

DATA_FILE = Path(__file__).parents[1] / "harness" / "tasks" / "visiondrop_demo" / "demo.parquet"
N_QUESTIONS = 160


def make_samples(n: int = N_QUESTIONS, seed: int = 0) -> list[dict]:
    rows = []
    for row in synthetic.samples("test", n, seed):
        png = io.BytesIO()
        row["image"].save(png, format="PNG", optimize=True)
        rows.append({**row, "image": {"bytes": png.getvalue(), "path": None}})
    return rows


def make_demo_dataset(path: str | Path = DATA_FILE, n: int = N_QUESTIONS, seed: int = 0) -> Path:
    """Write n samples to a parquet file that `datasets` reads back with decoded PIL images."""
    from datasets import Dataset, Features, Image as ImageFeature, Value

    features = Features({"question_id": Value("string"), "image": ImageFeature(), "question": Value("string"),
                         "answer": Value("string"), "category": Value("string"), "small": Value("bool")})
    rows = make_samples(n, seed)
    Dataset.from_dict({key: [row[key] for row in rows] for key in features}, features=features).to_parquet(str(path))
    return Path(path)


if __name__ == "__main__":
    print(make_demo_dataset())
