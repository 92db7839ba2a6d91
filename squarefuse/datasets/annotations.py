"""Read annotation files into video records: SSv2 json, Kinetics csv, "path label" lists.

Every reader returns `Annotations` (records + class names) and fails with a ValueError naming the
file and the line or entry for malformed input: a byte that is not UTF-8, a video listed twice
(it would count twice in an evaluation), a class id or a time too large to be one. A UTF-8
byte-order mark (which Windows editors write) is read as such, not as part of the first name.
A path may come from a checkpoint someone sent (`dataset.val_file=/etc/passwd`): until a file is
recognised as the expected kind (a Kinetics csv by its header; an SSv2 entry by its id and template),
messages name the line, never show its text.
Whether the videos exist is checked afterwards, in one pass over directory listings
(`split_missing`), not here.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "MAX_CLASSES",
    "Annotations",
    "K400Row",
    "VideoRecord",
    "k400_class_names",
    "k400_clip_id",
    "load_k400",
    "load_list",
    "list_num_classes",
    "load_ssv2",
    "read_k400_csv",
    "read_label_map",
    "read_utf8",
    "split_missing",
]

K400_COLUMNS = ("label", "youtube_id", "time_start", "time_end")
K400_LAYOUTS = ("auto", "flat", "per_class")
# The most classes a dataset may have. Without a label map a list's class count is 1 + its largest
# label, and one mistyped label (99999999999) would build that many class names and a head of that
# size: the job was killed for memory, without a message. The largest video datasets have ~4k.
MAX_CLASSES = 100_000


@dataclass(frozen=True)
class VideoRecord:
    """One video of a split.

    Attributes:
        path: the video file.
        label: class id.
        id: the dataset's own name for the sample (SSv2 id, K400 clip name, list path).
    """

    path: str
    label: int
    id: str


@dataclass
class Annotations:
    """The records of a split, the class names (index = class id) and the annotation file read."""

    records: list[VideoRecord]
    class_names: list[str]
    source: Path | None = None


def _require(path: str | Path, key: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{key}: {path} does not exist")
    return path


def read_utf8(path: str | Path) -> str:
    """The file decoded as UTF-8, with or without a byte-order mark; a ValueError naming the file
    and line of the first byte that is not UTF-8 (a file saved as latin-1 or cp1252)."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(
            f"{path}:{line}: byte {data[e.start]:#04x} is not UTF-8: save the file as UTF-8 "
            f"(e.g. `iconv -f latin1 -t utf-8 {path.name} > fixed.txt`)"
        ) from None


def _twice(path: Path, what: str, first: object, again: object) -> ValueError:
    """The error for a video listed twice: an evaluation would count it twice."""
    return ValueError(f"{path}: {what} is listed twice ({first} and {again}): remove one of them")


