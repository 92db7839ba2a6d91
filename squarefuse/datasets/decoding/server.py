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

from squarefuse.datasets.decoding import protocol
from squarefuse.datasets.decoding.backends import Backend, describe_error, load_libraries, open_backend
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
    protocol.send_msg(sock, (protocol.READY,))
    while True:
        try:
            request = protocol.recv_msg(sock)
        except EOFError:
            return
        op, handle = request[0], request[1]
        try:
            if op == protocol.OPEN:
                _, _, path, decoder, options = request
                if handle in readers:
                    readers.pop(handle).close()
                reader = open_backend(path, decoder, **options)
                readers[handle] = reader
                protocol.send_msg(sock, (protocol.OK, reader.num_frames, reader.fps))
            elif op == protocol.SIZE:
                protocol.send_msg(sock, (protocol.OK, *readers[handle].frame_size()))
            elif op == protocol.READ:
                protocol.send_frames(sock, readers[handle].read(request[2]))
            elif op == protocol.LOAD:
                load_libraries(request[1])
                protocol.send_msg(sock, (protocol.OK,))
            elif op == protocol.CLOSE:
                reader = readers.pop(handle, None)
                if reader is not None:
                    reader.close()
                protocol.send_msg(sock, (protocol.OK,))
            else:
                protocol.send_msg(sock, (protocol.ERROR, f"ValueError: unknown request {op!r}"))
        except Exception as e:  # noqa: BLE001 - every decoder failure goes back to the parent
            protocol.send_msg(sock, (protocol.ERROR, describe_error(e)))


if __name__ == "__main__":
    serve(socket.socket(fileno=int(sys.argv[1])), parent_pid=int(sys.argv[2]))
