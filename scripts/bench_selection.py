"""CPU time of each method's own calls (its selection: `prepare`, `select_encoder`, `select_decoder`) during one pruned
prefill, on the tiny model of each family, as a table: to compare a selection's cost before and after a change.

    python scripts/bench_selection.py --methods cdpruner vscan hiprune --models llava-1.5-7b llava-next-7b

This process's CPU time (`measure_once(clock="process")`, one thread), the median of `--repeats` after two discarded
warm-ups, at each method's example budget and options; the speed of whole prefills is `make latency`'s.
"""
import argparse
import statistics

import torch

from visiondrop.efficiency.latency import build_model, make_inputs, measure_once
from visiondrop.families import checkpoint_config, info_of
from visiondrop.methods import METHODS, method

WARMUP = 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=[m for m in METHODS if m != "none"])
    parser.add_argument("--models", nargs="+", default=["llava-1.5-7b"], help="checkpoints, built at tiny width")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    print(f"| model | method | budget | selection CPU ms (batch {args.batch}, median of {args.repeats}) |")
    print("|---|---|---|---|")
    for name in args.models:
        config = checkpoint_config(name, "tiny")
        model = build_model(config, cpu, torch.float32)
        inputs = make_inputs(config, cpu, torch.float32, batch=args.batch)
        info = info_of(model)
        for m in args.methods:
            budget = method(m).example_budget * info.n_visual / 576
            try:
                times = [measure_once(model, inputs, m, budget, new_tokens=0, clock="process")["overhead"]
                         for _ in range(WARMUP + args.repeats)][WARMUP:]
            except (ValueError, NotImplementedError) as refusal:  # e.g. a video method on an image
                print(f"| {name} | {m} | {budget:g} | refused: {str(refusal).splitlines()[0]} |", flush=True)
                continue
            print(f"| {name} | {m} | {budget:g} | {statistics.median(times):.2f} |", flush=True)


if __name__ == "__main__":
    main()
