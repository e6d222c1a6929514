"""Run VidCom2's own compression (`token_compressor/vidcom2/vidcom2.py`, unmodified) on random video features and
save what it keeps: the parity fixture of baselines/vidcom2.py (tests/test_video_methods.py).

    python make_fixture.py PATH/TO/token_compressor/vidcom2/vidcom2.py fixture.pt

Imports nothing of this project; vidcom2.py needs only torch. Per case and base scale: the indices of the tokens
its own steps keep (`select_low_var_channels`, `compute_gaussian_scores`, `compute_scales`,
`select_outlier_indices`, called as `vidcom2_compression` calls them), checked to be the rows `vidcom2_compression`
returns.
"""
import itertools
import runpy
import sys
from types import SimpleNamespace

import torch


def main(path: str, out: str) -> None:
    vidcom2 = SimpleNamespace(**runpy.run_path(path))  # the official file, run as it is
    generator = torch.Generator().manual_seed(0)
    cases = []
    for (model, frames, redundant) in itertools.product(("llava_ov", "qwen2_5_vl"), (1, 4, 8, 16), (False, True)):
        per_frame = 196 if model == "llava_ov" else 24
        feats = torch.randn(frames, per_frame, 8, generator=generator)
        if redundant:  # a still scene with one frame that differs: frame budgets then differ
            feats[1:] = feats[:1] + 0.05 * feats[1:]
            feats[frames // 2:frames // 2 + 1] = torch.randn(1, per_frame, 8, generator=generator)
        flat = feats.flatten(0, 1)
        kept = {}
        for base in (0.15, 0.25, 0.5):
            output = vidcom2.vidcom2_compression(flat, model=model, base_scale=base, frame_token_len=per_frame)
            selected = vidcom2.select_low_var_channels(flat)
            video, frame = vidcom2.compute_gaussian_scores(selected, per_frame)
            scales = vidcom2.compute_scales(-video.mean(dim=-1), base)
            indices = vidcom2.select_outlier_indices(video + frame, scales, per_frame)
            kept[base] = torch.cat([idx + f * per_frame for f, idx in enumerate(indices)])
            assert torch.equal(output, flat[kept[base]])  # the features it returns are these tokens
        cases.append({"model": model, "features": flat, "frames": frames, "kept": kept})
    torch.save({"cases": cases, "torch": str(torch.__version__)}, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
