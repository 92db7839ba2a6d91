"""Video decoding backends (decord, PyAV) on numpy, and the loop that serves them in a child process.

This module imports neither torch nor the rest of the package, so that it can run as the small
decoding process started by :mod:`squarefuse.datasets.video_reader` (``python decode_backends.py FD PARENT_PID``):
a decoder that hangs there (decord can spin forever in C holding the GIL) is killed from outside
without taking the DataLoader worker down with it.

Both backends number frames the same way: frame ``i`` is the ``i``-th frame in presentation order
among the video stream's packets, which is what ``len(decord.VideoReader)`` counts. They return
the same RGB pixels for the same indices (``tests/test_decoders.py`` checks it on H.264 and VP9).
"""

from __future__ import annotations

import bisect
import os
import pickle
import signal
import socket
import struct
import sys
from typing import Any, Protocol

if __name__ == "__main__" and sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    # Run as the decoding process's script: this package folder must not shadow other modules.
    sys.path.pop(0)

import numpy as np  # noqa: E402

__all__ = ["Backend", "DecordBackend", "PyAVBackend", "describe_error", "open_backend", "recv_msg", "send_msg", "serve"]


class Backend(Protocol):
    """What both backends provide; `read` takes sorted, unique, in-range indices."""

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
    """

    def __init__(self, path: str, *, num_threads: int = 1) -> None:
        # decord is imported here, never at module level: the parent process imports torch first
        # (decord's bundled libraries must load after torch's), and the PyAV path never needs it.
        import decord  # noqa: PLC0415

        self._reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=num_threads)
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

    Args:
        path: the video file.
        num_threads: FFmpeg decoding threads.
    """

    def __init__(self, path: str, *, num_threads: int = 1) -> None:
        import av  # noqa: PLC0415

        self._container = av.open(path)
        if not self._container.streams.video:
            self._container.close()
            raise ValueError("the file has no video stream")
        self._stream = self._container.streams.video[0]
        self._stream.codec_context.thread_count = max(1, num_threads)
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
        return int(self._stream.codec_context.height), int(self._stream.codec_context.width)

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
                    frames[index] = frame.to_ndarray(format="rgb24")
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
            tail = frames[last_index] if last_index in frames else last_frame.to_ndarray(format="rgb24")
            for i in missing:
                frames[i] = tail
        return np.stack([frames[i] for i in indices])

    def close(self) -> None:
        self._container.close()


BACKENDS = {"decord": DecordBackend, "pyav": PyAVBackend}


def open_backend(path: str, decoder: str, *, num_threads: int = 1) -> Backend:
    """Open `path` with the backend named `decoder` ("decord" or "pyav")."""
    if decoder not in BACKENDS:
        raise ValueError(f"unknown decoder {decoder!r}: choose one of {sorted(BACKENDS)}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    return BACKENDS[decoder](path, num_threads=num_threads)


def describe_error(e: BaseException) -> str:
    """One line for a decoder exception (decord's messages carry a C++ stack trace below it)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


# --- the wire format between the parent (video_reader.py) and the decoding process ---------------
# A message is an 8-byte length followed by a pickle; frames follow their header as raw bytes so
# the parent can receive them straight into a preallocated array.

_LEN = struct.Struct("<Q")


def send_msg(sock: socket.socket, obj: Any) -> None:
    """Send one pickled message."""
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_LEN.pack(len(data)) + data)


def recv_exact(sock: socket.socket, buf: memoryview) -> None:
    """Fill `buf` from the socket; EOFError when the peer closes first."""
    got = 0
    while got < len(buf):
        n = sock.recv_into(buf[got:])
        if n == 0:
            raise EOFError("the decoding process closed the connection")
        got += n


def recv_msg(sock: socket.socket) -> Any:
    """Receive one pickled message."""
    head = bytearray(_LEN.size)
    recv_exact(sock, memoryview(head))
    (size,) = _LEN.unpack(head)
    body = bytearray(size)
    recv_exact(sock, memoryview(body))
    return pickle.loads(body)


def _live_and_die_with_parent() -> None:
    # Ctrl-C and a scheduler's SIGTERM reach the whole process group: the parent decides what
    # happens (a preempted job checkpoints first), and requests in flight must not fail meanwhile.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # If the parent (a DataLoader worker) is killed, a decoder stuck in C would otherwise live on.
    try:
        import ctypes  # noqa: PLC0415

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass


def serve(sock: socket.socket, parent_pid: int) -> None:
    """Answer requests from the parent until it closes the connection (or dies).

    Requests: ``("open", handle, path, decoder, num_threads)`` -> ``("ok", num_frames, fps)``;
    ``("size", handle)`` -> ``("ok", height, width)``; ``("read", handle, indices)`` ->
    ``("frames", shape)`` then the raw uint8 bytes; ``("close", handle)`` -> ``("ok",)``.
    Any failure answers ``("error", "TypeName: message")`` and the process carries on.
    """
    _live_and_die_with_parent()
    if os.getppid() != parent_pid:  # the parent died before PR_SET_PDEATHSIG took effect
        return
    readers: dict[int, Backend] = {}
    send_msg(sock, ("ready",))
    while True:
        try:
            request = recv_msg(sock)
        except EOFError:
            return
        op, handle = request[0], request[1]
        try:
            if op == "open":
                _, _, path, decoder, num_threads = request
                if handle in readers:
                    readers.pop(handle).close()
                reader = open_backend(path, decoder, num_threads=num_threads)
                readers[handle] = reader
                send_msg(sock, ("ok", reader.num_frames, reader.fps))
            elif op == "size":
                send_msg(sock, ("ok", *readers[handle].frame_size()))
            elif op == "read":
                frames = np.ascontiguousarray(readers[handle].read(request[2]), dtype=np.uint8)
                send_msg(sock, ("frames", frames.shape))
                sock.sendall(memoryview(frames).cast("B"))
            elif op == "close":
                reader = readers.pop(handle, None)
                if reader is not None:
                    reader.close()
                send_msg(sock, ("ok",))
            else:
                send_msg(sock, ("error", f"ValueError: unknown request {op!r}"))
        except Exception as e:  # noqa: BLE001 - every decoder failure goes back to the parent
            send_msg(sock, ("error", describe_error(e)))


if __name__ == "__main__":
    serve(socket.socket(fileno=int(sys.argv[1])), parent_pid=int(sys.argv[2]))
