"""Judging throughput by concurrency on a loopback stub judge: `python scripts/bench_judge.py` (see
visiondrop/harness/judge_bench.py)."""
from visiondrop.harness.judge_bench import main

if __name__ == "__main__":
    main()
