"""Build the paper-style table (Markdown + CSV) and the score-versus-tokens plot from the result records.

    python scripts/make_table.py --model llava-1.5-7b --out results --name table1

Paths are taken from the working directory.
"""
import argparse

from visiondrop.harness.store import ResultStore
from visiondrop.harness.tables import build_table, plot_scores, write_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llava-1.5-7b", help="model name as in configs/model/*.yaml")
    parser.add_argument("--records", default="results/runs", help="the record store")
    parser.add_argument("--paper", default="results/paper/paper_tables.csv")
    parser.add_argument("--out", default="results")
    parser.add_argument("--name", default="table1")
    args = parser.parse_args()
    records = ResultStore(args.records).frame()
    if records.empty:
        raise SystemExit(f"no records under {args.records}: run scripts/run.py first")
    try:
        table, note = build_table(records, args.paper, args.model)
    except ValueError as err:  # e.g. no records for this model: the message names the models that have some
        raise SystemExit(str(err)) from None
    md, csv = write_table(table, note, args.out, args.name)
    png = plot_scores(table, f"{args.out}/{args.name}.png")
    print(md.read_text())
    print(f"written: {md}, {csv}, {png}")


if __name__ == "__main__":
    main()
