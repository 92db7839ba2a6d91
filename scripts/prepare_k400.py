"""Lay out Kinetics-400 the way configs/dataset/k400.yaml reads it, resized to a short side of 320.

    python scripts/prepare_k400.py --csv kinetics400/train.csv kinetics400/validate.csv \\
        --source /downloads/k400 --out data/k400

For every row of the official csv files (``label,youtube_id,time_start,time_end,split``) it writes

    OUT/videos/{split}/{youtube_id}_{start:06d}_{end:06d}.mp4     H.264, short side --short-side
    OUT/annotations/{split}.csv                                    the rows of that split

``--source`` is searched recursively for videos (.mp4 .mkv .webm .avi .mov .flv) of two kinds:
  * already-trimmed clips with the official name ``{youtube_id}_{start:06d}_{end:06d}.*``, in any
    sub-folder (e.g. one folder per class): only resized and re-encoded;
  * full downloads named by YouTube id, ``{youtube_id}.*``: cut to [time_start, time_end) and
    resized.
Frames keep their rate; audio is dropped (the models use none); videos smaller than the short side
are not upscaled (an odd size is rounded to even, which yuv420p needs). A process pool does the
work; a clip whose output exists is skipped, and every file is written under a temporary name
and renamed when complete, so the command can be interrupted and run again. Clips without a
source are listed in OUT/missing_{split}.txt; a report of every clip is OUT/prepare_report.csv.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import re
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av

from squarefuse.datasets.synthetic.encoding import write_video
from squarefuse.runtime.process_pool import video_process_pool
from squarefuse.runtime.safe_text import csv_writer

log = logging.getLogger("prepare_k400")

VIDEO_EXTENSIONS = {".mp4", ".mkv", ".webm", ".avi", ".mov", ".flv"}
TRIMMED_NAME = re.compile(r"^(?P<youtube_id>.+)_(?P<start>\d{6})_(?P<end>\d{6})$")
SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "validate": "val",
    "validation": "val",
    "test": "test",
}


@dataclass(frozen=True)
class Clip:
    """One csv row: which clip to cut and where it goes."""

    split: str
    label: str
    youtube_id: str
    start: int
    end: int
    name: str  # the official clip name, {youtube_id}_{start:06d}_{end:06d}


def split_name(value: str, *, where: str) -> str:
    key = value.strip().lower()
    if key not in SPLIT_NAMES:
        raise ValueError(f"{where}: unknown split {value!r}; expected one of {sorted(SPLIT_NAMES)}")
    return SPLIT_NAMES[key]


def read_csv(path: Path) -> tuple[list[str], list[tuple[Clip, list[str]]]]:
    """The header and (clip, raw row) pairs of an official csv; the split comes from the `split`
    column, or from the file name (train/validate/val/test.csv) when there is none."""
    # Imported here so `--help` and the encoding workers stay light.
    from squarefuse.datasets.annotations import read_k400_csv  # noqa: PLC0415

    header, rows = read_k400_csv(path)
    default_split = None
    if "split" not in header:
        default_split = split_name(path.stem, where=f"{path} (no split column; split from the file name)")
    clips = []
    for row in rows:
        split = default_split or split_name(row.cells["split"], where=f"{path}:{row.line}")
        clips.append((Clip(split, row.label, row.youtube_id, row.start, row.end, row.clip_id), row.raw))
    return header, clips


def index_sources(source: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """Videos under `source`: (trimmed clips by official name, full downloads by YouTube id)."""
    trimmed, full = {}, {}
    for folder, _, files in os.walk(source):
        for file in files:
            path = Path(folder, file)
            if path.suffix.lower() not in VIDEO_EXTENSIONS or file.startswith("."):
                continue
            (trimmed if TRIMMED_NAME.match(path.stem) else full).setdefault(path.stem, path)
    return trimmed, full


def target_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) with the short side at `short_side` (never upscaled), both even."""
    short = min(width, height)
    if short_side > 0 and short > short_side:
        scale = short_side / short
        width, height = round(width * scale), round(height * scale)
    return width + width % 2, height + height % 2


