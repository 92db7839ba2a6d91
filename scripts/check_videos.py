"""Decode every video of a split and report which are missing, corrupt or hang the decoder.

Two ways to name the split:

    # a "path label" list (paths relative to --root, default: the list's folder)
    python scripts/check_videos.py --list data/ucf/train.txt --out-dir checks/

    # any dataset config, composed from configs/train.yaml exactly as train.py would
    python scripts/check_videos.py --split train --out-dir checks/ \\
        --config-overrides dataset=k400 dataset.root=/data/k400

Each video is opened and decoded, all its frames by default (``--frames N``: N evenly spaced
ones, as a loader would), by a pool of worker processes. Every decoder call runs in a guarded
child process (``squarefuse.datasets.decoding.video_reader``): a call that takes longer than ``--timeout``
seconds (default: the config's ``dataset.decode_timeout``; 0 decodes unguarded, as training does)
gets the child killed and the video reported as ``timeout``. The dataset's fallback decoder
(``dataset.fallback_decoder``) is tried when the first decoder fails, as in training. A bare
``--list`` takes these settings from the keys every dataset config has (dataset/base.yaml).

Outputs, in --out-dir:
    report_{split}.csv    path, status (ok | missing | corrupt | timeout), num_frames, decoder, error
    clean_{input name}    the input annotation file with only the ``ok`` videos, same format
                          (list lines verbatim; SSv2 json entries; K400 csv rows)
Use the clean file as ``dataset.{split}_file`` to train without the bad videos.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from squarefuse.config.dataset_overrides import dataset_defaults
from squarefuse.datasets.annotations import list_num_classes, load_list, read_k400_csv
from squarefuse.datasets.decoding.video_reader import DecodeError, DecodeTimeout, open_video, resolve_decoder
from squarefuse.runtime.process_pool import video_process_pool
from squarefuse.runtime.safe_text import csv_writer, printable

log = logging.getLogger("check_videos")

REPO = Path(__file__).resolve().parent.parent
STATUSES = ("ok", "missing", "corrupt", "timeout")
# Frames decoded per guarded call when checking whole videos: bounds memory and the socket copy.
CHUNK_FRAMES = 64


@dataclass
class Result:
    """The outcome for one video (one row of the report)."""

    path: str
    status: str
    num_frames: int = 0
    decoder: str = ""
    error: str = ""


def _decode_all(path: str, decoder: str, *, frames: int, timeout: float | None) -> int:
    """Decode the video (all frames, or `frames` evenly spaced ones); returns its frame count."""
    with open_video(path, decoder, timeout=timeout) as video:
        total = video.num_frames
        if frames > 0:
            wanted = np.unique(np.linspace(0, total - 1, num=min(frames, total)).round().astype(int))
            chunks = [wanted]
        else:
            chunks = [np.arange(i, min(i + CHUNK_FRAMES, total)) for i in range(0, total, CHUNK_FRAMES)]
        for chunk in chunks:
            got = video.get_frames(chunk.tolist())
            if got.shape[0] != len(chunk) or got.shape[-1] != 3:
                raise DecodeError(f"{path}: asked for {len(chunk)} frames, got {tuple(got.shape)}")
        return total


def check_video(path: str, *, decoders: tuple[str, ...], frames: int, timeout: float | None) -> Result:
    """Check one video with each decoder in turn until one reads it."""
    if not os.path.exists(path):
        return Result(path, "missing", error="no such file")
    errors, status = [], "corrupt"
    for decoder in decoders:
        try:
            num_frames = _decode_all(path, decoder, frames=frames, timeout=timeout)
        except DecodeTimeout as e:
            status = "timeout"
            errors.append(f"{decoder}: {e}")
        except DecodeError as e:
            errors.append(f"{decoder}: {e}")
        else:
            return Result(path, "ok", num_frames=num_frames, decoder=decoder, error="; ".join(errors))
    # A hang anywhere is the more urgent finding: say "timeout" even if another decoder failed.
    return Result(path, status, error="; ".join(errors))


def _check_star(job: tuple[str, dict]) -> Result:
    path, kwargs = job
    return check_video(path, **kwargs)


def run_checks(
    paths: list[str], *, decoders: tuple[str, ...], frames: int, timeout: float | None, workers: int
) -> list[Result]:
    """Check videos in a process pool; results in the order of `paths`."""
    kwargs = dict(decoders=decoders, frames=frames, timeout=timeout)
    jobs = [(p, kwargs) for p in paths]
    if workers <= 1:
        return [_check_star(job) for job in jobs]
    results = []
    start = time.monotonic()
    with video_process_pool(workers) as pool:
        for i, result in enumerate(pool.map(_check_star, jobs, chunksize=4), start=1):
            results.append(result)
            if i % 1000 == 0:
                log.info(f"{i}/{len(jobs)} videos checked ({i / (time.monotonic() - start):.1f}/s)")
    return results


# --- inputs: what to check and how to write the clean annotation file ---------------------------


@dataclass
class Split:
    """The videos of one split and how to filter its annotation file."""

    name: str
    annotation_file: Path
    format: str  # list | ssv2 | k400
    paths: list[str]  # one per record, in annotation order
    ids: list[str]  # the record ids (list path as written, SSv2 id, K400 clip name)


def split_from_list(list_file: Path, root: Path | None) -> Split:
    """A ``path label`` list; relative paths are joined to `root` (default: the list's folder)."""
    # The class names do not matter to a check; the loader only needs enough of them.
    class_names = [str(i) for i in range(list_num_classes(list_file))]
    annotations = load_list(list_file=list_file, video_dir=root, class_names=class_names)
    records = annotations.records
    return Split(
        name=list_file.stem,
        annotation_file=list_file,
        format="list",
        paths=[r.path for r in records],
        ids=[r.id for r in records],
    )


def split_from_config(overrides: list[str], split: str) -> tuple[Split, dict]:
    """The split of the dataset config that ``configs/train.yaml`` + `overrides` compose to."""
    from hydra import compose, initialize_config_dir  # noqa: PLC0415

    from squarefuse.datasets import build  # noqa: PLC0415

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    dataset_cfg = OmegaConf.to_container(cfg.dataset, resolve=True)
    name = dataset_cfg.get("name")
    # The same reader build_dataset uses, so the check sees exactly the records training sees
    # (for the synthetic set it also generates the videos if needed).
    annotations = build.load_annotations(dataset_cfg, split)
    records = annotations.records
    file_format = {"ssv2": "ssv2", "k400": "k400"}.get(name, "list")
    split_info = Split(
        name=split,
        annotation_file=annotations.source,
        format=file_format,
        paths=[r.path for r in records],
        ids=[r.id for r in records],
    )
    return split_info, dataset_cfg


def write_clean(split: Split, good_ids: set[str], out: Path) -> int:
    """Write `split`'s annotation file keeping only `good_ids`; returns the entries kept."""
    source = split.annotation_file
    kept = 0
    if split.format == "list":
        lines = []
        for raw in source.read_text(encoding="utf-8").splitlines(keepends=True):
            line = raw.strip()
            if not line or line.startswith("#"):
                lines.append(raw)  # comments and blank lines stay where they were
                continue
            if line.rsplit(maxsplit=1)[0] in good_ids:
                lines.append(raw)
                kept += 1
        out.write_text("".join(lines), encoding="utf-8")
    elif split.format == "ssv2":
        entries = json.loads(source.read_text(encoding="utf-8"))
        clean = [e for e in entries if str(e["id"]) in good_ids]
        kept = len(clean)
        out.write_text(json.dumps(clean, indent=1) + "\n", encoding="utf-8")
    else:  # k400: rows read and clip ids built by the loader's own parser
        header, rows = read_k400_csv(source)
        clean_rows = [row.raw for row in rows if row.clip_id in good_ids]
        kept = len(clean_rows)
        # The loader's input format, row for row as in the official file: not guarded for spreadsheets
        # (a `'` would become part of a label), unlike the report below.
        with open(out, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([header, *clean_rows])
    return kept


def write_report(results: list[Result], out: Path) -> None:
    """The per-video report as csv (or json when `out` ends in .json)."""
    rows = [asdict(r) for r in results]
    if out.suffix == ".json":
        out.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
        return
    fields = list(Result.__dataclass_fields__)
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv_writer(f)
        writer.writerow(fields)
        writer.writerows([row[name] for name in fields] for row in rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--list", type=Path, help="a 'path label' list file to check")
    source.add_argument(
        "--config-overrides",
        nargs="+",
        metavar="KEY=VALUE",
        help="Hydra overrides composed on configs/train.yaml (e.g. dataset=k400 dataset.root=/data/k400)",
    )
    parser.add_argument(
        "--root", type=Path, default=None, help="--list only: prefix of relative paths (default: the list's folder)"
    )
    parser.add_argument("--split", default="val", help="--config-overrides only: the split to check (default: val)")
    parser.add_argument("--out-dir", type=Path, default=Path("video_check"), help="where the report and clean file go")
    parser.add_argument("--report-format", choices=("csv", "json"), default="csv")
    parser.add_argument(
        "--decoder", default=None, help="decord | pyav | torchcodec (default: the config's dataset.decoder)"
    )
    parser.add_argument(
        "--fallback-decoder",
        default=None,
        help="tried when --decoder fails; 'none' = no retry (default: the config's dataset.fallback_decoder)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds per decoder call, 0 = unguarded (default: the config's dataset.decode_timeout)",
    )
    parser.add_argument(
        "--frames", type=int, default=0, help="decode N evenly spaced frames per video; 0 = every frame (default)"
    )
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="worker processes (default: all cores)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Run the check; returns the summary (counts per status and the output paths)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    if args.list is not None:
        if not args.list.is_file():
            raise FileNotFoundError(f"--list {args.list} does not exist")
        split = split_from_list(args.list, args.root)
        dataset_cfg = OmegaConf.to_container(dataset_defaults())  # a bare list: the keys every dataset has
    else:
        split, dataset_cfg = split_from_config(args.config_overrides, args.split)

    decoder = resolve_decoder(args.decoder or dataset_cfg["decoder"])
    fallback = args.fallback_decoder or dataset_cfg["fallback_decoder"]
    decoders = (decoder,) if fallback in (None, "none", decoder) else (decoder, resolve_decoder(fallback))
    timeout = args.timeout if args.timeout is not None else float(dataset_cfg["decode_timeout"])
    if timeout < 0:
        raise ValueError(f"--timeout={timeout}: seconds per decoder call, >= 0 (0: unguarded)")
    if timeout:
        guard = f"{timeout:g} s per decoder call"
    else:  # as in training: 0 decodes in the worker itself, so a hanging video hangs the check
        guard = "unguarded decoding (decode_timeout 0: a video that hangs the decoder hangs the check; set --timeout)"

    log.info(
        f"checking {len(split.paths)} videos of {split.annotation_file} with {'+'.join(decoders)}, "
        f"{args.workers} workers, {guard}"
    )
    start = time.monotonic()
    results = run_checks(
        split.paths, decoders=decoders, frames=args.frames, timeout=timeout or None, workers=args.workers
    )

    args.out_dir.mkdir(parents=True, exist_ok=True)
    report = args.out_dir / f"report_{split.name}.{args.report_format}"
    write_report(results, report)
    good = {record_id for record_id, r in zip(split.ids, results, strict=True) if r.status == "ok"}
    clean = args.out_dir / f"clean_{split.annotation_file.name}"
    kept = write_clean(split, good, clean)
    counts = {status: sum(r.status == status for r in results) for status in STATUSES}
    summary = {
        "counts": counts,
        "total": len(results),
        "kept": kept,
        "report": str(report),
        "clean": str(clean),
        "seconds": round(time.monotonic() - start, 1),
    }
    log.info(f"{len(results)} videos in {summary['seconds']} s: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    for result in results:
        if result.status != "ok":
            log.info(f"  {result.status:8s} {printable(result.path)}: {printable(result.error[:200])}")
    log.info(f"report: {report}\nclean annotations ({kept} videos): {clean}")
    return summary


if __name__ == "__main__":
    main()
