"""Judging throughput by concurrency, on the loopback stub judge with a fixed reply delay (no network, no key):

    python scripts/bench_judge.py --answers 200 --delay-ms 50 --concurrency 1 4 16 32

Prints a Markdown table: seconds, answers per second and speed-up over one request at a time. With the delay
standing for a real endpoint's latency, the speed-up is what `judge.concurrency` buys while the endpoint keeps up.
"""
from __future__ import annotations

import argparse
import os
import time

import pandas as pd

from ..testing.judge_stub import StubJudge
from .judge import Judge, judge_entries

KEY_ENV = "VISIONDROP_BENCH_JUDGE_KEY"


def measure(answers: int, delay_s: float, concurrency: list[int]) -> pd.DataFrame:
    """Seconds to judge `answers` entries at each concurrency (the first row is the baseline for the speed-up)."""
    os.environ.setdefault(KEY_ENV, "stub")  # the stub takes any key
    entries = [{"question": f"q{i}?", "answer": "yes", "pred": "yes"} for i in range(answers)]
    rows = []
    with StubJudge(delay_s=delay_s) as stub:
        for workers in concurrency:
            judge = Judge("stub-judge", stub.url, KEY_ENV, concurrency=workers)
            start = time.perf_counter()
            judged, stopped = judge_entries([dict(e) for e in entries], judge)
            seconds = time.perf_counter() - start
            if stopped is not None:
                raise RuntimeError(f"judging stopped at concurrency {workers}: {stopped}")
            rows.append({"concurrency": workers, "answers": len(judged), "seconds": seconds,
                         "answers/s": len(judged) / seconds, "peak in flight": stub.peak})
            stub.peak = 0
    table = pd.DataFrame(rows)
    table["speed-up"] = table.seconds.iloc[0] / table.seconds
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--answers", type=int, default=200)
    parser.add_argument("--delay-ms", type=float, default=50.0, help="the stub's reply delay per request")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    args = parser.parse_args(argv)
    table = measure(args.answers, args.delay_ms / 1000, args.concurrency)
    print(f"Judging {args.answers} answers on the loopback stub judge ({args.delay_ms:g} ms per reply):\n")
    print(table.round({"seconds": 2, "answers/s": 1, "speed-up": 1}).to_markdown(index=False))


if __name__ == "__main__":
    main()
