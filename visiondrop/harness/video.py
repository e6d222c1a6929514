"""Decoding a video file into the frames a video model takes: PyAV, frames sampled uniformly over the whole clip."""
from __future__ import annotations

from pathlib import Path

import av
import numpy as np

FRAMES = 8  # Video-LLaVA's frames per video


def frame_indices(total: int, frames: int = FRAMES) -> np.ndarray:
    """`frames` indices spread evenly from the first frame to the last, as Video-LLaVA's own loader
    (np.linspace(0, total - 1, frames), truncated); a clip shorter than `frames` repeats frames."""
    if total < 1:
        raise ValueError("the video has no frames")
    return np.linspace(0, total - 1, frames).astype(int)


def read_frames(path: str | Path, frames: int = FRAMES) -> np.ndarray:
    """[frames, H, W, 3] uint8 RGB frames of the video at `path`, sampled uniformly (`frame_indices`).

    The clip is decoded once from the start (its container's frame count is not trusted: many files leave it 0).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video not found: {path}")
    with av.open(str(path)) as container:
        decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    return np.stack([decoded[i] for i in frame_indices(len(decoded), frames)])
