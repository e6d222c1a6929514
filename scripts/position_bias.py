"""Build the positional-bias figure (heatmaps, methods x cuts) and table from the maps stored beside the records.

    python scripts/position_bias.py --model llava-1.5-7b --benchmark POPE --out results --name position_bias

Paths are taken from the working directory.
"""
import argparse

from visiondrop.harness.bias_report import bias_table, collect, plot_bias_maps, write_bias_table
from visiondrop.harness.store import ResultStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llava-1.5-7b", help="model name as in configs/model/*.yaml")
    parser.add_argument("--benchmark", default="POPE", help="benchmark name as in configs/benchmarks/*.yaml")
    parser.add_argument("--records", default="results/runs", help="the record store")
    parser.add_argument("--out", default="results")
    parser.add_argument("--name", default="position_bias")
    args = parser.parse_args()
    try:
        entries = collect(ResultStore(args.records).records(), args.model, args.benchmark)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    table = bias_table(entries)
    md, csv = write_bias_table(table, args.out, args.name, args.model, args.benchmark)
    png = plot_bias_maps(entries, f"{args.out}/{args.name}.png",
                         f"Where the kept visual tokens come from: {args.model} on {args.benchmark} "
                         f"({entries[0][1].cuts[next(iter(entries[0][1].cuts))].samples} samples per panel)")
    print(md.read_text())
    print(f"written: {md}, {csv}, {png}")


if __name__ == "__main__":
    main()
