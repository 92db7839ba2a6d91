"""Built-in synthetic video dataset: moving, growing and turning shapes in time-reversed pairs.

Eight classes in four pairs: ``move_left_to_right`` / ``move_right_to_left``,
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
    train.txt, val.txt            "path label" lines, paths relative to root
    videos/{split}/{class_name}/{index:04d}.{mp4|webm}
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
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
from squarefuse.runtime.process_pool import die_with_parent

log = logging.getLogger(__name__)

# Bump whenever the rendered content or the layout changes: existing datasets are regenerated.
GENERATOR_VERSION = 5

# Class 2k is a base motion, class 2k+1 its exact time reversal.
CLASS_NAMES = (
    "move_left_to_right",
    "move_right_to_left",
    "move_top_to_bottom",
    "move_bottom_to_top",
    "grow",
    "shrink",
    "turn_clockwise",
    "turn_anticlockwise",
)
_BASE_MOTIONS = ("move_x", "move_y", "scale", "turn")

# Turning needs shapes without rotational symmetry, or the direction of a turn is invisible. A half
# disc and a 120-degree sector turning about the disc's centre carry much of their area from the
# top, through the right, to the bottom, as a move down carries all of it. A clock hand and a dot
# on a disc (generator version 4) moved about a third of that mass, and the tiny ViT learned their
# turns late for some seeds: under other float rounding 2 of 3 seeds ended at 87-89 % val top-1,
# nearly all misses in the turning pair.
_ALL_SHAPES = ("square", "disc", "triangle", "arrow", "ell", "dotted_disc")
_TURN_SHAPES = ("half_disc", "sector")

_SPLIT_CODES = {"train": 0, "val": 1}
_SUPERSAMPLE = 2  # anti-aliasing: shapes are rasterised on a 2x grid and averaged
_NOISE_STD = 4.0  # per-pixel Gaussian noise (uint8 units), fresh in every frame
# Fixed scene lighting, the same in every video: brighter towards the right, bluer towards the top
# and redder towards the bottom. A shape's position then shows in its colour, a global statistic
# that a small ViT trained from scratch reads early (as it reads size), instead of first having
# to learn position embeddings: measured on the default set, the tiny model reached 94-97% val
# top-1 within 1200 steps for seeds that stayed at 45-60% without the lighting. Every frame is
# lit alike, so time order still decides each pair.
_LIGHT_GAIN = (0.6, 1.4)  # brightness multiplier at the left and at the right edge
_LIGHT_CAST = 40.0  # red-minus-blue shift from the top to the bottom edge (uint8 units)

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
        classes_file: ``root/classes.txt``, one class name a line (line i is label i).
        class_names: The class names, in label order.
    """

    root: Path
    train_list: Path
    val_list: Path
    classes_file: Path
    class_names: list[str]


@dataclass(frozen=True)
class ClipParams:
    """Random appearance and motion of one clip of a base motion (sizes in pixels).

    Attributes:
        motion: One of ``move_x``, ``move_y``, ``scale``, ``turn``.
        shape: One of the shape names (``square``, ``disc``, ``triangle``, ``arrow``, ``ell``,
            ``dotted_disc``, and ``half_disc``, ``sector`` for turning only).
        colour: Shape RGB colour, 0..255.
        dot_colour: RGB colour of the dot of ``dotted_disc`` (unused by other shapes).
        background: Background RGB tint, 0..255.
        gradient: Background brightness change across the frame (x, y), in uint8 units.
        start: (cx, cy, radius, angle) at the first frame of the base motion; angle in radians,
            clockwise on screen.
        end: (cx, cy, radius, angle) at the last frame of the base motion.
    """

    motion: str
    shape: str
    colour: tuple[float, float, float]
    dot_colour: tuple[float, float, float]
    background: tuple[float, float, float]
    gradient: tuple[float, float]
    start: tuple[float, float, float, float]
    end: tuple[float, float, float, float]


def twin_of(class_index: int) -> int:
    """Returns the class whose videos are the time reversal of ``class_index``'s."""
    return class_index ^ 1


def _luma(rgb: np.ndarray) -> float:
    return float(0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])


