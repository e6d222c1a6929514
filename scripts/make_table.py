"""Build a table (Markdown + CSV) from the result records, beside the paper's numbers or claims.

    python scripts/make_table.py --model llava-1.5-7b --out results --name table1     # + the score-vs-tokens plot
    python scripts/make_table.py --experiment controlled_study --model llava-1.5-7b --out results
    python scripts/make_table.py --experiment ablations --model demo-llava-1.5 --out results/demo

Paths are taken from the working directory.
"""
import argparse

from visiondrop.harness import studies
from visiondrop.harness.store import ResultStore
from visiondrop.harness.tables import build_table, plot_scores, write_flat, write_table

STUDIES = {"controlled_study": studies.controlled_study, "ablations": studies.ablations}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", choices=["table1", *STUDIES], default="table1",
                        help="table1: the paper-style table of every method and budget; or one study's table")
    parser.add_argument("--model", default="llava-1.5-7b", help="model name as in configs/model/*.yaml")
    parser.add_argument("--records", default="results/runs", help="the record store")
    parser.add_argument("--paper", default="results/paper/paper_tables.csv")
    parser.add_argument("--out", default="results")
    parser.add_argument("--name", default=None, help="file name (default: table1, or the experiment's name)")
    args = parser.parse_args()
    name = args.name or args.experiment
    records = ResultStore(args.records).frame()
    if records.empty:
        raise SystemExit(f"no records under {args.records}: run scripts/run.py first")
    try:
        if args.experiment == "table1":
            table, note = build_table(records, args.paper, args.model)
        else:
            table, note = STUDIES[args.experiment](records, args.paper, args.model)
    except ValueError as err:  # e.g. no records for this model: the message names the models that have some
        raise SystemExit(str(err)) from None
    if args.experiment == "table1":
        md, csv = write_table(table, note, args.out, name)
        written = [md, csv, plot_scores(table, f"{args.out}/{name}.png")]
    else:
        written = list(write_flat(table, note, args.out, name))
    print(written[0].read_text())
    print(f"written: {', '.join(map(str, written))}")


if __name__ == "__main__":
    main()
