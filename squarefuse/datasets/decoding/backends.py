"""Video decoding backends (decord, PyAV, torchcodec) that return uint8 RGB frames as numpy arrays.

They run in the guarded decoding process (server.py) or in the calling process
(`squarefuse.datasets.decoding.video_reader.open_video` without a timeout). This module imports neither
torch nor the rest of the package at module level; torchcodec loads torch when it is used.

All backends number frames the same way: frame ``i`` is the ``i``-th frame in presentation order
among the video stream's packets, which is what ``len(decord.VideoReader)`` counts. All apply the
container's display rotation (a phone video filmed upright decodes upright, as FFmpeg's own
tools show it; decord and torchcodec do it themselves, PyAV's frames are turned here). Without
decode-time resize they return the same RGB pixels for the same indices (``tests/test_decoders.py``
checks it on H.264, VP9 and rotated H.264).

Decode-time resize (``short_side``): a video whose short side is more than `RESIZE_MIN_RATIO`
times ``short_side`` is scaled while decoding so that its short side becomes ``short_side``,
aspect ratio kept: inside the decoder's YUV->RGB conversion for decord (its width/height) and
PyAV (swscale), right after decoding for torchcodec (see `TorchCodecBackend`). It saves the RGB
conversion of full frames, the resize in the worker, and the copy of full frames out of the
decoding process; decoding itself, most of the cost of a 720p clip, is unchanged
(``scripts/benchmark_loader.py --decoders`` measures it). The scalers differ slightly, so
resized frames are close across backends but not identical.
"""

from __future__ import annotations

import bisect
import importlib
import os
from typing import Protocol

import numpy as np

from squarefuse.runtime.memory_limit import explain_memory_limit

__all__ = [
    "BACKENDS",
    "RESIZE_MIN_RATIO",
    "Backend",
    "DecordBackend",
    "PyAVBackend",
    "TorchCodecBackend",
    "decode_size",
    "describe_error",
    "load_libraries",
    "open_backend",
]

# Scale at decode only when the stored short side exceeds the wanted one by this factor: a video
# stored near the size it is used at (K400 prepared at short side 320 for 256) is not resampled twice.
RESIZE_MIN_RATIO = 1.25


def decode_size(height: int, width: int, short_side: int | None) -> tuple[int, int] | None:
    """The (height, width) to decode a ``height x width`` video at, or None to decode it as stored.

    Args:
        height, width: the stored frame size (either orientation: the result follows it).
        short_side: the short side the frames are used at; None = never resize.
    """
    if not short_side or min(height, width) <= RESIZE_MIN_RATIO * short_side:
        return None
    scale = short_side / min(height, width)
    if height <= width:
        return short_side, max(short_side, round(width * scale))
    return max(short_side, round(height * scale)), short_side


class Backend(Protocol):
    """What every backend provides; `read` takes sorted, unique, in-range indices."""

    num_frames: int
    fps: float

    def frame_size(self) -> tuple[int, int]: ...

    def read(self, indices: list[int]) -> np.ndarray: ...

    def close(self) -> None: ...


class DecordBackend:
    """decord.VideoReader on the CPU with a fixed number of decoding threads.

    Args:
        path: the video file.
        num_threads: decoding threads (1 inside DataLoader workers: the workers are the parallelism).
        short_side: decode-time resize (see the module docstring); None = as stored.
    """

    def __init__(self, path: str, *, num_threads: int = 1, short_side: int | None = None) -> None:
        # decord is imported here, never at module level: the parent process imports torch first
        # (decord's bundled libraries must load after torch's), and the PyAV path never needs it.
        import decord  # noqa: PLC0415

        size = _displayed_decode_size(path, short_side) if short_side else None
        height, width = size if size is not None else (-1, -1)
        if size is not None:
            width = _decord_safe_width(width)
        self._reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=num_threads, width=width, height=height)
        self.num_frames = len(self._reader)
        self.fps = float(self._reader.get_avg_fps())

    def frame_size(self) -> tuple[int, int]:
        height, width = self._reader[0].shape[:2]
        self._reader.seek(0)
        return int(height), int(width)

    def read(self, indices: list[int]) -> np.ndarray:
        # `.asnumpy()` rather than decord.bridge: set_bridge is per thread and DataLoader workers
        # may decode on threads that never saw it.
        frames = self._reader.get_batch(indices).asnumpy()
        # Without a seek back to the start decord keeps decoder state for every video it has read
        # and memory grows over thousands of videos.
        self._reader.seek(0)
        return frames

    def close(self) -> None:
        self._reader = None


