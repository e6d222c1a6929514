"""Run vLLM's own EVS function (`vllm/multimodal/evs.py::compute_retention_mask`, unmodified) on random video
embeddings and save its masks: the parity fixture of baselines/evs.py (tests/test_video_methods.py).

    python make_fixture.py PATH/TO/vllm/multimodal/evs.py fixture.pt

Imports nothing of this project; evs.py needs only torch. Cases: frames T in {1, 4, 16}, spatial merge m in {1, 2},
pruning rates q in {0.25, 0.5, 0.75, 0.9}, float32 and bfloat16, and clips whose frames repeat exactly (ties in
the dissimilarity: the stable sort decides).
"""
import itertools
import runpy
import sys
from types import SimpleNamespace

import torch


def main(evs_path: str, out: str) -> None:
    evs = SimpleNamespace(**runpy.run_path(evs_path))  # the official file, run as it is
    generator = torch.Generator().manual_seed(0)
    cases = []
    for (t, m, q, dtype, repeated) in itertools.product((1, 4, 16), (1, 2), (0.25, 0.5, 0.75, 0.9),
                                                        (torch.float32, torch.bfloat16), (False, True)):
        h, w = 6 * m, 4 * m  # patch rows and columns: 24 tokens a frame after the merge
        embeds = torch.randn(t, h * w // (m * m), 8, generator=generator)
        if repeated:  # every other frame repeats the one before it, and a block of tokens never changes
            embeds[1::2] = embeds[0:-1:2][: embeds[1::2].shape[0]]
            embeds[:, :5] = embeds[:1, :5]
        embeds = embeds.flatten(0, 1).to(dtype)
        mask = evs.compute_retention_mask(embeds, (t, h, w), m, q)
        cases.append({"embeds": embeds, "thw": (t, h, w), "merge": m, "q": q, "mask": mask})
    torch.save({"cases": cases, "torch": str(torch.__version__)}, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
