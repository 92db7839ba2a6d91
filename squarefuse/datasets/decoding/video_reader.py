"""The public API for reading videos: open one with decord, PyAV or torchcodec, here or in a guarded process.

    with open_video("a.webm", "decord", timeout=30.0) as video:
        frames_THWC = video.get_frames([0, 4, 8])      # uint8, RGB, upright (display rotation applied)

This module is the client side: the backends are in `backends`, the decoding process in
`server`, the messages between them in `protocol`.

With ``timeout`` set, decoding runs in one small child process per calling process (started on
first use, re-used for every later video). A decoder call that does not answer within ``timeout``
seconds gets that process killed and raises `DecodeTimeout` naming the file; the next call starts
a fresh process. Importing a decoder's library in a fresh process is timed apart, under
`_STARTUP_TIMEOUT_S` (a ``LOAD`` request before its first ``OPEN``): the first video that hangs
costs ``timeout`` like any other. Killing is the only cure: decord can spin forever inside C while holding the GIL,
where no Python thread, signal handler or alarm of the hung process ever runs again. A decoder
that crashes the process (a segfault on a corrupt file) raises `DecodeError` the same way instead
of killing the DataLoader worker. The price is one copy of the decoded frames through a socket:
1-3% of the decoding time of K400- and SSv2-like clips. The process is replaced every
`_RECYCLE_AFTER_OPENS` videos, so nothing a decoder library leaks can pile up.

Without ``timeout`` the backend runs in this process: slightly cheaper, unguarded.

Readers are opened inside the process that uses them (one per sample in a DataLoader worker);
after a fork the child starts its own decoding process and never touches its parent's.
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import numpy as np
import torch  # noqa: F401 - torch must be loaded before decord (imported lazily by the backends)

from squarefuse.datasets.decoding import backends, server
from squarefuse.datasets.decoding.backends import describe_error, open_backend
from squarefuse.datasets.decoding.protocol import (
    CLOSE,
    ERROR,
    FRAMES,
    LOAD,
    OK,
    OPEN,
    READ,
    READY,
    SIZE,
    recv_frames,
    recv_msg,
    send_msg,
)

__all__ = ["DECODERS", "DecodeError", "DecodeTimeout", "VideoReader", "open_video", "resolve_decoder"]

log = logging.getLogger(__name__)

DECODERS = ("decord", "pyav", "torchcodec")
# The package folder that holds `squarefuse`: the decoding process imports it from there.
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[3])
# How long a fresh decoding process may take to import numpy and answer, and then to import a
# decoder's library (slow shared filesystems, torch for torchcodec); `timeout` starts after it.
_STARTUP_TIMEOUT_S = 60.0
# The decoding process is replaced after this many videos: whatever a decoder library leaks or
# fragments (decord without seek(0), FFmpeg buffers) cannot pile up over an epoch. ~0.3 s each.
_RECYCLE_AFTER_OPENS = 2000


class DecodeError(RuntimeError):
    """A video could not be decoded; the message names the file and what failed."""


class DecodeTimeout(DecodeError):
    """A decoder call did not return within the time limit; its process was killed."""


_fallback_warned = False


@functools.cache
def _decord_installed() -> bool:
    # find_spec looks the package up without importing it (decord must load after torch).
    return importlib.util.find_spec("decord") is not None


TORCHCODEC_INSTALL = 'pip install -e ".[torchcodec]" and FFmpeg\'s shared libraries (apt-get install ffmpeg)'


@functools.cache
def torchcodec_problem() -> str | None:
    """Why torchcodec cannot decode here, or None when it can.

    Checked by importing it in a child process: torchcodec loads the system's FFmpeg libraries,
    which must not be loaded into this process next to PyAV's and decord's own copies just to
    check (PyAV's VP9 encoder, used by the synthetic data generator, then fails to open).
    """
    if importlib.util.find_spec("torchcodec") is None:
        return "torchcodec is not installed"
    check = subprocess.run(
        [sys.executable, "-c", "import torch, torchcodec.decoders"], capture_output=True, text=True, timeout=300
    )
    if check.returncode != 0:
        lines = [line for line in check.stderr.splitlines() if line.strip()]
        return f"torchcodec does not load: {lines[-1] if lines else f'exit code {check.returncode}'}"
    return None


def resolve_decoder(name: str) -> str:
    """Check a decoder name; "decord" becomes "pyav" (with a one-time warning) without decord.

    Args:
        name: "decord", "pyav" or "torchcodec" (the value of ``dataset.decoder``).

    Returns:
        The decoder to use.

    Raises:
        ValueError: `name` is not a known decoder, or it is torchcodec and torchcodec cannot load.
    """
    global _fallback_warned
    if name not in DECODERS:
        raise ValueError(f"dataset.decoder={name!r} is not a decoder: choose one of {list(DECODERS)}")
    if name == "torchcodec" and (problem := torchcodec_problem()) is not None:
        raise ValueError(f"dataset.decoder=torchcodec: {problem}. Install {TORCHCODEC_INSTALL}")
    if name == "decord" and not _decord_installed():
        if not _fallback_warned:
            log.warning("decord is not installed (it ships x86-64 wheels only): decoding with PyAV instead")
            _fallback_warned = True
        return "pyav"
    return name


class _DecodeProcess:
    """The decoding child process of one (worker) process, restarted after a timeout or crash."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self._next_handle = 0
        self._opens = 0
        self._open_handles: set[int] = set()
        self._loaded_decoders: set[str] = set()
        self.generation = 0  # bumped at every start: handles of an older process are void

    def _start(self) -> None:
        parent_sock, child_sock = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        # torch (loaded there by torchcodec) must not start a thread per core for its copies: on
        # a busy node those threads spin and made torchcodec 15x slower (measured on 2 cores).
        # Decoding threads are the backends' own `num_threads`.
        env["OMP_NUM_THREADS"] = "1"
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", server.__name__, str(child_sock.fileno()), str(os.getpid())],
                pass_fds=(child_sock.fileno(),),
                stdin=subprocess.DEVNULL,
                env=env,
            )
        finally:
            child_sock.close()
        self._sock = parent_sock
        self._opens = 0
        self._loaded_decoders = set()
        self.generation += 1
        try:
            parent_sock.settimeout(_STARTUP_TIMEOUT_S)
            if recv_msg(parent_sock) != (READY,):
                raise EOFError("unexpected first message")
        except (OSError, EOFError) as e:
            code = self._kill()
            raise DecodeError(f"the decoding process did not start (exit code {code}): {e}") from e

    def _kill(self) -> int | None:
        code = None
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            try:
                code = self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        if self._sock is not None:
            self._sock.close()
        self._proc, self._sock = None, None
        self._open_handles.clear()
        return code

    def new_handle(self) -> int:
        self._next_handle += 1
        return self._next_handle

    def request(self, message: tuple, *, path: str, timeout: float) -> tuple:
        """Send one request and return the reply (frames arrive as an array in reply[1])."""
        op = message[0]
        with self._lock:
            alive = self._proc is not None and self._proc.poll() is None
            if not alive and op != OPEN:
                raise DecodeError(f"{path}: the decoding process was restarted; open the video again")
            if op == OPEN and (not alive or (self._opens >= _RECYCLE_AFTER_OPENS and not self._open_handles)):
                self._kill()
                self._start()
            if op == OPEN and message[3] not in self._loaded_decoders:
                # Importing a decoder's library (torch for torchcodec: seconds, more on a busy
                # node) is not the decoder hanging: it gets the start-up margin, and the open
                # that follows gets `timeout` alone.
                self._exchange((LOAD, message[3]), path=path, timeout=_STARTUP_TIMEOUT_S)
                self._loaded_decoders.add(message[3])
            reply = self._exchange(message, path=path, timeout=timeout)
            if op == OPEN and reply[0] == OK:
                self._opens += 1
                self._open_handles.add(message[1])
            elif op == CLOSE:
                self._open_handles.discard(message[1])
        if reply[0] == ERROR:
            raise DecodeError(f"{path}: {reply[1]}")
        return reply

    def _exchange(self, message: tuple, *, path: str, timeout: float) -> tuple:
        # One request and its reply on the live process; a timeout or a death kills it.
        op = message[0]
        assert self._sock is not None
        try:
            self._sock.settimeout(timeout)
            send_msg(self._sock, message)
            reply = recv_msg(self._sock)
            if reply[0] == FRAMES:
                reply = (FRAMES, recv_frames(self._sock, reply[1]))
        except TimeoutError as e:
            self._kill()
            raise DecodeTimeout(
                f"{path}: the decoder did not answer within {timeout:g} s ({op}); its process was killed"
            ) from e
        except (OSError, EOFError) as e:
            code = self._kill()
            raise DecodeError(f"{path}: the decoding process died during {op} (exit code {code})") from e
        if op == LOAD and reply[0] == ERROR:
            raise DecodeError(f"{path}: the decoding process could not load {message[1]}: {reply[1]}")
        return reply

    def close(self) -> None:
        # No lock: this also runs at exit, possibly from a signal handler that interrupted a
        # request holding it; a request racing with it fails as "died", which is fine then.
        self._kill()


