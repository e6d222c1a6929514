"""Run PruneVid's own first stage (`merge_frames_dynamic` of PLLaVA's projector and the module functions it calls,
unmodified) on random video features and save what it returns: the parity fixture of baselines/prunevid.py
(tests/test_video_methods.py).

    python make_fixture.py PATH/TO/prunevid_official.py fixture.pt

`prunevid_official.py` holds those functions lifted verbatim from the official `models/pllava/modeling_pllava.py`
(whose module imports PLLaVA's whole model code), the projector's three methods in a class with only `config`. Its
DPC-kNN adds `torch.rand(...) * 1e-6` to break density ties; as the reference prescribes, `torch.rand` returns zeros
here (the port adds no noise). Imports nothing of this project.
"""
import runpy
import sys
from types import SimpleNamespace

import torch



def scenes(frames: int, tokens: int, channels: int, cuts: list[int], change: float, generator) -> torch.Tensor:
    """Frames of a few scenes: each scene's frames repeat its first one up to `change` x noise, and a tenth of the
    places change on every frame (dynamic tokens)."""
    video = torch.empty(frames, tokens, channels)
    for start, end in zip([0, *cuts], [*cuts, frames]):
        scene = torch.randn(1, tokens, channels, generator=generator) + 2 * torch.randn(1, 1, channels, generator=generator)
        video[start:end] = scene + change * torch.randn(end - start, tokens, channels, generator=generator)
    moving = torch.rand(1, tokens, 1, generator=generator) < 0.1
    return torch.where(moving, torch.randn(frames, tokens, channels, generator=generator), video)


def main(path: str, out: str) -> None:
    official = SimpleNamespace(**runpy.run_path(path))  # the official file, run as it is
    generator = torch.Generator().manual_seed(0)
    draw, zeros = torch.rand, lambda *shape, **kwargs: torch.zeros(*shape, **kwargs)
    cases = []
    for frames, cuts, change, tau in [(16, [8], 0.05, 0.8), (16, [4, 8, 12], 0.05, 0.8), (16, [8], 0.02, 0.9),
                                      (16, [12], 0.05, 0.8), (8, [], 0.05, 0.8), (16, [5, 11], 0.1, 0.8)]:
        video = scenes(frames, 144, 8, cuts, change, generator)
        config = SimpleNamespace(num_frames=frames, pooling_shape=(frames, 12, 12), temporal_segment_ratio=0.25,
                                 cluster_ratio=0.5)
        torch.rand = zeros  # the official DPC-kNN's tie-breaking noise, zeroed
        features, static, dynamic, windows = official.Projector(config).merge_frames_dynamic(
            video.flatten(0, 1)[None], threshold=tau)
        torch.rand = draw
        cases.append({"features": video.flatten(0, 1), "frames": frames, "tau": tau, "merged": features[0],
                      "static_sizes": static, "dynamic_sizes": dynamic, "window_sizes": windows})
    torch.save({"cases": cases, "torch": str(torch.__version__)}, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
