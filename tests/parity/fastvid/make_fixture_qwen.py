"""Run FastVID's own Qwen2.5-VL pruning (its block of `Qwen2_5_VLForConditionalGeneration.forward`, lifted verbatim
into a function of what it reads: `fastvid_qwen.py`) on random video embeddings and save what it keeps: the parity
fixture of baselines/fastvid.py's `variant="qwen2_5_vl"` (tests/test_fastvid.py).

    python make_fixture_qwen.py PATH/TO/fastvid_qwen.py fixture_qwen.pt

Imports nothing of this project. Its DPC-kNN tie-breaking noise (`torch.rand`) is zeroed. Per video and setting: the
kept video tokens' original indices and their hidden states (anchors merged), in order; the text around the video is
checked here to pass unchanged, with its own positions.
"""
import itertools
import runpy
import sys
from types import SimpleNamespace

import torch

TEXT_BEFORE, TEXT_AFTER, WIDTH = 4, 6, 16
VIDEOS = [(16, 8, 8, 4), (12, 6, 6, 3), (8, 4, 4, 8), (20, 4, 6, 5)]  # grids, merged rows, merged columns, scenes
#: (retention, DTM_p, DTM_beta) at DySeg_c 8, tau 0.84, DySeg_ignore 0.95, STPrune_d 0.4 (its eval.sh)
SETTINGS = [*itertools.product((0.27, 0.1, 0.5), (1, 2, 4), (0.6,)), (0.27, 4, 0.2)]


def frame_features(frames: int, scenes: int, generator: torch.Generator) -> torch.Tensor:
    """Scenes of frames that are alike (cosine near 0.99) or less so (near 0.9): segments, then sub-segments."""
    scene = torch.randint(0, scenes, (frames,), generator=generator).sort().values
    centres = torch.randn(scenes, 24, generator=generator)
    noise = torch.where(torch.rand(frames, 1, generator=generator) < 0.5, 0.05, 0.35)
    return centres[scene] + noise * torch.randn(frames, 24, generator=generator)


def main(path: str, out: str) -> None:
    prune = runpy.run_path(path)["fastvid_qwen"]  # the official block, as it is
    generator = torch.Generator().manual_seed(0)
    rand = torch.rand
    cases, raised = [], 0
    try:
        for frames, rows, cols, scenes in VIDEOS:
            per_frame = rows * cols
            video = torch.randn(frames * per_frame, WIDTH, generator=generator)
            before = torch.randn(TEXT_BEFORE, WIDTH, generator=generator)
            after = torch.randn(TEXT_AFTER, WIDTH, generator=generator)
            embeds = torch.cat([before, video, after])[None]
            attention = torch.rand(frames, per_frame, generator=generator).softmax(-1)
            features = frame_features(frames, scenes, generator)
            length = embeds.shape[1]
            kept = []
            torch.rand = lambda *args, **kwargs: torch.zeros(*args, **{k: v for k, v in kwargs.items()
                                                                         if k != "generator"})
            for share, stride, beta in SETTINGS:
                settings = SimpleNamespace(fastvid_retention_ratio=share, fastvid_DySeg_c=8, fastvid_DySeg_tau=0.84,
                                           fastvid_DySeg_ignore=0.95, fastvid_STPrune_d=0.4, fastvid_DTM_p=stride,
                                           fastvid_DTM_beta=beta)
                positions = torch.arange(length).view(1, 1, -1).expand(3, 1, -1)
                try:
                    hidden, _, keep = prune(settings, embeds, torch.tensor([[frames, 2 * rows, 2 * cols]]),
                                            TEXT_BEFORE, frames * per_frame, attention, features.clone(), positions,
                                            torch.ones(1, length, dtype=torch.long), torch.arange(length))
                except (RuntimeError, IndexError, ValueError):  # a setting its code fails on (no salient token)
                    raised += 1
                    continue
                hidden = hidden[0]
                assert torch.equal(keep[:TEXT_BEFORE], torch.arange(TEXT_BEFORE))
                assert torch.equal(hidden[:TEXT_BEFORE], before) and torch.equal(hidden[-TEXT_AFTER:], after)
                assert torch.equal(keep[-TEXT_AFTER:], torch.arange(length - TEXT_AFTER, length))
                kept.append({"share": share, "segments": 8, "tau": 0.84, "ignore": 0.95, "context_share": 0.4,
                             "stride": stride, "beta": beta, "keep": keep[TEXT_BEFORE:-TEXT_AFTER] - TEXT_BEFORE,
                             "tokens": hidden[TEXT_BEFORE:-TEXT_AFTER].clone()})
            torch.rand = rand
            cases.append({"video": video.view(frames, per_frame, WIDTH), "attention": attention,
                          "features": features, "kept": kept})
    finally:
        torch.rand = rand
    torch.save({"cases": cases, "raised": raised, "torch": str(torch.__version__)}, out)
    print(f"{sum(len(c['kept']) for c in cases)} runs, {raised} raised")


if __name__ == "__main__":
    main(*sys.argv[1:])