def _contrasting_colour(rng: np.random.Generator, *, against: np.ndarray, min_luma_difference: float) -> np.ndarray:
    """Draws an RGB colour whose luminance differs from ``against``'s by at least the minimum."""
    while True:  # `against` is never mid-grey enough to make this loop long (<= 1/3 rejected)
        colour = rng.uniform(0.0, 255.0, size=3)
        if abs(_luma(colour) - _luma(against)) >= min_luma_difference:
            return colour


def sample_clip_params(motion: str, *, rng: np.random.Generator, size: int) -> ClipParams:
    """Draws the appearance and the trajectory end points of one base-motion clip.

    Motions are large (about half the frame), shapes big (moving ones 40-50% of the frame
    across) and in strong luminance contrast with the background, so that they stay clearly
    visible after a RandomResizedCrop down to 64 px.

    Args:
        motion: Base motion, one of ``move_x``, ``move_y``, ``scale``, ``turn``.
        rng: Random generator; the only source of randomness.
        size: Frame height and width in pixels.

    Returns:
        The clip's parameters.
    """
    if motion not in _BASE_MOTIONS:
        raise ValueError(f"unknown synthetic motion {motion!r}; expected one of {_BASE_MOTIONS}")
    # Contrast in luminance, not only in colour: a shape stands out whatever its hue, which a
    # small ViT trained from scratch picks up much sooner.
    grey = rng.uniform(25.0, 85.0) if rng.random() < 0.5 else rng.uniform(170.0, 230.0)
    background = np.clip(grey + rng.uniform(-15.0, 15.0, size=3), 0.0, 255.0)
    gradient = rng.uniform(-10.0, 10.0, size=2)
    colour = _contrasting_colour(rng, against=background, min_luma_difference=100.0)
    dot_colour = _contrasting_colour(rng, against=colour, min_luma_difference=90.0)
    shape = str(rng.choice(_TURN_SHAPES if motion == "turn" else _ALL_SHAPES))
    angle = rng.uniform(0.0, 2.0 * math.pi)
    s = float(size)

    if motion in ("move_x", "move_y"):
        radius = rng.uniform(0.2, 0.26) * s
        along_start = rng.uniform(0.18, 0.3) * s
        along_end = rng.uniform(0.7, 0.82) * s
        across = rng.uniform(0.3, 0.7) * s
        if motion == "move_x":
            start = (along_start, across, radius, angle)
            end = (along_end, across, radius, angle)
        else:
            start = (across, along_start, radius, angle)
            end = (across, along_end, radius, angle)
    elif motion == "scale":
        cx, cy = rng.uniform(0.4, 0.6, size=2) * s
        start = (cx, cy, rng.uniform(0.07, 0.1) * s, angle)
        end = (cx, cy, rng.uniform(0.3, 0.36) * s, angle)
    else:
        # turn: clockwise on screen by 150..200 degrees, from pointing up (+-30 degrees) through
        # the right to pointing down. A fixed starting side makes the direction a linear read-out
        # of the shape's vertical motion; from any start angle it is the sign of a product
        # (position x motion), which the tiny ViT took several times longer to learn.
        cx, cy = rng.uniform(0.42, 0.58, size=2) * s
        # As large as the frame allows: the shape's centroid then travels about 0.3-0.5 of the
        # frame from top to bottom (a moving shape: 0.4-0.64). At radius 0.3-0.36 the turns were
        # learned later (val top-1 after 8 epochs, 2 threads, seed 2: 74 % instead of 94 %) and
        # one run in five still ended at 93 %, its misses all in the turning pair.
        radius = rng.uniform(0.4, 0.46) * s
        angle = math.radians(rng.uniform(-120.0, -60.0))  # 0 points right, -90 up
        start = (cx, cy, radius, angle)
        end = (cx, cy, radius, angle + math.radians(rng.uniform(150.0, 200.0)))

    return ClipParams(
        motion=motion,
        shape=shape,
        colour=tuple(float(c) for c in colour),
        dot_colour=tuple(float(c) for c in dot_colour),
        background=tuple(float(c) for c in background),
        gradient=(float(gradient[0]), float(gradient[1])),
        start=tuple(float(v) for v in start),
        end=tuple(float(v) for v in end),
    )


