"""One JSON record per run identity, written atomically; a record with the job's key means "done".

Layout: `<root>/<model>/<method>/<benchmark>/<key>.json`, beside it `<key>.samples.jsonl` (the per-sample answers)
and `<key>.positions.json` (the run's positional-bias maps, `harness.positions`).
Records of the first layout, `<root>/<model>/<method>/<budget>/<benchmark>.json` keyed by budget only, stay
readable: they have no key, so no job ever skips because of one, and they count as partial when they had a limit.
A `.json` file that is not a readable record (truncated, invalid JSON, a foreign file) is named in a warning and
skipped: never counted as done, never read into a table. Many jobs may write one store (`harness.claims`).
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

import pandas as pd


log = logging.getLogger(__name__)
COLUMNS = ("model", "method", "variant", "options", "budget", "retention_ratio", "benchmark", "score", "metric",
           "convention", "unit", "equivalent_tokens", "measured_tokens", "tflops", "samples", "docs", "partial",
           "schedule", "protocol", "judged_by", "judging", "created", "path")
POSITIONS = ".positions.json"


def judge_label(described: dict | None) -> str | None:
    """A recorded judge (`Judge.describe()`) as tables and logs name it: "model at base_url"; None if unjudged."""
    return f"{described['model']} at {described['base_url']}" if described else None


def positions_path(record_path: str | Path) -> Path:
    """Where a record's positional-bias maps lie: `<key>.positions.json` beside `<key>.json`."""
    return Path(record_path).with_suffix(POSITIONS)


def options_label(options: dict | None) -> str:
    """Method options as a short label, e.g. "k=3" (empty for none)."""
    return ",".join(f"{k}={json.dumps(v, default=str)}" for k, v in sorted((options or {}).items()))


class ResultStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, identity: dict, key: str) -> Path:
        return self.root / identity["model"] / identity["method"] / identity["benchmark"]["name"] / f"{key}.json"

    def write(self, record: dict, samples: list[dict] | None = None, positions: dict | None = None) -> Path:
        """Write via temporary files and atomic renames (answers and maps first, the record last), so a killed job
        never leaves half a record, and a record's companions are there when it is."""
        path = self.path(record["identity"], record["key"])
        path.parent.mkdir(parents=True, exist_ok=True)
        if samples is not None:
            _atomic(path.with_suffix(".samples.jsonl"), "".join(json.dumps(s, default=str) + "\n" for s in samples))
        if positions is not None:
            _atomic(positions_path(path), json.dumps(positions))
        _atomic(path, json.dumps(record, indent=1, default=str))
        return path

    def readable(self) -> list[tuple[Path, dict]]:
        """(path, record) of every readable record; unreadable files are warned about and left out."""
        paths = sorted(p for p in self.root.glob("*/*/*/*.json") if not p.name.endswith(POSITIONS))
        return [(p, r) for p in paths if (r := read_record(p)) is not None]

    def records(self) -> list[dict]:
        return [_normalised(record, path) for path, record in self.readable()]

    def frame(self) -> pd.DataFrame:
        return records_frame(self.records())


def read_records(paths: Iterable[str | Path]) -> list[dict]:
    return [_normalised(r, Path(p)) for p in paths if (r := read_record(p)) is not None]


#: what every record of either layout holds
RECORD_FIELDS = ("model", "method", "benchmark", "score")


def read_record(path: str | Path) -> dict | None:
    """The record at `path`; None, with a warning naming the file, if it does not exist or is not a readable record
    (a truncated or invalid JSON file, as a full disk or a killed copy leaves it, or a foreign file)."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        log.warning("%s: not a readable record, ignored (%s: %s); its job runs again unless you restore it",
                    path, type(err).__name__, err)
        return None
    if not isinstance(record, dict) or any(k not in record for k in RECORD_FIELDS):
        log.warning("%s: not a record (no %s), ignored", path, "/".join(RECORD_FIELDS))
        return None
    return record


def read_samples(record_path: str | Path) -> list[dict]:
    """The per-sample answers stored beside a record (`<key>.samples.jsonl`)."""
    text = Path(record_path).with_suffix(".samples.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line]


def records_frame(records: list[dict]) -> pd.DataFrame:
    """One row per record: what identifies it in a table, the score, its convention and the token accounting."""
    return pd.DataFrame([{k: r.get(k) for k in COLUMNS} for r in records], columns=list(COLUMNS))


def _atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _normalised(record: dict, path: Path) -> dict:
    """The fields tables read, for records of either layout: the options set by hand as a label (variant), the
    schedule as a row key, the judge of open-ended answers as a label (judged_by)."""
    config = record.get("config") or {}
    given = (config.get("method") or {}).get("options")
    created = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat()
    return {**record, "path": str(path), "created": record.get("created", created),
            "partial": record.get("partial", config.get("limit") is not None),
            "variant": options_label(given), "schedule": json.dumps(record.get("schedule"), sort_keys=True),
            "judged_by": judge_label(record.get("judge")),
            "judging": (record.get("judging") or {}).get("state")}
