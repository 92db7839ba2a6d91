"""Built-in synthetic video dataset: files, lists and manifest of one task family, made on first use.

``task`` picks the task family (`tasks`: direction, path_shape, repetitions, speed, event_order,
event_time, acceleration, count_flashes, each isolating one temporal ability; and shape, a static
task whose single frames tell the class, for pretraining a backbone). The default,
``direction``, has eight classes in four pairs: ``move_left_to_right`` / ``move_right_to_left``,
``move_top_to_bottom`` / ``move_bottom_to_top``, ``grow`` / ``shrink``, ``turn_clockwise`` /
``turn_anticlockwise``. A shape (square, disc, triangle, arrow, L, disc with a dot; random colour
in strong luminance contrast with a tinted background, a little noise) moves across the frame,
grows, or turns; turning shapes have no rotational symmetry (a half disc, a 120-degree sector) and
turn clockwise from pointing up, through the right, to pointing down. A fixed scene lighting
(brighter to the right, redder to the bottom) makes positions show in colours too.

Every class has a *twin* that is exactly its time reversal: a sample of a twin class is
rendered as a sample of the base class played backwards. The set of frames of a video therefore
has the same distribution in both classes of a pair, so a model that pools frames without
looking at their order (``fusion=none`` with a mean over time) cannot beat chance within a pair,
while a model that sees temporal order can solve the task.

The videos are real encoded files, alternately H.264 mp4 (``libx264``, yuv420p) and VP9 webm
(``libvpx-vp9``), so the whole decode path is exercised. They are generated deterministically
(byte for byte) from the seed on first use, under a file lock so several processes (DataLoader
workers, DDP ranks) may call :func:`ensure_synthetic` at once; one generates, the others wait
and re-use the result.

Layout under ``root``::

    manifest.json                 generator version + parameters (written last)
    classes.txt                   one class name a line; line i is label i
    train.txt, val.txt, test.txt  "path label" lines, paths relative to root
    twins.txt                     "class | class" lines: the pairs whose clips hold the same frames
    videos/{split}/{class_name}/{index:04d}.{mp4|webm}
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from squarefuse.datasets.synthetic.encoding import write_video
from squarefuse.datasets.synthetic.tasks import TASKS, TWIN_PAIRS, check_num_frames, check_task, render_task_clip
from squarefuse.runtime.process_pool import die_with_parent

__all__ = ["GENERATOR_VERSION", "SyntheticSplits", "ensure_synthetic", "twins_text"]

log = logging.getLogger(__name__)

# Bump whenever the rendered content or the layout changes: existing datasets are regenerated.
# Version 6 added the task families, the test split and twins.txt; the direction videos of train
# and val are those of version 5, byte for byte. Version 7 redrew event_time's flash (off the
# distractor's track, in contrast with the lit background under it) and added acceleration and
# count_flashes; the other tasks' videos are those of version 6, byte for byte. The static task shape
# came later without a bump: it changed no other task's videos.
GENERATOR_VERSION = 7

# Each split has its own random streams, so its videos are disjoint from the others'.
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
_SPLITS = tuple(_SPLIT_CODES)

_CODECS = (  # alternated by video index so both codecs appear in every class and split
    # mbtree off: with it, libx264 reads uninitialised memory at widths such as 80 and the
    # same frames were measured to give different bytes from run to run.
    ("libx264", "mp4", "mp4", {"crf": "20", "preset": "veryfast", "x264-params": "mbtree=0"}),
    # realtime deadline: fast, and no hidden alt-ref frames (those confuse frame counts).
    ("libvpx-vp9", "webm", "webm", {"crf": "28", "b": "0", "deadline": "realtime", "cpu-used": "8"}),
)


@dataclass(frozen=True)
class SyntheticSplits:
    """Where the generated dataset lives.

    Attributes:
        root: Dataset root; paths in the list files are relative to it.
        train_list: ``root/train.txt`` with ``path label`` lines.
        val_list: ``root/val.txt`` with ``path label`` lines.
        test_list: ``root/test.txt`` with ``path label`` lines (held out: nothing is chosen on it).
        classes_file: ``root/classes.txt``, one class name a line (line i is label i).
        twins_file: ``root/twins.txt``, ``class | class`` lines: the pairs whose clips hold the
            same frames (empty for tasks without such pairs).
        class_names: The class names, in label order.
    """

    root: Path
    train_list: Path
    val_list: Path
    test_list: Path
    classes_file: Path
    twins_file: Path
    class_names: list[str]

    def list_file(self, split: str) -> Path:
        """The list file of `split` (train, val or test)."""
        if split not in _SPLITS:
            raise ValueError(f"the synthetic dataset has splits {list(_SPLITS)}, not {split!r}")
        return self.root / f"{split}.txt"


def _encode(path: Path, clip_THW3: np.ndarray, *, codec_index: int, fps: int) -> None:
    """Encodes RGB frames to ``path`` with PyAV, byte-for-byte reproducibly."""
    codec, container_format, _, options = _CODECS[codec_index]
    # bitexact: no random segment UIDs or version strings, so the same frames give the same bytes;
    # single-threaded encoders are deterministic.
    write_video(
        path,
        clip_THW3,
        fps,
        codec,
        options=options,
        container_format=container_format,
        container_options={"fflags": "+bitexact"},
        threads=1,
    )


def _video_rng(seed: int, split: str, class_index: int, index: int) -> np.random.Generator:
    # One independent stream per video: changing train_per_class keeps the first videos as they were.
    return np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_CODES[split], class_index, index]))


def _write_video(job: dict) -> None:
    clip_THW3 = render_task_clip(
        job["task"],
        job["class_index"],
        rng=_video_rng(job["seed"], job["split"], job["class_index"], job["index"]),
        num_frames=job["num_frames"],
        size=job["size"],
    )
    _encode(job["path"], clip_THW3, codec_index=job["index"] % len(_CODECS), fps=job["fps"])


def twins_text(task: str) -> str:
    """The ``twins.txt`` of a task: one ``class | class`` line per `TWIN_PAIRS` pair."""
    names = TASKS[task]
    return "".join(f"{names[a]} | {names[b]}\n" for a, b in TWIN_PAIRS[task])


def _generate(staging: Path, params: dict) -> dict[str, int]:
    """Writes videos and list files into ``staging``; returns the number of videos per split."""
    jobs = []
    counts = {}
    class_names = TASKS[params["task"]]
    for split in _SPLITS:
        per_class = params[f"{split}_per_class"]
        lines = []
        for class_index, class_name in enumerate(class_names):
            class_dir = staging / "videos" / split / class_name
            class_dir.mkdir(parents=True)
            for index in range(per_class):
                path = class_dir / f"{index:04d}.{_CODECS[index % len(_CODECS)][2]}"
                jobs.append(dict(params, path=path, class_index=class_index, index=index, split=split))
                lines.append(f"{path.relative_to(staging).as_posix()} {class_index}\n")
        (staging / f"{split}.txt").write_text("".join(lines))
        counts[split] = len(lines)
    (staging / "classes.txt").write_text("".join(f"{name}\n" for name in class_names))
    (staging / "twins.txt").write_text(twins_text(params["task"]))
    # Threads, not processes: numpy and the encoders release the GIL, and a thread pool neither
    # re-imports anything nor forks a process that may hold torch/CUDA state. Every video has
    # its own random stream, so the files do not depend on the scheduling.
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        list(pool.map(_write_video, jobs))
    return counts


def _generate_in_subprocess(staging: Path, params: dict[str, int]) -> dict[str, int]:
    """Runs :func:`_generate` in a fresh Python that has loaded nothing but numpy and PyAV.

    Why not in this process: decord bundles its own FFmpeg and libvpx and loads them globally;
    once ``import decord`` has run before PyAV's first use, PyAV's ``libvpx-vp9`` encoder fails
    to open (measured with decord 0.6.0 and av 18). The caller may well have imported decord
    already, and this module, run as a script, imports only numpy, PyAV and two small modules of
    the package (synthetic.encoding, runtime.process_pool).

    It gets this process's pid to die with: a trainer killed with SIGKILL while it generates
    would otherwise leave the generator running for minutes (it writes only into ``staging``,
    which the next ``ensure_synthetic`` removes).
    """
    command = [sys.executable, str(Path(__file__).resolve()), str(staging), json.dumps(params), str(os.getpid())]
    result = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise RuntimeError(
            f"generating the synthetic dataset in {staging} failed (exit code {result.returncode}):\n"
            f"{result.stderr[-3000:]}"
        )
    return json.loads(result.stdout.strip().splitlines()[-1])


def _validate_params(params: dict) -> None:
    check_task(params["task"])
    for key, value in params.items():
        if key == "task":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"dataset.generate.{key} must be an integer, got {value!r}")
    minimum = {
        "seed": 0,
        "train_per_class": 1,
        "val_per_class": 1,
        "test_per_class": 1,
        "num_frames": 2,
        "size": 32,
        "fps": 1,
    }
    for key, low in minimum.items():
        if params[key] < low:
            raise ValueError(f"dataset.generate.{key} must be >= {low}, got {params[key]}")
    check_num_frames(params["task"], params["num_frames"])
    if params["size"] % 2:
        raise ValueError(f"dataset.generate.size must be even (yuv420p), got {params['size']}")


def _splits(root: Path, task: str) -> SyntheticSplits:
    return SyntheticSplits(
        root=root,
        train_list=root / "train.txt",
        val_list=root / "val.txt",
        test_list=root / "test.txt",
        classes_file=root / "classes.txt",
        twins_file=root / "twins.txt",
        class_names=list(TASKS[task]),
    )


def _why_stale(root: Path, expected: dict) -> str | None:
    """Returns why the dataset under ``root`` cannot be re-used, or None if it can."""
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        return "no manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        return f"unreadable {manifest_path}: {error}"
    for key in ("version", "params", "class_names"):
        if manifest.get(key) != expected[key]:
            return f"manifest {key}={manifest.get(key)!r}, wanted {expected[key]!r}"
    for name in _LIST_NAMES:
        if not (root / name).is_file():
            return f"{root / name} is missing"
    for split in _SPLITS:
        for line in (root / f"{split}.txt").read_text().splitlines():
            if not (root / line.rsplit(" ", 1)[0]).is_file():
                return f"{root / line.rsplit(' ', 1)[0]} is missing"
    return None


# What the generator may find in a root besides its files: its lock and its staging folders.
_LOCK_NAME = ".lock"
_STAGING_PREFIX = ".staging-"
# Written before generated files are moved in and removed after the manifest: so files of an
# interrupted move are still known to be the generator's own.
_PENDING_NAME = ".generating.json"
_LIST_NAMES = ("classes.txt", "train.txt", "val.txt", "test.txt", "twins.txt")


def _generated_files(staging: Path) -> list[str]:
    """Every file the generator wrote under ``staging``, as sorted root-relative POSIX paths."""
    return sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())


def _owned_files(root: Path) -> set[str]:
    """The root-relative paths the generator wrote under ``root``, from its manifest and pending list.

    A manifest from before the file list (generator version <= 4) names its videos through
    ``train.txt`` / ``val.txt``, which it wrote too.
    """
    owned: set[str] = set()
    for name in ("manifest.json", _PENDING_NAME):
        path = root / name
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            continue
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue  # not ours to read, so it claims nothing
        if not isinstance(record, dict) or "version" not in record:
            continue
        owned.add(name)
        files = record.get("files")
        if isinstance(files, list):
            owned.update(f for f in files if isinstance(f, str))
            continue
        owned.update(_LIST_NAMES)
        for split in _SPLITS:
            list_path = root / f"{split}.txt"
            if list_path.is_file():
                owned.update(line.rsplit(" ", 1)[0] for line in list_path.read_text().splitlines() if line)
    return owned


def _foreign_files(root: Path, owned: set[str]) -> list[Path]:
    """Files under ``root`` that the generator did not write (its lock and staging folders aside)."""
    foreign = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if relative.parts[0] == _LOCK_NAME or relative.parts[0].startswith(_STAGING_PREFIX):
            continue
        if not path.is_dir() and relative.as_posix() not in owned:
            foreign.append(path)
    return foreign


def _not_a_synthetic_root(root: Path, foreign: list[Path]) -> ValueError:
    if (root / "annotations").is_dir() and any((root / "annotations").glob("something-something-v2-*.json")):
        guess = "it looks like Something-Something V2: dataset=ssv2"
    elif any(root.glob("*.csv")) or any(root.rglob("annotations/*.csv")):
        guess = "it looks like Kinetics: dataset=k400"
    elif (root / "train.txt").is_file():
        guess = "it has a train.txt list: dataset=list"
    else:
        guess = "for your own videos use dataset=ssv2, dataset=k400 or dataset=list"
    shown = ", ".join(str(p) for p in foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
    return ValueError(
        f"dataset.root={root} holds files the synthetic generator did not write ({shown}), so it is not a "
        f"synthetic dataset folder and nothing in it was changed. If it is a real dataset, select its format ("
        f"{guess} dataset.root={root}); for synthetic videos give dataset.root an empty or new folder "
        f"(the default is data/synthetic)."
    )


def _remove_generated(root: Path, owned: set[str]) -> None:
    """Deletes the generator's own files, manifest first so an interrupted delete never looks complete.

    Only paths in ``owned`` are deleted, then the folders that became empty: nothing else is touched.
    """
    for name in ("manifest.json", *_LIST_NAMES):
        if name in owned:
            (root / name).unlink(missing_ok=True)
    for relative in sorted(owned):
        if relative != _PENDING_NAME:
            (root / relative).unlink(missing_ok=True)
    videos = root / "videos"
    if videos.is_dir():
        for folder in sorted((p for p in videos.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            if not any(folder.iterdir()):
                folder.rmdir()
        if not any(videos.iterdir()):
            videos.rmdir()
    (root / _PENDING_NAME).unlink(missing_ok=True)
    for staging in root.glob(_STAGING_PREFIX + "*"):  # left by a crashed generator; we hold the lock
        shutil.rmtree(staging, ignore_errors=True)


def _regenerate(root: Path, owned: set[str], task: str, params: dict, expected: dict) -> None:
    """With the lock held: remove the old generated files, generate into a staging folder, move it in place.

    ``manifest.json`` is moved last, so that a crash never leaves a dataset that looks complete.
    """
    start = time.perf_counter()
    _remove_generated(root, owned)
    staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=root))
    try:
        counts = _generate_in_subprocess(staging, params)
        files = _generated_files(staging)
        manifest = json.dumps({**expected, "num_videos": counts, "files": ["manifest.json", *files]}, indent=2)
        # Claim the files before they appear in root, so that a crash mid-move leaves them ours.
        (staging / _PENDING_NAME).write_text(manifest + "\n")
        os.replace(staging / _PENDING_NAME, root / _PENDING_NAME)
        (staging / "manifest.json").write_text(manifest + "\n")
        os.replace(staging / "videos", root / "videos")
        for name in _LIST_NAMES:
            os.replace(staging / name, root / name)
        os.replace(staging / "manifest.json", root / "manifest.json")
        (root / _PENDING_NAME).unlink()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info(
        "Generated %d train + %d val + %d test synthetic videos (task %s) in %.1f s",
        counts["train"],
        counts["val"],
        counts["test"],
        task,
        time.perf_counter() - start,
    )


def ensure_synthetic(
    root: str | Path,
    *,
    task: str,
    seed: int,
    train_per_class: int,
    val_per_class: int,
    test_per_class: int,
    num_frames: int,
    size: int,
    fps: int,
) -> SyntheticSplits:
    """Generates the synthetic dataset under ``root`` unless an identical one is already there.

    Safe to call from several processes at once: an exclusive ``fcntl.flock`` on ``root/.lock``
    lets one process generate while the others wait, then re-use its result. The dataset is
    written to a staging folder and moved in place, and ``manifest.json`` (generator version and
    parameters, the task included) is written last, so a crash never leaves a dataset that looks
    complete. A manifest with other parameters, another task or another version makes it
    regenerate (keep one root per task to switch tasks without regenerating).

    Every parameter is required: the defaults are configs/dataset/synthetic.yaml's `generate` block.

    Args:
        root: Dataset folder (created if needed).
        task: The task family (`tasks.TASKS`); ``direction`` is the default data.
        seed: Seed of all randomness; the same seed gives byte-identical files (with the same
            FFmpeg/PyAV build).
        train_per_class: Training videos per class.
        val_per_class: Validation videos per class.
        test_per_class: Held-out test videos per class.
        num_frames: Frames per video.
        size: Frame height and width in pixels (even, for yuv420p).
        fps: Frame rate written into the files.

    Returns:
        Paths of the list files and the class names.

    Raises:
        ValueError: A parameter is out of range.
    """
    params = {
        "seed": seed,
        "train_per_class": train_per_class,
        "val_per_class": val_per_class,
        "test_per_class": test_per_class,
        "num_frames": num_frames,
        "size": size,
        "fps": fps,
    }
    _validate_params({"task": task, **params})
    params = {"task": str(task), **{key: int(value) for key, value in params.items()}}
    expected = {"version": GENERATOR_VERSION, "params": params, "class_names": list(TASKS[task])}
    root = Path(root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)

    with open(root / _LOCK_NAME, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed, even on error
        reason = _why_stale(root, expected)
        if reason is None:
            return _splits(root, task)
        if (root / "manifest.json").exists():
            log.warning("Regenerating synthetic dataset in %s: %s", root, reason)
        else:
            log.info("Generating synthetic dataset in %s", root)
        owned = _owned_files(root)
        foreign = _foreign_files(root, owned)
        if foreign:
            raise _not_a_synthetic_root(root, foreign)
        _regenerate(root, owned, task, params, expected)
    return _splits(root, task)


if __name__ == "__main__":
    # `python synthetic.py STAGING PARAMS_JSON PARENT_PID`: how ensure_synthetic runs the generator.
    die_with_parent(int(sys.argv[3]))
    print(json.dumps(_generate(Path(sys.argv[1]), json.loads(sys.argv[2]))))