_process: _DecodeProcess | None = None
_process_pid = -1


def _decode_process() -> _DecodeProcess:
    global _process, _process_pid
    if _process is None or _process_pid != os.getpid():
        _process, _process_pid = _DecodeProcess(), os.getpid()
    return _process


def _forget_after_fork() -> None:
    # The forked child must not talk to its parent's decoding process: drop (do not kill) it.
    global _process
    if _process is not None and _process._sock is not None:
        _process._sock.close()
    _process = None


os.register_at_fork(after_in_child=_forget_after_fork)


@atexit.register
def _close_decode_process() -> None:
    if _process is not None and _process_pid == os.getpid():
        _process.close()


class _RemoteBackend:
    """A backend living in the decoding process, driven through `_DecodeProcess.request`."""

    def __init__(self, path: str, decoder: str, *, timeout: float, **options) -> None:
        self._path, self._timeout = path, timeout
        self._process = _decode_process()
        self._handle = self._process.new_handle()
        _, self.num_frames, self.fps = self._request((OPEN, self._handle, path, decoder, options))
        self._generation = self._process.generation

    def _request(self, message: tuple) -> tuple:
        return self._process.request(message, path=self._path, timeout=self._timeout)

    def frame_size(self) -> tuple[int, int]:
        _, height, width = self._request((SIZE, self._handle))
        return height, width

    def read(self, indices: list[int]) -> np.ndarray:
        return self._request((READ, self._handle, indices))[1]

    def close(self) -> None:
        if self._process.generation == self._generation and self._process._proc is not None:
            self._request((CLOSE, self._handle))


