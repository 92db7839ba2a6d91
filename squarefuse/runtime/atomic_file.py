"""One way to write a file so that a crash mid-write leaves the previous file (or none), never half a file.

with atomic_write(path, "wb") as f: ...     # a temporary `.NAME.XXXXXXXX.tmp` renamed over `path`
fd, tmp = new_temp_file(path)              # the same temporary file for writers that need a name (ONNX, PyAV)
remove_stale_temp_files(folder)             # what killed writers left (only with the run lock held)
check_writable(folder, key)                 # at start-up, not at the first save after hours of work
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

TEMP_SUFFIX = ".tmp"
# `tempfile.mkstemp(prefix=".NAME.", suffix=".tmp")` names: 8 characters from its alphabet.
TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")
# A write that fails with this little space left failed for want of space, whatever it raised:
# numpy says "OSError: 3072 requested and 992 written" (no errno), torch "unexpected pos ..."
# when the OSError is not kept as its context.
LOW_SPACE_BYTES = 1 << 20
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _is_disk_full(error: BaseException, folder: Path) -> bool:
    """Did `error` (or an error it was raised from, as torch's RuntimeError is) come from a full disk?"""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in DISK_FULL_ERRNOS:
            return True
        seen = seen.__cause__ or seen.__context__
    if not isinstance(error, (OSError, RuntimeError)):
        return False
    free = _free_bytes(folder)
    return free is not None and free < LOW_SPACE_BYTES


def current_umask() -> int:
    """The process's umask, read without changing it where Linux tells (`os.umask` can only swap it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    # Swapping is not thread-safe, hence only the fallback.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_temp_file(path: str | Path, suffix: str = TEMP_SUFFIX) -> tuple[int, str]:
    """Create `.NAME.XXXXXXXX<suffix>` next to `path` with the mode a plain `open(path, "w")` would give.

    `mkstemp` creates 0600 files and a rename keeps the mode: without this, checkpoints and exports
    could be read by their owner only, whatever the user's umask says (on a shared cluster, colleagues
    could not read a run). Returns the open descriptor and the name, as `mkstemp` does.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    return fd, tmp


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file next to `path` and rename it over `path` once the block succeeds.

    The data is fsync'ed before the rename (atomic on POSIX file systems); on any error the
    temporary file is removed and `path` is left as it was. Text mode writes UTF-8, newlines as given.

    Raises:
        OSError: ENOSPC "no space left on device while writing PATH", saying that `path` is
            untouched, when the disk (or quota) is full; other errors as the writer raised them.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = new_temp_file(path)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        # Judged before the temporary file is removed: removing it frees the space it took.
        full = isinstance(e, Exception) and _is_disk_full(e, path.parent)
        Path(tmp).unlink(missing_ok=True)
        if not full:
            raise
        kept = f"the previous {path} is untouched" if path.exists() else f"{path} was not written"
        raise OSError(
            errno.ENOSPC,
            f"no space left on device while writing {path} ({type(e).__name__}: {str(e).strip()}); {kept} "
            "(writes go to a temporary file renamed over it only when complete). Free space on that file "
            "system and run the same command again",
        ) from e


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Remove the temporary files that writers killed mid-write (SIGKILL, a node failure) left in `folder`.

    Only `atomic_write`'s names (`.NAME.XXXXXXXX.tmp`), only at the top of `folder`. Call it only when
    no other process can be writing there (the trainer holds the run lock). Returns what was removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in sorted(folder.iterdir()):
        if TEMP_NAME.match(entry.name) and entry.is_file() and not entry.is_symlink():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def check_writable(folder: str | Path, what: str) -> None:
    """Create and remove a file in `folder` (or, if it does not exist yet, in its nearest existing parent).

    Permission bits, ACLs, read-only mounts and root squashing on NFS all decide; only trying tells.

    Raises:
        PermissionError / OSError: naming `folder` and `what` is written there.
    """
    folder = Path(folder)
    probe_dir = folder
    while not probe_dir.exists() and probe_dir.parent != probe_dir:
        probe_dir = probe_dir.parent
    try:
        fd, tmp = tempfile.mkstemp(prefix=".write_test.", suffix=TEMP_SUFFIX, dir=probe_dir)
    except OSError as e:
        raise type(e)(
            e.errno,
            f"cannot write to {probe_dir} ({e.strerror}), where {what} will be written. Make it "
            "writable or choose another run folder (hydra.run.dir=...)",
        ) from e
    os.close(fd)
    os.unlink(tmp)
