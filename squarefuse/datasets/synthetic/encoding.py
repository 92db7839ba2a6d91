"""`write_video`: encode frames to a video file with PyAV, atomically.

Every writer of video files (the synthetic dataset, the preparation scripts, the benchmarks, the
tests) goes through it: the file is written under a temporary name in the target's folder and
renamed when complete, so an interrupted run never leaves a half-written video under the real name.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from squarefuse.runtime.atomic_file import new_temp_file

__all__ = ["write_video"]


def write_video(
    path: str | Path,
    frames: Iterable[np.ndarray | av.VideoFrame],
    fps: int | Fraction,
    codec: str,
    *,
    options: Mapping[str, str] | None = None,
    container_format: str | None = None,
    container_options: Mapping[str, str] | None = None,
    threads: int | None = None,
) -> Path:
    """Encode `frames` to `path` (yuv420p), written under a temporary name and renamed when done.

    Frames are timed at the constant rate `fps`, whatever timestamps decoded frames carried. The
    frame size is the first frame's; `frames` may be a generator (e.g. frames decoded from another
    video), and an exception it raises leaves nothing behind.

    Args:
        path: the video to write; its folder is created if needed.
        frames: uint8 RGB arrays [H, W, 3], or PyAV frames (e.g. already resized).
        fps: frame rate.
        codec: FFmpeg encoder, e.g. "libx264" or "libvpx-vp9".
        options: encoder options (crf, preset, g...).
        container_format: the muxer ("mp4", "webm"...); None guesses it from the file extension.
        container_options: muxer options, e.g. {"movflags": "faststart"} or {"fflags": "+bitexact"}.
        threads: encoder threads; None keeps PyAV's default, 1 makes libx264/libvpx deterministic.

    Returns:
        `path`.

    Raises:
        ValueError: `frames` is empty.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder, so the rename is atomic; same extension, so PyAV can guess the container.
    handle, partial_name = new_temp_file(path.with_name(path.stem), suffix=f".partial{path.suffix}")
    os.close(handle)
    partial = Path(partial_name)
    try:
        with av.open(str(partial), mode="w", format=container_format, options=dict(container_options or {})) as out:
            stream = out.add_stream(codec, rate=fps)
            stream.pix_fmt = "yuv420p"
            stream.options = dict(options or {})
            if threads is not None:
                stream.thread_count = threads
            time_base = 1 / Fraction(fps)
            count = 0
            for frame in frames:
                if isinstance(frame, np.ndarray):
                    frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
                else:
                    # Decoded frames carry their source's timestamps and time base; PyAV would
                    # rescale its frame counter by that time base, so set both explicitly.
                    frame.pts, frame.time_base = count, time_base
                if count == 0:
                    stream.width, stream.height = frame.width, frame.height
                for packet in stream.encode(frame):
                    out.mux(packet)
                count += 1
            if count == 0:
                raise ValueError(f"{path}: no frames to write")
            for packet in stream.encode():
                out.mux(packet)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path