class VideoReader:
    """An open video, whichever backend decodes it and wherever it runs.

    Attributes:
        path: the file.
        num_frames: frames in the video stream (as the container's packets count them).
        fps: average frame rate.
        height, width: frame size in pixels (looked up on first access).
    """

    def __init__(self, path: str, backend: backends.Backend) -> None:
        self.path = path
        self._backend = backend
        self.num_frames = int(backend.num_frames)
        self.fps = float(backend.fps)
        self._size: tuple[int, int] | None = None
        if self.num_frames < 1:
            self.close()
            raise DecodeError(f"{path}: the video stream has no frames")

    def _size_hw(self) -> tuple[int, int]:
        if self._size is None:
            self._size = self._call(self._backend.frame_size)
        return self._size

    @property
    def height(self) -> int:
        return self._size_hw()[0]

    @property
    def width(self) -> int:
        return self._size_hw()[1]

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except DecodeError:
            raise
        except Exception as e:  # noqa: BLE001 - decord and FFmpeg raise anything; name the file
            raise DecodeError(f"{self.path}: {describe_error(e)}") from e

    def get_frames(self, indices: Sequence[int]) -> torch.Tensor:
        """Decode frames by index.

        Indices are clamped to ``[0, num_frames - 1]``; repeated and unsorted indices are fine
        (each frame is decoded once).

        Args:
            indices: frame indices.

        Returns:
            uint8 tensor [T,H,W,C] (RGB), T = len(indices).

        Raises:
            DecodeError: the frames could not be decoded (DecodeTimeout: the decoder hung).
        """
        index_T = np.clip(np.asarray(indices, dtype=np.int64).reshape(-1), 0, self.num_frames - 1)
        if index_T.size == 0:
            raise ValueError(f"{self.path}: no frame indices given")
        unique_U, inverse_T = np.unique(index_T, return_inverse=True)
        frames_UHWC = self._call(self._backend.read, unique_U.tolist())
        if frames_UHWC.ndim != 4 or frames_UHWC.shape[0] != unique_U.size:
            raise DecodeError(f"{self.path}: asked for {unique_U.size} frames, got shape {frames_UHWC.shape}")
        frames = torch.from_numpy(frames_UHWC)
        if unique_U.size != index_T.size or not np.array_equal(unique_U, index_T):
            frames = frames[torch.from_numpy(inverse_T.reshape(-1))]
        return frames

    def close(self) -> None:
        """Release the decoder (errors while closing are ignored: the frames are already out)."""
        if self._backend is not None:
            try:
                self._backend.close()
            except Exception:  # noqa: BLE001
                pass
            self._backend = None

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def open_video(
    path: str | Path,
    decoder: str = "decord",
    *,
    num_threads: int = 1,
    timeout: float | None = None,
    short_side: int | None = None,
) -> VideoReader:
    """Open a video for frame access.

    Args:
        path: the video file.
        decoder: "decord", "pyav" or "torchcodec" ("decord" falls back to "pyav" where it is not
            installed).
        num_threads: decoding threads; keep 1 inside DataLoader workers.
        timeout: seconds each decoder call may take; decoding then runs in a guarded child
            process (see the module docstring). None or <= 0: decode in this process, unguarded.
        short_side: decode-time resize: a video whose short side is well above this (see
            `backends.RESIZE_MIN_RATIO`) is scaled to it while decoding. None = as stored.

    Returns:
        A `VideoReader`; close it (or use it as a context manager).

    Raises:
        DecodeError: the file is missing, not a video, or could not be opened (DecodeTimeout:
            opening hung).
        ValueError: unknown decoder, or torchcodec cannot load.
    """
    path = str(path)
    decoder = resolve_decoder(decoder)
    if timeout is not None and timeout > 0:
        backend = _RemoteBackend(path, decoder, timeout=float(timeout), num_threads=num_threads, short_side=short_side)
    else:
        try:
            backend = open_backend(path, decoder, num_threads=num_threads, short_side=short_side)
        except Exception as e:  # noqa: BLE001 - see VideoReader._call
            raise DecodeError(f"{path}: {describe_error(e)}") from e
    return VideoReader(path, backend)
