"""Short synthetic videos written to disk as real video files (PyAV, MPEG-4 in .mp4), for tests and demos."""
from __future__ import annotations

from pathlib import Path

import av
import numpy as np

from .tiny import demo_image


def write_video(path: str | Path, frames: np.ndarray, fps: int = 8) -> Path:
    """Encode frames [T, H, W, 3] uint8 (H and W even) into `path`; returns it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"qscale": "2"}  # near-lossless: decoded frames stay close to the written ones
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())
    return path


def demo_frames(seed: int, length: int = 24, size: tuple[int, int] = (256, 192)) -> np.ndarray:
    """[length, H, W, 3] frames: a random demo image (width, height = `size`) that slides sideways, with frame t's
    index written as the brightness of a 16-pixel band at the top (t * 10), so a decoder's sampling can be read."""
    base = np.array(demo_image(seed, size))
    frames = np.stack([np.roll(base, 4 * t, axis=1) for t in range(length)])
    frames[:, :16] = (np.arange(length) * 10).reshape(-1, 1, 1, 1).clip(0, 255).astype(np.uint8)
    return frames


def write_demo_video(path: str | Path, seed: int, length: int = 24, size: tuple[int, int] = (256, 192)) -> Path:
    """A synthetic clip of `length` frames (`demo_frames`) at `path`."""
    return write_video(path, demo_frames(seed, length, size))


def frame_number(frame: np.ndarray) -> int:
    """The index `demo_frames` wrote into a (decoded) frame."""
    return int(round(float(frame[2:14, 8:-8].mean()) / 10))