def _base_trajectory(params: ClipParams, num_frames: int) -> np.ndarray:
    """Linear interpolation from ``params.start`` to ``params.end``: float64 [num_frames, 4]."""
    t_T1 = np.linspace(0.0, 1.0, num_frames)[:, None]
    return (1.0 - t_T1) * np.asarray(params.start) + t_T1 * np.asarray(params.end)


def class_trajectory(class_index: int, params: ClipParams, num_frames: int) -> np.ndarray:
    """Per-frame (cx, cy, radius, angle) of a clip of ``class_index`` drawn with ``params``.

    A twin (odd) class plays its base class's trajectory backwards.

    Args:
        class_index: Label, 0..len(CLASS_NAMES)-1.
        params: Parameters drawn by :func:`sample_clip_params` for the class's base motion.
        num_frames: Number of frames.

    Returns:
        float64 array [num_frames, 4].
    """
    _check_class_index(class_index)
    if params.motion != _BASE_MOTIONS[class_index // 2]:
        raise ValueError(f"params.motion={params.motion!r} does not belong to class {CLASS_NAMES[class_index]!r}")
    traj_T4 = _base_trajectory(params, num_frames)
    return traj_T4[::-1].copy() if class_index % 2 else traj_T4


def _shape_masks(shape: str, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Inside-masks of a shape in its own unit coordinates (u right, v down, radius 1).

    Returns:
        (body, dot): boolean masks; ``dot`` is None except for ``dotted_disc``.
    """
    if shape == "square":
        return (np.abs(u) <= 0.75) & (np.abs(v) <= 0.75), None
    if shape == "disc":
        return u * u + v * v <= 0.85**2, None
    if shape == "triangle":
        # Equilateral, inscribed in the unit circle, apex pointing up (-v).
        return (v <= 0.5) & (math.sqrt(3.0) * u - v <= 1.0) & (-math.sqrt(3.0) * u - v <= 1.0), None
    if shape == "arrow":
        shaft = (u >= -0.95) & (u <= 0.15) & (np.abs(v) <= 0.22)
        head = (u >= 0.15) & (np.abs(v) <= 0.65 * (0.95 - u) / 0.8)
        return shaft | head, None
    if shape == "half_disc":  # the half pointing along +u
        return (u * u + v * v <= 0.9**2) & (u >= 0.0), None
    if shape == "sector":  # a 120-degree slice of a disc, centred on +u
        return (u * u + v * v <= 0.95**2) & (np.abs(v) <= math.tan(math.radians(60.0)) * u), None
    if shape == "ell":
        upright = (u >= -0.7) & (u <= -0.2) & (v >= -0.85) & (v <= 0.85)
        foot = (u >= -0.7) & (u <= 0.7) & (v >= 0.35) & (v <= 0.85)
        return upright | foot, None
    if shape == "dotted_disc":
        body = u * u + v * v <= 0.9**2
        dot = (u - 0.55) ** 2 + v * v <= 0.33**2
        return body, dot
    raise ValueError(f"unknown synthetic shape {shape!r}; expected one of {_ALL_SHAPES + _TURN_SHAPES}")


def _coverage(mask: np.ndarray) -> np.ndarray:
    """Fraction of each pixel's sub-samples inside a supersampled mask: float32 [H, W, 1]."""
    ss = _SUPERSAMPLE
    hits = sum(mask[i::ss, j::ss].astype(np.float32) for i in range(ss) for j in range(ss))
    return hits[..., None] * (1.0 / (ss * ss))


def draw_frames(params: ClipParams, traj_T4: np.ndarray, *, size: int) -> np.ndarray:
    """Draws the shape of ``params`` along a trajectory onto its background, lit, without noise.

    Args:
        params: Appearance (shape, colours, background).
        traj_T4: Per-frame (cx, cy, radius, angle), e.g. from :func:`class_trajectory`.
        size: Frame height and width in pixels.

    Returns:
        float32 array [T, size, size, 3], values in 0..255.
    """
    ss = _SUPERSAMPLE
    coords = (np.arange(size * ss, dtype=np.float32) + 0.5) / ss  # pixel-centre coordinates
    y_HW, x_HW = np.meshgrid(coords, coords, indexing="ij")
    ramp = np.linspace(-0.5, 0.5, size, dtype=np.float32)
    background_HW3 = (
        np.asarray(params.background, dtype=np.float32)
        + params.gradient[0] * ramp[None, :, None]
        + params.gradient[1] * ramp[:, None, None]
    )
    colour = np.asarray(params.colour, dtype=np.float32)
    dot_colour = np.asarray(params.dot_colour, dtype=np.float32)

    frames = np.empty((len(traj_T4), size, size, 3), dtype=np.float32)
    for t, (cx, cy, radius, angle) in enumerate(traj_T4):
        dx, dy = x_HW - cx, y_HW - cy
        cos_a, sin_a = math.cos(angle), math.sin(angle)
        # Inverse of a clockwise-on-screen rotation (image y points down).
        u = (dx * cos_a + dy * sin_a) / radius
        v = (-dx * sin_a + dy * cos_a) / radius
        body, dot = _shape_masks(params.shape, u, v)
        cover_body = _coverage(body)
        frame = background_HW3 + (colour - background_HW3) * cover_body
        if dot is not None:
            cover_dot = _coverage(dot & body)
            frame += (dot_colour - frame) * cover_dot
        frames[t] = frame
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    gain_W1 = (_LIGHT_GAIN[0] + (_LIGHT_GAIN[1] - _LIGHT_GAIN[0]) * ramp)[:, None]
    cast_H13 = (ramp - 0.5)[:, None, None] * np.asarray([_LIGHT_CAST, 0.0, -_LIGHT_CAST], dtype=np.float32)
    return np.clip(frames * gain_W1 + cast_H13, 0.0, 255.0)


def render_clip(class_index: int, *, rng: np.random.Generator, num_frames: int, size: int) -> np.ndarray:
    """Renders one clip of a class (before encoding).

    The base motion is drawn and rendered, noise included, in its own time order; a twin class
    then reverses the frames. So ``render_clip(c ^ 1, rng=R)`` equals
    ``render_clip(c, rng=R)[::-1]`` for generators ``R`` in the same state.

    Args:
        class_index: Label, 0..len(CLASS_NAMES)-1.
        rng: Random generator; the only source of randomness.
        num_frames: Number of frames.
        size: Frame height and width in pixels.

    Returns:
        uint8 array [num_frames, size, size, 3] (RGB).
    """
    _check_class_index(class_index)
    base_class = class_index & ~1
    params = sample_clip_params(_BASE_MOTIONS[base_class // 2], rng=rng, size=size)
    frames = draw_frames(params, class_trajectory(base_class, params, num_frames), size=size)
    # Luminance noise (one value per pixel for all channels) is a third of the cost of RGB noise.
    frames += _NOISE_STD * rng.standard_normal(size=frames.shape[:3] + (1,), dtype=np.float32)
    clip_THW3 = np.clip(np.rint(frames, out=frames), 0, 255, out=frames).astype(np.uint8)
    return clip_THW3[::-1].copy() if class_index % 2 else clip_THW3


def _check_class_index(class_index: int) -> None:
    if not 0 <= class_index < len(CLASS_NAMES):
        raise ValueError(f"class_index={class_index} out of range 0..{len(CLASS_NAMES) - 1}")


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
    clip_THW3 = render_clip(
        job["class_index"],
        rng=_video_rng(job["seed"], job["split"], job["class_index"], job["index"]),
        num_frames=job["num_frames"],
        size=job["size"],
    )
    _encode(job["path"], clip_THW3, codec_index=job["index"] % len(_CODECS), fps=job["fps"])


def _generate(staging: Path, params: dict[str, int]) -> dict[str, int]:
    """Writes videos and list files into ``staging``; returns the number of videos per split."""
    jobs = []
    counts = {}
    for split, per_class in (("train", params["train_per_class"]), ("val", params["val_per_class"])):
        lines = []
        for class_index, class_name in enumerate(CLASS_NAMES):
            class_dir = staging / "videos" / split / class_name
            class_dir.mkdir(parents=True)
            for index in range(per_class):
                path = class_dir / f"{index:04d}.{_CODECS[index % len(_CODECS)][2]}"
                jobs.append(dict(params, path=path, class_index=class_index, index=index, split=split))
                lines.append(f"{path.relative_to(staging).as_posix()} {class_index}\n")
        (staging / f"{split}.txt").write_text("".join(lines))
        counts[split] = len(lines)
    (staging / "classes.txt").write_text("".join(f"{name}\n" for name in CLASS_NAMES))
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


def _validate_params(params: dict[str, int]) -> None:
    for key, value in params.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"dataset.generate.{key} must be an integer, got {value!r}")
    minimum = {"seed": 0, "train_per_class": 1, "val_per_class": 1, "num_frames": 2, "size": 32, "fps": 1}
    for key, low in minimum.items():
        if params[key] < low:
            raise ValueError(f"dataset.generate.{key} must be >= {low}, got {params[key]}")
    if params["size"] % 2:
        raise ValueError(f"dataset.generate.size must be even (yuv420p), got {params['size']}")


def _splits(root: Path) -> SyntheticSplits:
    return SyntheticSplits(
        root=root,
        train_list=root / "train.txt",
        val_list=root / "val.txt",
        classes_file=root / "classes.txt",
        class_names=list(CLASS_NAMES),
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
    for name in ("train.txt", "val.txt", "classes.txt"):
        if not (root / name).is_file():
            return f"{root / name} is missing"
    for split in ("train", "val"):
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
_LIST_NAMES = ("classes.txt", "train.txt", "val.txt")


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
        for split in ("train", "val"):
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


def ensure_synthetic(
    root: str | Path,
    *,
    seed: int = 0,
    train_per_class: int = 128,
    val_per_class: int = 16,
    num_frames: int = 16,
    size: int = 80,
    fps: int = 8,
) -> SyntheticSplits:
    """Generates the synthetic dataset under ``root`` unless an identical one is already there.

    Safe to call from several processes at once: an exclusive ``fcntl.flock`` on ``root/.lock``
    lets one process generate while the others wait, then re-use its result. The dataset is
    written to a staging folder and moved in place, and ``manifest.json`` (generator version and
    parameters) is written last, so a crash never leaves a dataset that looks complete. A
    manifest with other parameters or another version makes it regenerate.

    The defaults are those of configs/dataset/synthetic.yaml (a test checks that they agree).

    Args:
        root: Dataset folder (created if needed).
        seed: Seed of all randomness; the same seed gives byte-identical files (with the same
            FFmpeg/PyAV build).
        train_per_class: Training videos per class.
        val_per_class: Validation videos per class.
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
        "num_frames": num_frames,
        "size": size,
        "fps": fps,
    }
    _validate_params(params)
    params = {key: int(value) for key, value in params.items()}
    expected = {"version": GENERATOR_VERSION, "params": params, "class_names": list(CLASS_NAMES)}
    root = Path(root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)

    with open(root / _LOCK_NAME, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed, even on error
        reason = _why_stale(root, expected)
        if reason is None:
            return _splits(root)
        if (root / "manifest.json").exists():
            log.warning("Regenerating synthetic dataset in %s: %s", root, reason)
        else:
            log.info("Generating synthetic dataset in %s", root)
        owned = _owned_files(root)
        foreign = _foreign_files(root, owned)
        if foreign:
            raise _not_a_synthetic_root(root, foreign)
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
            "Generated %d train + %d val synthetic videos in %.1f s",
            counts["train"],
            counts["val"],
            time.perf_counter() - start,
        )
    return _splits(root)


if __name__ == "__main__":
    # `python synthetic.py STAGING PARAMS_JSON PARENT_PID`: how ensure_synthetic runs the generator.
    die_with_parent(int(sys.argv[3]))
    print(json.dumps(_generate(Path(sys.argv[1]), json.loads(sys.argv[2]))))
