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

    The clip is decoded twice from the start: once to count its frames (its container's count is not trusted: many
    files leave it 0), then up to the last sampled frame, converting only the sampled ones, so that memory holds
    `frames` images whatever the length (LongVideoBench's videos last up to an hour).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video not found: {path}")
    with av.open(str(path)) as container:
        total = sum(1 for _ in container.decode(video=0))
    wanted = frame_indices(total, frames).tolist()
    kept, last = {}, wanted[-1]
    with av.open(str(path)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index in wanted:
                kept[index] = frame.to_ndarray(format="rgb24")
            if index == last:
                break
    return np.stack([kept[i] for i in wanted])
