"""Run DyCoke's own temporal token merging (`dycole_ttm` of `llava/model/llava_arch.py`, unmodified) on random video
features and save which tokens it keeps, in its output order: the parity fixture of baselines/dycoke.py
(tests/test_video_methods.py).

    python make_fixture.py PATH/TO/dycole_ttm.py fixture.pt

`dycole_ttm.py` is the function's source lifted verbatim from the official file (whose module imports the whole
LLaVA-NeXT package), with the `import torch` it uses. Imports nothing of this project. The features' rows are all
distinct, so each output row names the input token it is.
"""
import runpy
import sys
from types import SimpleNamespace

import torch


def main(path: str, out: str) -> None:
    dycoke = SimpleNamespace(**runpy.run_path(path))  # the official file, run as it is
    generator = torch.Generator().manual_seed(0)
    cases = []
    shapes = [(8, 196), (32, 196), (5, 24), (6, 24), (7, 24), (8, 24), (9, 24), (16, 24)]
    for frames, per_frame in shapes:
        flat = torch.randn(frames * per_frame, 8, generator=generator)
        kept = {}
        for k in (0.7, 0.5, 0.3):
            output = dycoke.dycole_ttm(flat, num_tokens_per_frame=per_frame, merging_ratio=k)
            match = (output[:, None, :] == flat[None]).all(-1)
            assert bool((match.sum(1) == 1).all())
            kept[k] = match.float().argmax(1)
        cases.append({"features": flat, "frames": frames, "kept": kept})
    for frames in (2, 4):  # four frames or fewer: the official function fails
        try:
            dycoke.dycole_ttm(torch.randn(frames * 24, 8, generator=generator), num_tokens_per_frame=24)
        except RuntimeError as error:
            cases.append({"frames": frames, "error": str(error)})
    torch.save({"cases": cases, "torch": str(torch.__version__)}, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
