"""Train the demo LLaVA-1.5 model on the synthetic shapes benchmark (2-core CPU, about 40 minutes) and save it.

    python scripts/train_demo_model.py --out visiondrop/harness/assets/demo_model
"""
import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(var, "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from visiondrop.demo.training import Recipe, train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="visiondrop/harness/assets/demo_model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tower-state", default=None, help="keep/reuse the stage-1 tower in this file")
    parser.add_argument("--tower-only", action="store_true", help="run stage 1 only (needs --tower-state)")
    for f in dataclasses.fields(Recipe):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = Recipe(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe)})
    print(json.dumps(dataclasses.asdict(recipe)), flush=True)
    metrics = train(recipe, None if args.tower_only else args.out, log=lambda m: print(m, flush=True),
                    tower_state=args.tower_state)
    print(json.dumps(metrics, indent=2), flush=True)


if __name__ == "__main__":
    main()
