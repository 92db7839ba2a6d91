"""The wire protocol between a `VideoReader` (video_reader.py) and its decoding process (server.py).

Framing: a message is an 8-byte little-endian length followed by a pickle. Decoded frames follow
their ``FRAMES`` header as raw uint8 bytes, so the client receives them straight into a
preallocated array (one copy, no pickling of pixel data).

Operations (request -> reply):

    (OPEN, handle, path, decoder, options)   -> (OK, num_frames, fps)
    (SIZE, handle)                           -> (OK, height, width)
    (READ, handle, indices)                  -> (FRAMES, shape) + raw bytes of uint8 [N,H,W,3]
    (CLOSE, handle)                          -> (OK,)
    (LOAD, decoder)                          -> (OK,)   imports the decoder's libraries

``options`` are the keyword arguments of `backends.open_backend` (num_threads, short_side).
The server announces itself with ``(READY,)``; any failed request is answered with
``(ERROR, "TypeName: message")`` and the server carries on. The client sends ``LOAD`` before
the first ``OPEN`` with each decoder, so that importing a library (seconds for torch) is timed
apart from opening a video.

This module imports nothing but the standard library and numpy: the decoding process loads it.
"""

from __future__ import annotations

import pickle
import socket
import struct
from typing import Any

import numpy as np

__all__ = [
    "CLOSE",
    "ERROR",
    "FRAMES",
    "LOAD",
    "OK",
    "OPEN",
    "READ",
    "READY",
    "SIZE",
    "recv_exact",
    "recv_frames",
    "recv_msg",
    "send_frames",
    "send_msg",
]

# Requests.
OPEN, SIZE, READ, CLOSE, LOAD = "open", "size", "read", "close", "load"
# Replies.
READY, OK, FRAMES, ERROR = "ready", "ok", "frames", "error"

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


def send_frames(sock: socket.socket, frames: np.ndarray) -> None:
    """Send uint8 frames: the ``(FRAMES, shape)`` header, then the raw bytes."""
    frames = np.ascontiguousarray(frames, dtype=np.uint8)
    send_msg(sock, (FRAMES, frames.shape))
    sock.sendall(memoryview(frames).cast("B"))


def recv_frames(sock: socket.socket, shape: tuple[int, ...]) -> np.ndarray:
    """Receive the raw bytes that follow a ``(FRAMES, shape)`` header."""
    frames = np.empty(shape, dtype=np.uint8)
    recv_exact(sock, memoryview(frames).cast("B"))
    return frames
