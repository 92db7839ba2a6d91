"""What the predict and extract apps read: the videos an `input=` names, and `views=CxK`.

`find_videos` takes one video file, a folder (searched recursively) or a list file (`path label`
or `path` per line); `parse_views` reads the number of clips and crops.
"""

from __future__ import annotations

import errno
import logging
import stat
from collections.abc import Sequence
from pathlib import Path

from squarefuse.datasets.annotations import VideoRecord, read_utf8

__all__ = ["LIST_EXTENSIONS", "NO_LABEL", "VIDEO_EXTENSIONS", "find_videos", "parse_views"]

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp", ".ogv")
LIST_EXTENSIONS = (".txt", ".lst", ".list", ".csv")
NO_LABEL = -1  # the label of a video given without one


def parse_views(views: str | Sequence[int]) -> tuple[int, int]:
    """`"2x3"` or `[2, 3]` -> (clips, crops).

    Raises:
        ValueError: not two positive integers, or crops other than 1 or 3.
    """
    try:
        parts = str(views).lower().split("x") if isinstance(views, str) else list(views)
        clips, crops = (int(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(f"views={views!r}: write CLIPSxCROPS, e.g. views=1x1 or views=2x3") from None
    if clips < 1 or crops not in (1, 3):
        raise ValueError(f"views={views!r}: need clips >= 1 and crops 1 or 3")
    return clips, crops


def _read_video_list(list_file: Path) -> list[VideoRecord]:
    """`path label` or plain `path` lines; relative paths are relative to the list's folder."""
    records = []
    for raw in read_utf8(list_file).splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, label = line, NO_LABEL
        parts = line.rsplit(maxsplit=1)
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            name, label = parts[0], int(parts[1])
        records.append(VideoRecord(str(list_file.parent / Path(name).expanduser()), label, name))
    if not records:
        raise ValueError(f"input={list_file}: the list file names no video")
    return records


def _why_skipped(path: Path) -> str | None:
    """Why a folder search leaves out an entry that looks like a video (or a folder of them), None
    for one that is no video: a search must not stop at it (a FIFO blocks the reader), nor drop it unsaid."""
    if path.is_symlink() and path.is_dir():
        # rglob does not follow links to folders (a link to an ancestor would never end).
        return "a link to a folder, not searched (links to folders are not followed)"
    if path.suffix.lower() not in VIDEO_EXTENSIONS:
        return None
    try:
        mode = path.stat().st_mode
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symlink loop"
        return "a broken link" if path.is_symlink() else f"unreadable ({e.strerror})"
    if stat.S_ISREG(mode):
        return None  # a video file (the caller takes it)
    if stat.S_ISDIR(mode):
        return "a folder with a video extension, not a video file (its contents are searched)"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe), not a video file"
    return "not a regular file (a socket or device)"


def find_videos(input: str | Path) -> list[VideoRecord]:
    """The videos an `input=` names: one video file, a folder (searched recursively for files
    with a video extension, sorted), or a list file (`path label` or `path` per line).

    In a folder, entries with a video extension that are no regular file (a folder, a FIFO, a
    symlink loop, a broken link) and links to folders are skipped, each logged with why, then a count.

    Raises:
        FileNotFoundError: `input` does not exist.
        ValueError: an empty folder or list, or a file that is neither a video nor a list.
    """
    path = Path(input).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"input={input}: no such file or folder")
    if path.is_dir():
        files, skipped = [], []
        for p in sorted(path.rglob("*")):
            if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file():
                files.append(p)
            elif (why := _why_skipped(p)) is not None:
                skipped.append(p)
                log.warning(f"input={input}: skipped {p.relative_to(path)}: {why}")
        if skipped:
            log.warning(f"input={input}: {len(skipped)} entries skipped (listed above)")
        if not files:
            raise ValueError(
                f"input={input}: no video files ({' '.join(VIDEO_EXTENSIONS)}) in this folder or below"
                + (f" ({len(skipped)} entries skipped, see the warnings)" if skipped else "")
            )
        return [VideoRecord(str(p), NO_LABEL, str(p.relative_to(path))) for p in files]
    if path.suffix.lower() in VIDEO_EXTENSIONS:
        return [VideoRecord(str(path), NO_LABEL, path.name)]
    if path.suffix.lower() in LIST_EXTENSIONS:
        return _read_video_list(path)
    raise ValueError(
        f"input={input}: neither a video ({' '.join(VIDEO_EXTENSIONS)}) nor a list file ({' '.join(LIST_EXTENSIONS)})"
    )