def convert(
    source: Path,
    target: Path,
    *,
    start: float | None,
    end: float | None,
    short_side: int,
    crf: int,
    preset: str,
) -> str:
    """Cut [start, end) seconds of `source` (None: the whole file), resize, encode H.264 to `target`.

    Returns "done", or "skipped" where the target exists.
    """
    if target.exists():
        return "skipped"
    with av.open(str(source)) as src:
        in_stream = src.streams.video[0]
        rate = in_stream.average_rate or in_stream.guessed_rate or Fraction(30)
        offset = float((in_stream.start_time or 0) * in_stream.time_base) if in_stream.time_base else 0.0
        if start is not None and start > 0 and in_stream.time_base:
            # To the keyframe before `start`; frames before it are decoded and dropped below.
            src.seek(int((start + offset) / in_stream.time_base), stream=in_stream, backward=True)

        def frames():
            size = None
            for frame in src.decode(in_stream):
                t = (frame.time or 0.0) - offset
                if start is not None and t < start - 1e-6:
                    continue
                if end is not None and t >= end - 1e-6:
                    break
                if size is None:
                    size = target_size(frame.width, frame.height, short_side)
                yield frame.reformat(width=size[0], height=size[1], format="yuv420p", interpolation="AREA")
            if size is None:
                raise ValueError(f"no frame between {start} s and {end} s")

        # One clip per worker process: the pool is the parallelism, so one encoder thread.
        options = {"crf": str(crf), "preset": preset, "g": str(max(1, round(rate)))}
        write_video(target, frames(), rate, "libx264", options=options, container_format="mp4", threads=1)
    return "done"


def _convert_job(job: tuple[str, Path, Path, dict]) -> tuple[str, str, str]:
    name, source, target, options = job
    try:
        return name, convert(source, target, **options), ""
    except Exception as e:  # noqa: BLE001 - FFmpeg raises many kinds; report and go on
        return name, "failed", f"{type(e).__name__}: {e}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--csv", type=Path, nargs="+", required=True, help="official annotation csv files")
    parser.add_argument("--source", type=Path, required=True, help="folder searched recursively for the videos")
    parser.add_argument("--out", type=Path, required=True, help="the dataset folder to write (dataset.root)")
    parser.add_argument(
        "--short-side", type=int, default=320, help="resize so the short side is this (0 = keep; default 320)"
    )
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="encoding processes (default: all cores)"
    )
    parser.add_argument("--crf", type=int, default=20, help="x264 quality, lower is better (default 20)")
    parser.add_argument("--preset", default="fast", help="x264 preset (default: fast)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Prepare the clips; returns counts per status (done, skipped, missing, failed)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    if not args.source.is_dir():
        raise FileNotFoundError(f"--source {args.source} is not a folder")
    rows_by_split: dict[str, tuple[list[str], list[list[str]]]] = {}
    clips: list[Clip] = []
    for path in args.csv:
        if not path.is_file():
            raise FileNotFoundError(f"--csv {path} does not exist")
        header, pairs = read_csv(path)
        for clip, row in pairs:
            rows_by_split.setdefault(clip.split, (header, []))[1].append(row)
            clips.append(clip)

    trimmed, full = index_sources(args.source)
    log.info(
        f"{len(clips)} clips in {len(args.csv)} csv files; "
        f"sources: {len(trimmed)} trimmed clips, {len(full)} full videos"
    )
    options = dict(short_side=args.short_side, crf=args.crf, preset=args.preset)
    jobs, report = [], []
    missing: dict[str, list[str]] = {}
    for clip in clips:
        target = args.out / "videos" / clip.split / f"{clip.name}.mp4"
        if clip.name in trimmed:
            jobs.append((clip.name, trimmed[clip.name], target, dict(options, start=None, end=None)))
        elif clip.youtube_id in full:
            jobs.append((clip.name, full[clip.youtube_id], target, dict(options, start=clip.start, end=clip.end)))
        elif target.exists():
            report.append((clip.name, clip.split, "skipped", ""))
        else:
            missing.setdefault(clip.split, []).append(clip.name)
            report.append((clip.name, clip.split, "missing", "no source video"))

    split_of = {clip.name: clip.split for clip in clips}
    start_time = time.monotonic()
    with video_process_pool(args.workers) as pool:
        for i, (name, status, error) in enumerate(pool.map(_convert_job, jobs, chunksize=4), start=1):
            report.append((name, split_of[name], status, error))
            if status == "failed":
                log.warning(f"failed: {name}: {error}")
            if i % 1000 == 0:
                log.info(f"{i}/{len(jobs)} ({i / (time.monotonic() - start_time):.1f} clips/s)")

    (args.out / "annotations").mkdir(parents=True, exist_ok=True)
    for split, (header, rows) in rows_by_split.items():
        # The loader's input format (the official csv's rows): not guarded for spreadsheets, since a
        # `'` would become part of a label; the report below is.
        with open(args.out / "annotations" / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([header, *rows])
        (args.out / f"missing_{split}.txt").write_text("".join(f"{n}\n" for n in missing.get(split, [])))
    with open(args.out / "prepare_report.csv", "w", newline="", encoding="utf-8") as f:
        csv_writer(f).writerows([("clip", "split", "status", "error"), *report])
    counts = {s: sum(r[2] == s for r in report) for s in ("done", "skipped", "missing", "failed")}
    log.info(", ".join(f"{k}: {v}" for k, v in counts.items()) + f"; report: {args.out / 'prepare_report.csv'}")
    log.info(f"train with:  python train.py dataset=k400 dataset.root={args.out}")
    return counts


if __name__ == "__main__":
    main()
