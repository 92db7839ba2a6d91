"""The decoding process: answers a `VideoReader`'s requests with a decoding backend.

Started by `squarefuse.datasets.decoding.video_reader` as ``python -m squarefuse.datasets.decoding.server FD
PARENT_PID`` (FD: its end of a socket pair). It imports neither torch nor the rest of the package
(torchcodec, when used, loads torch itself), so it starts in a fraction of a second, and a
decoder that hangs in it (decord can spin forever in C holding the GIL) is killed from outside
without taking the DataLoader worker down with it. The protocol is in `protocol`.
"""

from __future__ import annotations

import signal
import socket
import sys

from squarefuse.datasets.decoding.backends import Backend, describe_error, load_libraries, open_backend
from squarefuse.datasets.decoding.protocol import (
    CLOSE,
    ERROR,
    LOAD,
    OK,
    OPEN,
    READ,
    READY,
    SIZE,
    recv_msg,
    send_frames,
    send_msg,
)
from squarefuse.runtime.process_pool import die_with_parent

__all__ = ["serve"]


def _live_and_die_with_parent(parent_pid: int) -> None:
    # Ctrl-C and a scheduler's SIGTERM reach the whole process group: the parent decides what
    # happens (a preempted job checkpoints first), and requests in flight must not fail meanwhile.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # If the parent (a DataLoader worker) is killed, a decoder stuck in C would otherwise live on;
    # a parent that died before this took effect ends this process at once.
    die_with_parent(parent_pid)


def serve(sock: socket.socket, parent_pid: int) -> None:
    """Answer requests from the parent until it closes the connection (or dies)."""
    _live_and_die_with_parent(parent_pid)
    readers: dict[int, Backend] = {}
    send_msg(sock, (READY,))
    while True:
        try:
            request = recv_msg(sock)
        except EOFError:
            return
        op, handle = request[0], request[1]
        try:
            if op == OPEN:
                _, _, path, decoder, options = request
                if handle in readers:
                    readers.pop(handle).close()
                reader = open_backend(path, decoder, **options)
                readers[handle] = reader
                send_msg(sock, (OK, reader.num_frames, reader.fps))
            elif op == SIZE:
                send_msg(sock, (OK, *readers[handle].frame_size()))
            elif op == READ:
                send_frames(sock, readers[handle].read(request[2]))
            elif op == LOAD:
                load_libraries(request[1])
                send_msg(sock, (OK,))
            elif op == CLOSE:
                reader = readers.pop(handle, None)
                if reader is not None:
                    reader.close()
                send_msg(sock, (OK,))
            else:
                send_msg(sock, (ERROR, f"ValueError: unknown request {op!r}"))
        except Exception as e:  # noqa: BLE001 - every decoder failure goes back to the parent
            send_msg(sock, (ERROR, describe_error(e)))


if __name__ == "__main__":
    serve(socket.socket(fileno=int(sys.argv[1])), parent_pid=int(sys.argv[2]))
