"""One JSON record per (model, method, budget, benchmark), written atomically; existing records mean "done"."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pandas as pd


def budget_label(tokens: float | None) -> str:
    return "full" if tokens is None else f"{tokens:g}"


class ResultStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, model: str, method: str, budget: float | None, benchmark: str) -> Path:
        return self.root / model / method / budget_label(budget) / f"{benchmark}.json"

    def has(self, model: str, method: str, budget: float | None, benchmark: str) -> bool:
        return self.path(model, method, budget, benchmark).exists()

    def write(self, record: dict) -> Path:
        """Write via a temporary file and an atomic rename, so a killed job never leaves half a record."""
        path = self.path(record["model"], record["method"], record["budget"], record["benchmark"])
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1, default=str)
        os.replace(tmp, path)
        return path

    def records(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(self.root.glob("*/*/*/*.json"))]

    def frame(self) -> pd.DataFrame:
        """One row per record: the identifying columns, the score, its convention and the token accounting."""
        rows = [{k: r.get(k) for k in ("model", "method", "budget", "benchmark", "score", "metric", "convention",
                                        "equivalent_tokens", "measured_tokens", "tflops", "samples")}
                for r in self.records()]
        return pd.DataFrame(rows)
