"""Task families of the synthetic benchmark: each isolates one temporal ability (``dataset.task``).

Every task renders real clips of a shape on a lit, noisy background (`render`), its classes
balanced. For each, the statistic that separates its classes, and which fusion should fail it in
principle (soft quantiles over time are order-blind; the Legendre trend of order P sees order up to
degree P; neither counts repetitions; ``fusion=none`` averages frames and sees no order at all):

``direction`` (8 classes, the default: the data of generator version 5, byte for byte)
    Move left/right, up/down, grow/shrink, turn clockwise/anticlockwise; every class has a twin
    that is its exact time reversal. Statistic: the sign of the linear trend (P1) of position,
    size or angle. Fails: ``none`` and quantiles only (same frames in both twins).
``path_shape`` (``out_and_back``, ``back_and_out``)
    A shape on a straight track (horizontal or vertical): out from the left (top) end to the far
    end and back, or from the far end in to the left (top) end and out again. The second is the
    first cyclically shifted by half the clip, so both hold the same frames, the same positions
    and zero net displacement. Statistic: the sign of the quadratic trend (P2) of the position
    along the track (a peak or a valley). Fails: ``none``, quantiles, a trend of order 1.
``repetitions`` (``once``, ``twice``, ``three_times``)
    The same out-and-back motion done 1, 2 or 3 times in the clip (the same positions visited,
    uniformly). Statistic: the number of reversals of the motion (the dominant frequency of the
    position over time). Fails: ``none`` and quantiles; a trend of order 2 only partly (once has a
    strong P2; twice and three times have none of order <= 2).
``speed`` (``slow``, ``fast``)
    The same straight path, start to end: across the whole clip, or in its middle half with the
    shape resting at the end points before and after. Statistic: the share of frames in which the
    shape moves (1 vs 1/2). Order-blind statistics see it too (the fast shape dwells at the end
    points), so no fusion fails it in principle: it measures how readily each reads the rate.
``event_order`` (``left_then_right``, ``right_then_left``)
    Two brief flashes, one in the left half and one in the right half, one early and one late,
    a distractor shape moving out and back all along (random phase). The classes are each other's
    time reversal. Statistic: the sign of the linear trend (P1) of right-minus-left flash
    brightness. Fails: ``none`` and quantiles.
``event_time`` (``early``, ``middle``, ``late``)
    One brief flash at a random place in the first third, the middle or the last third of the
    clip, with the same distractor; ``late`` is the time reversal of ``early``. Statistic: the
    flash's time (P1 of the flash brightness: negative, zero, positive). Fails: ``none`` and
    quantiles (every class holds the same frames in distribution).

`TWIN_PAIRS` lists the class pairs whose clips hold the same frames (a time reversal, or for
``path_shape`` a cyclic shift): ``fusion=none`` is at chance within each pair by construction, and
the twin-confusion metric is computed over them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from squarefuse.datasets.synthetic.render import (
    CLASS_NAMES,
    SUPERSAMPLE,
    ClipParams,
    add_noise,
    contrasting_colour,
    draw_frames,
    pixel_coverage,
    render_clip,
    sample_clip_params,
)

__all__ = ["TASKS", "TWIN_PAIRS", "Scene", "render_task_clip", "task_scene"]

TASKS: dict[str, tuple[str, ...]] = {
    "direction": CLASS_NAMES,
    "path_shape": ("out_and_back", "back_and_out"),
    "repetitions": ("once", "twice", "three_times"),
    "speed": ("slow", "fast"),
    "event_order": ("left_then_right", "right_then_left"),
    "event_time": ("early", "middle", "late"),
}
TWIN_PAIRS: dict[str, tuple[tuple[int, int], ...]] = {
    "direction": ((0, 1), (2, 3), (4, 5), (6, 7)),
    "path_shape": ((0, 1),),
    "repetitions": (),
    "speed": (),
    "event_order": ((0, 1),),
    "event_time": ((0, 2),),
}
_FLASH_RADIUS = 0.09  # of the frame size


@dataclass(frozen=True)
class Flash:
    """A disc shown, drawn over everything, on frames ``start .. start + frames - 1``."""

    x: float
    y: float
    radius: float
    colour: tuple[float, float, float]
    start: int
    frames: int


@dataclass(frozen=True)
class Scene:
    """What a clip of a (non-``direction``) task shows, before noise: a moving shape and flashes.

    Attributes:
        params: The shape's appearance.
        traj_T4: Per-frame (cx, cy, radius, angle) of the shape.
        flashes: The brief events.
    """

    params: ClipParams
    traj_T4: np.ndarray
    flashes: tuple[Flash, ...] = ()


def check_task(task: str, class_index: int | None = None) -> None:
    if task not in TASKS:
        raise ValueError(f"dataset.task={task!r}: choose one of {list(TASKS)}")
    if class_index is not None and not 0 <= class_index < len(TASKS[task]):
        raise ValueError(f"class_index={class_index} out of range 0..{len(TASKS[task]) - 1} for task {task!r}")


def _triangle(s: np.ndarray) -> np.ndarray:
    """0 -> 1 -> 0 over each unit period of s."""
    return 1.0 - np.abs(2.0 * np.mod(s, 1.0) - 1.0)


def _along(params: ClipParams, profile_T: np.ndarray) -> np.ndarray:
    """The trajectory at fraction `profile_T` of the way from params.start to params.end."""
    start, end = np.asarray(params.start), np.asarray(params.end)
    return start + (end - start) * profile_T[:, None]


def _track(rng: np.random.Generator, size: int, *, random_way: bool) -> ClipParams:
    """A shape on a horizontal or vertical track, from the left (top) end to the right (bottom) one."""
    params = sample_clip_params(str(rng.choice(("move_x", "move_y"))), rng=rng, size=size)
    if random_way and rng.random() < 0.5:
        params = replace(params, start=params.end, end=params.start)
    return params


def _flash(
    rng: np.random.Generator, params: ClipParams, *, size: int, x_range: tuple[float, float], start: int, frames: int
) -> Flash:
    grey = np.asarray(params.background)
    return Flash(
        x=rng.uniform(*x_range) * size,
        y=rng.uniform(0.2, 0.8) * size,
        radius=_FLASH_RADIUS * size,
        colour=tuple(float(c) for c in contrasting_colour(rng, against=grey, min_luma_difference=120.0)),
        start=start,
        frames=frames,
    )


def flash_frames(num_frames: int) -> int:
    """How long a flash lasts: long enough that segment sampling of half the frames sees it."""
    return max(2, num_frames // 8 + 1)


def task_scene(task: str, class_index: int, *, rng: np.random.Generator, num_frames: int, size: int) -> Scene:
    """Draws the scene of one clip of a base class of `task` (not ``direction``).

    A twin class (the second of a `TWIN_PAIRS` pair) is drawn as its partner; `render_task_clip`
    then reverses (or, for ``path_shape``, cyclically shifts) the rendered frames.
    """
    check_task(task, class_index)
    T = num_frames
    if task in ("path_shape", "repetitions"):
        times = 1 if task == "path_shape" else class_index + 1
        params = _track(rng, size, random_way=task == "repetitions")
        # Frame i at phase (i + 1/2) / T: the path is symmetric in time, so its linear trend is 0.
        return Scene(params, _along(params, _triangle(times * (np.arange(T) + 0.5) / T)))
    if task == "speed":
        params = _track(rng, size, random_way=True)
        t_T = np.linspace(0.0, 1.0, T)
        profile = t_T if class_index == 0 else np.clip(2.0 * t_T - 0.5, 0.0, 1.0)
        return Scene(params, _along(params, profile))
    # Event tasks: a distractor moving out and back all along, from a random phase, so that its
    # position at any frame says nothing about the time.
    params = _track(rng, size, random_way=True)
    distractor = _along(params, _triangle(rng.uniform() + np.arange(T) / T))
    length = flash_frames(T)
    if task == "event_order":
        first = int(rng.integers(0, max(0, T // 4 - length) + 1))
        second = T - length - int(rng.integers(0, max(0, T // 4 - length) + 1))
        flashes = (
            _flash(rng, params, size=size, x_range=(0.15, 0.3), start=first, frames=length),
            _flash(rng, params, size=size, x_range=(0.7, 0.85), start=second, frames=length),
        )
    else:  # event_time; late is drawn as early and reversed
        if class_index == 1:  # centred: either middle start when there are two
            start = (T - length) // 2 + int(rng.integers(0, 2)) * ((T - length) % 2)
        else:
            start = int(rng.integers(0, max(0, T // 3 - length) + 1))
        flashes = (_flash(rng, params, size=size, x_range=(0.15, 0.85), start=start, frames=length),)
    return Scene(params, distractor, flashes)


def _draw_scene(scene: Scene, *, size: int) -> np.ndarray:
    """The scene's frames, lit, flashes on top, without noise: float32 [T, size, size, 3]."""
    frames = draw_frames(scene.params, scene.traj_T4, size=size)
    coords = (np.arange(size * SUPERSAMPLE, dtype=np.float32) + 0.5) / SUPERSAMPLE  # as in draw_frames
    y_HW, x_HW = np.meshgrid(coords, coords, indexing="ij")
    for flash in scene.flashes:
        cover = pixel_coverage((x_HW - flash.x) ** 2 + (y_HW - flash.y) ** 2 <= flash.radius**2)
        on = slice(flash.start, flash.start + flash.frames)
        frames[on] += (np.asarray(flash.colour, dtype=np.float32) - frames[on]) * cover
    return frames


def render_task_clip(
    task: str, class_index: int, *, rng: np.random.Generator, num_frames: int, size: int
) -> np.ndarray:
    """Renders one clip of a class of `task` (before encoding): uint8 [num_frames, size, size, 3].

    ``direction`` is `render.render_clip`. For the others, the twin class of a `TWIN_PAIRS` pair
    renders its partner from the same random state and reorders the frames: so both classes of a
    pair hold exactly the same frames.
    """
    check_task(task, class_index)
    if task == "direction":
        return render_clip(class_index, rng=rng, num_frames=num_frames, size=size)
    twin_of = {b: a for a, b in TWIN_PAIRS[task]}
    base = twin_of.get(class_index, class_index)
    scene = task_scene(task, base, rng=rng, num_frames=num_frames, size=size)
    clip_THW3 = add_noise(_draw_scene(scene, size=size), rng=rng)
    if base == class_index:
        return clip_THW3
    if task == "path_shape":
        return np.roll(clip_THW3, num_frames // 2, axis=0)
    return clip_THW3[::-1].copy()
