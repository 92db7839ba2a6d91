"""Tiny real video files written with PyAV (H.264 mp4 and VP9 webm).

    def test_x(make_video, tmp_path):
        path = make_video(tmp_path / "a.mp4", num_frames=20, width=64, height=48)

Every frame carries three readable signals (they survive yuv420 compression within a few levels):
    red   = a left-to-right ramp (0 at the left edge, 255 at the right): tells a horizontal flip;
    green = a level that encodes the frame index, `frame_level(t)`: tells which frame was decoded;
    blue  = a top-to-bottom ramp: tells a vertical flip or crop position.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from squarefuse.datasets.synthetic.encoding import write_video as encode_video

CODECS = {".mp4": "libx264", ".webm": "libvpx-vp9", ".mkv": "libx264"}


def frame_level(t: int) -> int:
    """The green level of frame t (wraps every 28 frames so it stays in 20..236)."""
    return 20 + 8 * (t % 28)


def video_frames(num_frames: int, width: int, height: int) -> np.ndarray:
    """The test pattern as uint8 [T,H,W,3]."""
    x_ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, 0)
    y_ramp = np.linspace(0, 255, height, dtype=np.float32)[:, None].repeat(width, 1)
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for t in range(num_frames):
        frames[t, ..., 0] = x_ramp.astype(np.uint8)
        frames[t, ..., 1] = frame_level(t)
        frames[t, ..., 2] = y_ramp.astype(np.uint8)
    return frames


def write_video(
    path: str | Path,
    *,
    frames: np.ndarray | None = None,
    num_frames: int = 20,
    width: int = 64,
    height: int = 48,
    fps: int = 12,
    faststart: bool = False,
) -> Path:
    """Encode `frames` (default: the test pattern) to `path`; the codec follows the extension.

    Args:
        path: .mp4 / .mkv (H.264) or .webm (VP9).
        frames: uint8 [T,H,W,3] to encode instead of the pattern.
        num_frames, width, height: size of the default pattern; fps: the frame rate.
        faststart: mp4 only: index (moov) at the front, as streaming copies of K400 have it.
    """
    codec = CODECS[Path(path).suffix]
    if frames is None:
        frames = video_frames(num_frames, width, height)
    if codec == "libx264":
        options = {"crf": "12", "preset": "ultrafast", "g": "8"}
    else:
        options = {"crf": "10", "b:v": "0", "deadline": "realtime", "cpu-used": "8", "g": "8"}
    container_options = {"movflags": "faststart"} if faststart else {}
    return encode_video(path, frames, fps, codec, options=options, container_options=container_options)