def _load_json(path: Path):
    try:
        return json.loads(read_utf8(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e


def read_label_map(path: str | Path, *, key: str = "dataset.label_map") -> list[str]:
    """Class names, one a line (line i names class i); blank lines are ignored.

    Args:
        path: the file.
        key: the config key it came from, for error messages.
    """
    path = _require(path, key)
    first_line: dict[str, int] = {}  # name -> its line; a name twice is named by line numbers, not text
    for number, line in enumerate(read_utf8(path).splitlines(), start=1):
        name = line.strip()
        if name and first_line.setdefault(name, number) != number:
            raise ValueError(f"{path}:{number}: the class name of line {first_line[name]} again (each name once)")
        if len(first_line) > MAX_CLASSES:
            raise ValueError(f"{path}: more than {MAX_CLASSES} class names: is it a label map?")
    if not first_line:
        raise ValueError(f"{path}: no class names")
    return list(first_line)


# --- Something-Something V2 ------------------------------------------------------------------


def load_ssv2(
    *, labels_file: str | Path, annotation_file: str | Path, video_dir: str | Path, video_ext: str
) -> Annotations:
    """The official SSv2 json files.

    A sample's class is its ``template`` with the brackets removed ("Putting [something] on
    [something]" -> "Putting something on something"), looked up in the labels file, which maps
    class names to id strings.

    Args:
        labels_file: ``something-something-v2-labels.json``.
        annotation_file: ``something-something-v2-{train,validation}.json``.
        video_dir: folder of ``{id}.{video_ext}`` files.
        video_ext: "webm" for the original release, "mp4" after re-encoding.
    """
    labels_path = _require(labels_file, "dataset.labels_file")
    labels = _load_json(labels_path)
    if not isinstance(labels, dict):
        raise ValueError(f"{labels_path}: expected an object mapping class names to ids")
    class_names: list[str | None] = [None] * len(labels)
    for entry, (name, value) in enumerate(labels.items()):
        try:
            class_id = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{labels_path}: entry {entry} does not map a class name to an integer id") from None
        if not 0 <= class_id < len(labels) or class_names[class_id] is not None:
            raise ValueError(f"{labels_path}: ids must be 0..{len(labels) - 1}, each once; entry {entry} is not")
        class_names[class_id] = name
    name_to_id = {name: i for i, name in enumerate(class_names)}

    path = _require(annotation_file, "the SSv2 annotation file")
    entries = _load_json(path)
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a list of samples")
    records = []
    entry_of_id: dict[str, int] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "id" not in entry or "template" not in entry:
            raise ValueError(f"{path}: entry {i} is not an SSv2 sample (an object with 'id' and 'template')")
        name = entry["template"].replace("[", "").replace("]", "")
        if name not in name_to_id:
            raise ValueError(f"{path}: entry {i} (id {entry['id']}): template {name!r} is not a class of {labels_path}")
        video_id = str(entry["id"])
        if video_id in entry_of_id:
            raise _twice(path, f"id {video_id}", f"entries {entry_of_id[video_id]}", i)
        entry_of_id[video_id] = i
        records.append(VideoRecord(str(Path(video_dir) / f"{video_id}.{video_ext}"), name_to_id[name], video_id))
    return Annotations(records, list(class_names), path)


# --- Kinetics-400 ------------------------------------------------------------------------------


def k400_clip_id(youtube_id: str, start: int, end: int) -> str:
    """The official name of a Kinetics clip (its file name without extension)."""
    return f"{youtube_id}_{start:06d}_{end:06d}"


@dataclass(frozen=True)
class K400Row:
    """One row of an official Kinetics csv.

    Attributes:
        line: its line number, for error messages.
        cells: every column by header name, stripped (the split column among them, when present).
        raw: the row as read, to write back verbatim.
        start, end: time_start and time_end as whole seconds.
    """

    line: int
    cells: dict[str, str]
    raw: list[str]
    start: int
    end: int

    @property
    def label(self) -> str:
        return self.cells["label"]

    @property
    def youtube_id(self) -> str:
        return self.cells["youtube_id"]

    @property
    def clip_id(self) -> str:
        return k400_clip_id(self.youtube_id, self.start, self.end)


def read_k400_csv(path: str | Path) -> tuple[list[str], list[K400Row]]:
    """The header and the rows of an official Kinetics csv (``label,youtube_id,time_start,time_end[,split]``).

    Blank lines are skipped; a missing column, a row of the wrong length or a time that is not a
    (finite) number is a ValueError naming the file and line.
    """
    path = Path(path)
    with io.StringIO(read_utf8(path), newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty file")
        header = [h.strip() for h in header]
        absent = [c for c in K400_COLUMNS if c not in header]
        if absent:
            raise ValueError(
                f"{path}:1: not the header of a Kinetics csv (label,youtube_id,time_start,time_end[,split]): "
                f"no column {', '.join(absent)}"
            )
        rows = []
        for row in reader:
            if not row or not any(cell.strip() for cell in row):
                continue
            where = f"{path}:{reader.line_num}"
            if len(row) != len(header):
                raise ValueError(f"{where}: expected {len(header)} columns ({','.join(header)}), got {len(row)}")
            cells = dict(zip(header, (c.strip() for c in row), strict=True))
            try:
                start, end = int(float(cells["time_start"])), int(float(cells["time_end"]))
            except (ValueError, OverflowError):  # OverflowError: "inf", "1e999"
                raise ValueError(
                    f"{where}: time_start/time_end must be numbers, got {cells['time_start']!r}, {cells['time_end']!r}"
                ) from None
            rows.append(K400Row(reader.line_num, cells, row, start, end))
    return header, rows


def k400_class_names(train_file: str | Path) -> list[str]:
    """Sorted label names of the train csv: the class ids when no label map is given."""
    path = _require(train_file, "dataset.train_file")
    return sorted({row.label for row in read_k400_csv(path)[1]})


def _class_folder(label: str) -> str:
    return label.replace(" ", "_")


class _Listings:
    """Directory listings, each read once: checking 240k files one stat at a time is slow on NFS."""

    def __init__(self) -> None:
        self._cache: dict[str, frozenset[str]] = {}

    def __call__(self, folder: str) -> frozenset[str]:
        if folder not in self._cache:
            try:
                self._cache[folder] = frozenset(os.listdir(folder))
            except (FileNotFoundError, NotADirectoryError):
                self._cache[folder] = frozenset()
        return self._cache[folder]


def load_k400(
    *,
    annotation_file: str | Path,
    class_names: list[str],
    video_dir: str | Path,
    video_ext: str,
    layout: str,
) -> Annotations:
    """An official Kinetics csv (``label,youtube_id,time_start,time_end,split``).

    Files are ``{youtube_id}_{start:06d}_{end:06d}.{video_ext}`` in `video_dir`, either flat or in
    one folder per class (the label with "_" for spaces). ``layout="auto"`` looks for each file
    in both places (flat first), so mixed trees work too.

    Args:
        annotation_file: the split's csv.
        class_names: class id -> label (from the label map or `k400_class_names`).
        video_dir: the split's video folder.
        video_ext: file extension.
        layout: "auto", "flat" or "per_class".
    """
    if layout not in K400_LAYOUTS:
        raise ValueError(f"dataset.layout={layout!r}: choose one of {list(K400_LAYOUTS)}")
    path = _require(annotation_file, "the Kinetics annotation file")
    name_to_id = {name: i for i, name in enumerate(class_names)}
    video_dir = str(Path(video_dir).expanduser())
    listing = _Listings()
    records = []
    line_of_clip: dict[str, int] = {}
    for row in read_k400_csv(path)[1]:
        label = row.label
        if label not in name_to_id:
            raise ValueError(f"{path}:{row.line}: label {label!r} is not one of the {len(class_names)} classes")
        clip_id = row.clip_id
        if clip_id in line_of_clip:
            raise _twice(path, f"clip {clip_id}", f"lines {line_of_clip[clip_id]}", row.line)
        line_of_clip[clip_id] = row.line
        name = f"{clip_id}.{video_ext}"
        flat = os.path.join(video_dir, name)
        per_class = os.path.join(video_dir, _class_folder(label), name)
        if layout == "flat":
            video = flat
        elif layout == "per_class":
            video = per_class
        elif name in listing(video_dir):
            video = flat
        elif name in listing(os.path.dirname(per_class)):
            video = per_class
        else:
            video = flat  # missing either way; reported under its flat name
        records.append(VideoRecord(video, name_to_id[label], clip_id))
    return Annotations(records, list(class_names), path)


# --- "path label" lists ------------------------------------------------------------------------


def _read_list(path: Path) -> list[tuple[int, str, int]]:
    entries = []
    line_of_video: dict[str, int] = {}
    for number, raw in enumerate(read_utf8(path).splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2:
            raise ValueError(f"{path}:{number}: expected 'path label' (a video path, a space, a class id): one field")
        try:
            label = int(parts[1])
        except ValueError:
            # Not its text: the file may be anything a config named; the line number finds it.
            raise ValueError(
                f"{path}:{number}: expected 'path label': the last field is not an integer class id"
            ) from None
        if label < 0:
            raise ValueError(f"{path}:{number}: negative label {label}")
        if label >= MAX_CLASSES:
            raise ValueError(
                f"{path}:{number}: label {label} is not a class id (at most {MAX_CLASSES - 1}): a typo, "
                "or a column other than the class?"
            )
        video = parts[0]
        if video in line_of_video:
            raise _twice(path, video, f"lines {line_of_video[video]}", number)
        line_of_video[video] = number
        entries.append((number, video, label))
    return entries


def list_num_classes(list_file: str | Path) -> int:
    """1 + the largest label of a list file (the class count when no label map is given)."""
    entries = _read_list(_require(list_file, "dataset.train_file"))
    if not entries:
        raise ValueError(f"{list_file}: no entries")
    return 1 + max(label for _, _, label in entries)


def load_list(*, list_file: str | Path, video_dir: str | Path | None, class_names: list[str]) -> Annotations:
    """A ``path label`` list (VideoMAE / MMAction2): one video a line, the label last.

    Paths may contain spaces; relative paths are joined to `video_dir` (or, when it is None, to
    the list file's folder); lines starting with "#" are comments.

    Args:
        list_file: the split's list.
        video_dir: prefix of relative paths.
        class_names: class id -> name; labels must be below its length.
    """
    path = _require(list_file, "the list file")
    base = Path(video_dir).expanduser() if video_dir is not None else path.parent
    records = []
    for number, video, label in _read_list(path):
        if label >= len(class_names):
            raise ValueError(f"{path}:{number}: label {label} but there are {len(class_names)} classes")
        records.append(VideoRecord(str(base / video), label, video))
    return Annotations(records, list(class_names), path)


# --- missing files -----------------------------------------------------------------------------


def split_missing(records: Iterable[VideoRecord]) -> tuple[list[VideoRecord], list[str]]:
    """Records whose file exists, and the paths of those that do not (one listing per folder)."""
    listing = _Listings()
    present, missing = [], []
    for record in records:
        folder, name = os.path.split(record.path)
        if name in listing(folder or "."):
            present.append(record)
        else:
            missing.append(record.path)
    return present, missing
