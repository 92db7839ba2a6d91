"""Check a Something-Something V2 folder and optionally re-encode its webm videos to H.264 mp4.

Expected layout (configs/dataset/ssv2.yaml, data/README.md):

    ROOT/annotations/something-something-v2-{labels,train,validation}.json
    ROOT/videos/{id}.webm

    python scripts/prepare_ssv2.py --root data/ssv2                 # layout report only
    python scripts/prepare_ssv2.py --root data/ssv2 --reencode      # + webm -> mp4 (H.264)

Re-encoding: VP9 webm seeking is unreliable with some decoders (decord), and H.264 decodes
faster. Every frame is kept, at the original height and frame rate (an odd width is rounded to
the next even number, which yuv420p needs). Videos are written to ``--out-dir`` (default
ROOT/videos_mp4) by a process pool; a video whose mp4 already exists is skipped, and each file
is written under a temporary name and renamed when complete, so the command can be interrupted
and run again. Afterwards it prints the overrides that make the ssv2 config read the mp4 files.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from fractions import Fraction
from pathlib import Path

import av

from squarefuse.datasets.synthetic.encoding import write_video
from squarefuse.runtime.process_pool import video_process_pool

log = logging.getLogger("prepare_ssv2")

LABELS = "something-something-v2-labels.json"
SPLITS = {"train": "something-something-v2-train.json", "validation": "something-something-v2-validation.json"}


def check_layout(root: Path, video_dir: Path, video_ext: str) -> dict:
    """Counts of annotated videos present and missing per split (ValueError if annotations are bad)."""
    # Imported here so `--help` and the re-encoding workers stay light.
    from squarefuse.datasets.annotations import load_ssv2, split_missing  # noqa: PLC0415

    annotations = root / "annotations"
    absent = [name for name in [LABELS, *SPLITS.values()] if not (annotations / name).is_file()]
    if absent:
        raise FileNotFoundError(f"{annotations} lacks {absent}: download the SSv2 annotations there")
    report = {}
    for split, name in SPLITS.items():
        loaded = load_ssv2(
            labels_file=annotations / LABELS,
            annotation_file=annotations / name,
            video_dir=video_dir,
            video_ext=video_ext,
        )
        present, missing = split_missing(loaded.records)
        report[split] = {
            "annotated": len(loaded.records),
            "present": len(present),
            "missing": len(missing),
            "missing_examples": missing[:5],
            "classes": len(loaded.class_names),
        }
    return report


def even(n: int) -> int:
    return n + (n % 2)


def reencode(source: Path, target: Path, *, crf: int, preset: str, gop: int) -> str:
    """Re-encode one video to H.264 mp4 (all frames, same size and rate) atomically: "done" or "skipped" (it exists)."""
    if target.exists():
        return "skipped"
    with av.open(str(source)) as src:
        in_stream = src.streams.video[0]
        rate = in_stream.average_rate or in_stream.guessed_rate or Fraction(12)

        def frames():
            size = None
            for frame in src.decode(in_stream):
                if size is None:
                    size = (even(frame.width), even(frame.height))
                # Frames are re-timed at a constant rate (by write_video): decoders count frames, not timestamps.
                yield frame.reformat(width=size[0], height=size[1], format="yuv420p")
            if size is None:
                raise ValueError("no frame decoded")

        # One video per worker process: the pool is the parallelism, so one encoder thread.
        options = {"crf": str(crf), "preset": preset, "g": str(gop)}
        write_video(target, frames(), rate, "libx264", options=options, container_format="mp4", threads=1)
    return "done"


def _reencode_job(job: tuple[Path, Path, dict]) -> tuple[str, str, str]:
    source, target, options = job
    try:
        return str(source), reencode(source, target, **options), ""
    except Exception as e:  # noqa: BLE001 - FFmpeg raises many kinds; report and go on
        return str(source), "failed", f"{type(e).__name__}: {e}"


def reencode_all(
    sources: list[Path], out_dir: Path, *, workers: int, crf: int, preset: str, gop: int
) -> dict[str, list]:
    """Re-encode `sources` into `out_dir` as ``{stem}.mp4`` in a process pool."""
    out_dir.mkdir(parents=True, exist_ok=True)
    options = dict(crf=crf, preset=preset, gop=gop)
    jobs = [(s, out_dir / f"{s.stem}.mp4", options) for s in sources]
    outcome: dict[str, list] = {"done": [], "skipped": [], "failed": []}
    start = time.monotonic()
    with video_process_pool(workers) as pool:
        for i, (source, status, error) in enumerate(pool.map(_reencode_job, jobs, chunksize=8), start=1):
            outcome[status].append((source, error) if error else source)
            if status == "failed":
                log.warning(f"failed: {source}: {error}")
            if i % 1000 == 0:
                log.info(f"{i}/{len(jobs)} ({i / (time.monotonic() - start):.1f} videos/s)")
    return outcome


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--root", type=Path, required=True, help="the SSv2 folder (dataset.root)")
    parser.add_argument("--video-dir", type=Path, default=None, help="the webm folder (default: ROOT/videos)")
    parser.add_argument("--reencode", action="store_true", help="re-encode every *.webm of --video-dir to H.264 mp4")
    parser.add_argument("--out-dir", type=Path, default=None, help="where the mp4 files go (default: ROOT/videos_mp4)")
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="encoding processes (default: all cores)"
    )
    parser.add_argument(
        "--crf", type=int, default=18, help="x264 quality, lower is better (default 18: visually lossless)"
    )
    parser.add_argument("--preset", default="fast", help="x264 preset (default: fast)")
    parser.add_argument(
        "--gop", type=int, default=12, help="keyframe interval in frames (default 12 = 1 s): cheap seeks"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Report the layout, re-encode if asked; returns what was found and done."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    root = args.root.expanduser()
    video_dir = (args.video_dir or root / "videos").expanduser()
    if not video_dir.is_dir():
        raise FileNotFoundError(f"--video-dir {video_dir} is not a folder")
    result: dict = {"layout": None, "reencode": None}
    if (root / "annotations").is_dir():
        result["layout"] = check_layout(root, video_dir, "webm")
        for split, counts in result["layout"].items():
            log.info(
                f"{split}: {counts['annotated']} annotated, {counts['present']} present, {counts['missing']} missing"
                + (f" (e.g. {counts['missing_examples']})" if counts["missing"] else "")
            )
    else:
        log.warning(f"{root / 'annotations'} does not exist: skipping the annotation check")

    if args.reencode:
        sources = sorted(video_dir.glob("*.webm"))
        out_dir = (args.out_dir or root / "videos_mp4").expanduser()
        log.info(f"re-encoding {len(sources)} webm videos to {out_dir} with {args.workers} processes")
        outcome = reencode_all(sources, out_dir, workers=args.workers, crf=args.crf, preset=args.preset, gop=args.gop)
        result["reencode"] = {k: len(v) for k, v in outcome.items()}
        result["failed"] = outcome["failed"]
        log.info(", ".join(f"{k}: {len(v)}" for k, v in outcome.items()))
        result["overrides"] = f"dataset=ssv2 dataset.root={root} dataset.video_dir={out_dir} dataset.video_ext=mp4"
        log.info(f"train on the mp4 files with:\n  python train.py {result['overrides']}")
    return result


if __name__ == "__main__":
    main()