def _displayed_decode_size(path: str, short_side: int) -> tuple[int, int] | None:
    """`decode_size` of a video as displayed (decord's width/height apply after its rotation).

    PyAV reads the stored size from the header; only a video that will be resized has its first
    frame decoded, for the display rotation that FFmpeg attaches to decoded frames.
    """
    import av  # noqa: PLC0415

    with av.open(path) as container:
        if not container.streams.video:
            return None  # decord names the problem itself
        stream = container.streams.video[0]
        size = decode_size(stream.codec_context.height, stream.codec_context.width, short_side)
        if size is None:
            return None
        first = next(container.decode(stream), None)
        if first is not None and _quarter_turns(first) % 2:
            size = size[::-1]
        return size


def _decord_safe_width(width: int) -> int:
    """The width nearest `width` whose RGB rows decord 0.6.0 copies correctly.

    decord's scaled (and rotated) output comes from FFmpeg frames whose rows are padded to 32
    bytes; when the padded row length is a whole multiple of the width other than 3, decord takes
    it for the channel count and the copy fails ("DECORDArrayCopyFromTo: The size must exactly
    match"), e.g. for widths 16, 24, 48, 72. Measured for widths 10..419: the rule below predicts
    every failure. A width one or two pixels off changes the aspect ratio by well under 1 %.
    """

    def padded_row(w: int) -> int:  # av_frame_get_buffer(frame, 32) for rgb24
        align = 1
        while align <= 32:
            row = 3 * -(-w // align) * align
            if row % 32 == 0:
                return row
            align *= 2
        return row

    def safe(w: int) -> bool:
        row = padded_row(w)
        return row == 3 * w or row % w != 0

    for delta in range(0, 8):
        for w in (width + delta, width - delta):
            if w > 0 and safe(w):
                return w
    return width


class PyAVBackend:
    """PyAV (FFmpeg) decoding with frame indices that match decord's.

    Opening demuxes the whole stream once (no decoding) to index the packets: their presentation
    timestamps sorted give frame ``i``'s pts, keyframes tell where a seek can land. `read` seeks to
    the keyframe before the first wanted frame and decodes forward to the last one. A file with
    fewer packets than its container's index lists (a truncated mp4) is an error, as it is for
    decord; a truncated webm (no index) reads as the shorter video it still holds, with both.

    A container may announce more frames than it holds (decord's ``len`` can over-count): a wanted
    index past the last frame that really decodes gets that last frame, so callers always receive
    as many frames as they asked for; a video that yields no wanted frame at all is an error.

    FFmpeg attaches the container's display matrix to every decoded frame (`VideoFrame.rotation`,
    counter-clockwise degrees); frames are turned by it here, after any resize.

    Args:
        path: the video file.
        num_threads: FFmpeg decoding threads.
        short_side: decode-time resize (see the module docstring); None = as stored.
    """

    def __init__(self, path: str, *, num_threads: int = 1, short_side: int | None = None) -> None:
        import av  # noqa: PLC0415
        from av.video.reformatter import VideoReformatter  # noqa: PLC0415

        self._short_side = short_side
        # This reader's own RGB converter, with `num_threads` scaling threads. `VideoFrame.to_ndarray`
        # would use PyAV's per-thread one (PyAV 18), which keeps FFmpeg's scaling threads (one
        # per core) alive for the life of the thread: a process that decoded a video in its main
        # thread and then forked a DataLoader worker gave the worker a converter whose threads do
        # not exist there, and the worker's first conversion waited for them forever.
        self._num_threads = max(1, num_threads)
        self._reformatter = VideoReformatter()

        self._container = av.open(path)
        if not self._container.streams.video:
            self._container.close()
            raise ValueError("the file has no video stream")
        self._stream = self._container.streams.video[0]
        self._stream.codec_context.thread_count = self._num_threads
        pts: list[int] = []
        key_pts: list[int] = []
        num_packets = 0
        for packet in self._container.demux(self._stream):
            if packet.size == 0:  # the empty packet that flushes the decoder at the end
                continue
            num_packets += 1
            if packet.pts is not None:
                pts.append(packet.pts)
                if packet.is_keyframe:
                    key_pts.append(packet.pts)
        declared = self._stream.frames  # the container's own count (mp4 index); 0 when unknown
        if num_packets < declared:
            self._container.close()
            raise ValueError(f"truncated file: the container lists {declared} frames but holds {num_packets}")
        has_missing_pts = len(pts) < num_packets
        self._frame_pts = sorted(pts)
        self._key_pts = sorted(key_pts)
        self._pts_to_index = {p: i for i, p in enumerate(self._frame_pts)}
        # Without timestamps frames can only be counted from the start; seeking is not safe.
        self._can_seek = not has_missing_pts and len(self._pts_to_index) == len(self._frame_pts)
        self.num_frames = self._count_decoded_frames() if has_missing_pts else len(self._frame_pts)
        rate = self._stream.average_rate or self._stream.guessed_rate
        self.fps = float(rate) if rate else 0.0

    def frame_size(self) -> tuple[int, int]:
        # The first frame's size after resize and rotation (the stream's own size is before both).
        height, width = self.read([0]).shape[1:3]
        return int(height), int(width)

    def _to_rgb(self, frame) -> np.ndarray:
        size = decode_size(frame.height, frame.width, self._short_side)
        resize = {} if size is None else {"width": size[1], "height": size[0], "interpolation": "BICUBIC"}
        rgb = self._reformatter.reformat(frame, format="rgb24", threads=self._num_threads, **resize).to_ndarray()
        turns = _quarter_turns(frame)
        return np.ascontiguousarray(np.rot90(rgb, k=turns)) if turns else rgb

    def _count_decoded_frames(self) -> int:
        self._container.seek(0)
        return sum(1 for _ in self._container.decode(self._stream))

    def read(self, indices: list[int]) -> np.ndarray:
        wanted = set(indices)
        last_wanted = indices[-1]
        start_index = 0
        if self._can_seek:
            # The last keyframe at or before the first wanted frame: decoding starts there.
            k = bisect.bisect_right(self._key_pts, self._frame_pts[indices[0]]) - 1
            if k >= 0:
                self._container.seek(self._key_pts[k], stream=self._stream, backward=True, any_frame=False)
                start_index = self._pts_to_index[self._key_pts[k]]
            else:
                self._container.seek(self._frame_pts[0], stream=self._stream, backward=True, any_frame=False)
        else:
            self._container.seek(0)
        frames: dict[int, np.ndarray] = {}
        last_frame, last_index = None, -1
        position = start_index
        decoded = self._container.decode(self._stream)
        try:
            for frame in decoded:
                # Frames are identified by pts where the index knows it, else counted on.
                index = self._pts_to_index.get(frame.pts, position) if self._can_seek else position
                position = index + 1
                if index < start_index:  # a leading frame of an open GOP, before the seek target
                    continue
                if index in wanted:
                    frames[index] = self._to_rgb(frame)
                last_frame, last_index = frame, index
                if index >= last_wanted:
                    break
        finally:
            decoded.close()  # a generator left suspended keeps FFmpeg's frame buffers alive
        missing = [i for i in indices if i not in frames]
        if missing:
            if last_frame is None:
                raise RuntimeError(f"no frame decoded from frame {start_index} on (of {self.num_frames} listed)")
            if missing[0] < last_index:
                raise RuntimeError(f"frames {missing[:8]} were skipped by the decoder")
            # Past the real end of the stream: clamp to the last frame that decoded.
            tail = frames[last_index] if last_index in frames else self._to_rgb(last_frame)
            for i in missing:
                frames[i] = tail
        return np.stack([frames[i] for i in indices])

    def close(self) -> None:
        self._container.close()


def _quarter_turns(frame) -> int:
    """Counter-clockwise quarter turns that display a decoded PyAV frame upright (0..3)."""
    return round((frame.rotation or 0) / 90) % 4


class TorchCodecBackend:
    """torchcodec's VideoDecoder (the PyTorch team's FFmpeg decoder) on the CPU.

    ``seek_mode="exact"`` scans the packets once at open, so frame ``i`` and the frame count are
    those of decord and PyAV. torchcodec applies the display rotation itself. With ``short_side``
    the frames are resized right after decoding with torchvision's antialiased resize, not with
    torchcodec's own `Resize` transform: on a 720p H.264 clip (16 frames at stride 4, one thread)
    the transform took 1.51 s per clip against 1.11 s for decoding + torchvision's resize
    (decoding alone: 0.85 s; torchcodec 0.17).

    Args:
        path: the video file.
        num_threads: FFmpeg decoding threads.
        short_side: decode-time resize (see the module docstring); None = as stored.
    """

    def __init__(self, path: str, *, num_threads: int = 1, short_side: int | None = None) -> None:
        from torchcodec.decoders import VideoDecoder  # noqa: PLC0415 - optional, loads torch and FFmpeg

        self._decoder = VideoDecoder(path, dimension_order="NCHW", num_ffmpeg_threads=num_threads, seek_mode="exact")
        metadata = self._decoder.metadata
        # The header's size is the displayed one (after rotation), as the decoded frames are.
        self._size = decode_size(int(metadata.height), int(metadata.width), short_side)
        self.num_frames = int(metadata.num_frames or 0)
        # The header's rate, as decord and PyAV report it (the rate measured from the packets differs a little).
        self.fps = float(metadata.average_fps_from_header or metadata.average_fps or 0.0)

    def frame_size(self) -> tuple[int, int]:
        if self._size is not None:
            return self._size
        metadata = self._decoder.metadata
        return int(metadata.height), int(metadata.width)

    def read(self, indices: list[int]) -> np.ndarray:
        frames_NCHW = self._decoder.get_frames_at(indices).data
        if self._size is not None:
            from torchvision.transforms.v2 import functional as F  # noqa: PLC0415 - torch is loaded by now

            frames_NCHW = F.resize(frames_NCHW, list(self._size), antialias=True)
        return frames_NCHW.permute(0, 2, 3, 1).numpy()

    def close(self) -> None:
        self._decoder = None


BACKENDS = {"decord": DecordBackend, "pyav": PyAVBackend, "torchcodec": TorchCodecBackend}
# The modules each backend imports when it opens a video (decord reads the rotation with PyAV).
_LIBRARIES = {"decord": ("decord", "av"), "pyav": ("av",), "torchcodec": ("torchcodec.decoders",)}


def load_libraries(decoder: str) -> None:
    """Import the libraries of the backend named `decoder`, so that opening a video does not."""
    if decoder not in BACKENDS:
        raise ValueError(f"unknown decoder {decoder!r}: choose one of {sorted(BACKENDS)}")
    for module in _LIBRARIES[decoder]:
        importlib.import_module(module)


def open_backend(path: str, decoder: str, *, num_threads: int = 1, short_side: int | None = None) -> Backend:
    """Open `path` with the backend named `decoder` ("decord", "pyav" or "torchcodec")."""
    if decoder not in BACKENDS:
        raise ValueError(f"unknown decoder {decoder!r}: choose one of {sorted(BACKENDS)}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    return BACKENDS[decoder](path, num_threads=num_threads, short_side=short_side)


def describe_error(e: BaseException) -> str:
    """One line for a decoder exception (decord's messages carry a C++ stack trace below it)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {explain_memory_limit(lines[0][:300]) if lines else ''}"
