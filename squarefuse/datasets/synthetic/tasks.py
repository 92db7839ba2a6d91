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
    along the track (a peak or a valley). Fails: ``none`` and quantiles. A trend of order 1 should
    fail too, but does not on the sampled input: 8 of the 16 rendered frames (every other one)
    break the half-clip shift's symmetry, and P1 of the position alone separates the classes
    (100 % held out with a linear model on P1, measured 2026-12-07 as in tests/test_task_statistics.py).
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
    contrast (each disc's absolute change of brightness: a flash may be lighter or darker than
    what it covers, so the signed brightness is at chance). Fails: ``none`` and quantiles.
``event_time`` (``early``, ``middle``, ``late``)
    One brief flash at a random place off the distractor's track (the distractor as above), in
    the first third, the middle or the last third of the clip; ``late`` is the time reversal of
    ``early``. Its colour differs by >= 100 in luma from the lit background under it. Statistic:
    P1 of the flash's contrast (negative, near zero, positive). Fails: ``none`` and quantiles
    (every class holds the same frames in distribution).
``acceleration`` (``accelerate``, ``decelerate``)
    A shape on a straight track, either way along it, speeding up from rest (position ~ t^2) or
    slowing down to rest; ``decelerate`` is the time reversal of ``accelerate``. Statistic: P1 of
    the shape's speed (its displacement between consecutive frames). Beyond order-2 trends: with
    either way equally likely, P0..P2 of the position, read linearly, are at chance (the class is
    the sign of P1 x P2). Fails: ``none`` and quantiles; a trend of order <= 2 of what frames show,
    read linearly.
``count_flashes`` (``one_flash``, ``two_flashes``, ``three_flashes``)
    A disc off the distractor's track (as in ``event_time``) lit during 3 of 8 equal slots of the
    clip (a slot is one segment of 8-frame segment sampling), in 1, 2 or 3 runs with one dark slot
    between runs, at a random slot. Statistic: the number of flash onsets. Beyond order-2 trends:
    every class is lit equally long within a similar span, so P0..P2 of the flash's contrast, read
    linearly, are at chance. Fails: ``none``, quantiles, a trend of order <= 2; counting is needed.
``shape`` (the 6 shapes: ``square``, ``disc``, ``triangle``, ``arrow``, ``ell``, ``dotted_disc``)
    Static, not temporal: the shape drawn, moving left/right, up/down or growing/shrinking (drawn
    independently of the class, either way), so a single frame tells the class and time tells
    nothing. Turning is left out: its sizes are made for the turning shapes, and the others would
    leave the frame. Statistic: the shape's outline in one frame (rotation-invariant moments of
    its mask). No fusion fails it in principle. It is for pretraining a backbone on per-frame
    labels, the analogue of an image-pretrained one (scripts/temporal_benchmark.py --backbone static).

Each statistic, measured on the frames evaluation samples, separates its classes with a linear
model (tests/test_task_statistics.py).

`TWIN_PAIRS` lists the class pairs whose clips hold the same frames (a time reversal, or for
``path_shape`` a cyclic shift): ``fusion=none`` is at chance within each pair by construction, and
the twin-confusion metric is computed over them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from squarefuse.datasets.synthetic.render import (
    _ALL_SHAPES,
    CLASS_NAMES,
    SUPERSAMPLE,
    ClipParams,
    add_noise,
    class_motion,
    class_trajectory,
    contrasting_colour,
    draw_frames,
    pixel_coverage,
    sample_clip_params,
)

__all__ = ["MIN_NUM_FRAMES", "TASKS", "TWIN_PAIRS", "Scene", "frame_order", "render_task_clip", "task_scene"]

TASKS: dict[str, tuple[str, ...]] = {
    "direction": CLASS_NAMES,
    "path_shape": ("out_and_back", "back_and_out"),
    "repetitions": ("once", "twice", "three_times"),
    "speed": ("slow", "fast"),
    "event_order": ("left_then_right", "right_then_left"),
    "event_time": ("early", "middle", "late"),
    "acceleration": ("accelerate", "decelerate"),
    "count_flashes": ("one_flash", "two_flashes", "three_flashes"),
    "shape": _ALL_SHAPES,
}
TWIN_PAIRS: dict[str, tuple[tuple[int, int], ...]] = {
    "direction": ((0, 1), (2, 3), (4, 5), (6, 7)),
    "path_shape": ((0, 1),),
    "repetitions": (),
    "speed": (),
    "event_order": ((0, 1),),
    "event_time": ((0, 2),),
    "acceleration": ((0, 1),),
    "count_flashes": (),
    "shape": (),
}
# shape: the motions whose sizes suit every shape (turn's are made for the turning shapes).
_STATIC_MOTIONS = ("move_x", "move_y", "scale")
# Frames a task's video needs: count_flashes lays its flashes on a grid of 8 slots.
MIN_NUM_FRAMES = {"count_flashes": 8}
_FLASH_RADIUS = 0.09  # of the frame size
# How far a moving shape reaches from its centre, in radii: the L's corners (render._shape_masks).
_SHAPE_REACH = 1.11


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


def _off_track_place(rng: np.random.Generator, params: ClipParams, *, size: int) -> tuple[float, float]:
    """A flash centre outside the strip the shape sweeps along its track, so the shape never covers it.

    Across the track: on a side of the strip with room for it (either, at random, when both have),
    uniform there; along the track: 0.15..0.85 of the frame.
    """
    radius = _FLASH_RADIUS * size
    horizontal = params.start[1] == params.end[1]  # move_x: the track runs along x
    across = params.start[1] if horizontal else params.start[0]
    reach = _SHAPE_REACH * params.start[2]
    # The strip is at most 2 * 1.11 * 0.26 = 0.58 of the frame wide, so the wider side has at least
    # 0.21 of it: room for a flash (0.18 across).
    sides = ((radius, across - reach - radius), (across + reach + radius, size - radius))
    fitting = [side for side in sides if side[0] <= side[1]]
    low, high = fitting[int(rng.integers(0, len(fitting)))]
    across_flash, along_flash = rng.uniform(low, high), rng.uniform(0.15, 0.85) * size
    return (along_flash, across_flash) if horizontal else (across_flash, along_flash)


def _off_track_flashes(
    rng: np.random.Generator, params: ClipParams, *, size: int, times: tuple[tuple[int, int], ...]
) -> tuple[Flash, ...]:
    """Flashes at one place off the shape's track, one per (start, frames) of `times`, in one colour.

    The colour differs by >= 100 in luma from the lit background where the flash is (the flash is
    drawn unlit, over the lighting): so every flash changes its disc by 100..255, and the size of
    the change says nothing about the class.
    """
    x, y = _off_track_place(rng, params, size=size)
    empty = np.asarray([[0.0, 0.0, 1e-3, 0.0]])  # the shape shrunk to nothing: the lit background alone
    lit = draw_frames(params, empty, size=size)[0, int(y), int(x)]
    colour = contrasting_colour(rng, against=lit, min_luma_difference=100.0)
    return tuple(
        Flash(x=x, y=y, radius=_FLASH_RADIUS * size, colour=tuple(float(c) for c in colour), start=t, frames=n)
        for t, n in times
    )


def flash_frames(num_frames: int) -> int:
    """How long a flash lasts: long enough that segment sampling of half the frames sees it."""
    return max(2, num_frames // 8 + 1)


# count_flashes: which of 8 slots are lit. Every class lights 3 slots, in 1, 2 or 3 runs, each run
# an off slot from the next: the lit time is the same and so is the span of the pattern, roughly.
_FLASH_PATTERNS = (
    ((1, 1, 1),),
    ((1, 1, 0, 1), (1, 0, 1, 1)),
    ((1, 0, 1, 0, 1),),
)
_SLOTS = 8


def check_num_frames(task: str, num_frames: int) -> None:
    minimum = MIN_NUM_FRAMES.get(task, 2)
    if num_frames < minimum:
        raise ValueError(f"dataset.generate.num_frames={num_frames}: task {task!r} needs at least {minimum} frames")


def task_scene(task: str, class_index: int, *, rng: np.random.Generator, num_frames: int, size: int) -> Scene:
    """Draws the scene of one clip of a base class of `task`, in its own time order.

    A twin class (the second of a `TWIN_PAIRS` pair) is drawn as its partner; `render_task_clip`
    then shows its frames in the order `frame_order` gives (reversed, or for ``path_shape``
    cyclically shifted).
    """
    check_task(task, class_index)
    check_num_frames(task, num_frames)
    T = num_frames
    if task == "direction":  # as render.render_clip draws it
        params = sample_clip_params(class_motion(class_index), rng=rng, size=size)
        return Scene(params, class_trajectory(class_index & ~1, params, T))
    if task == "shape":  # the class is the shape; the motion, drawn apart from it, carries nothing
        params = sample_clip_params(str(rng.choice(_STATIC_MOTIONS)), rng=rng, size=size)
        params = replace(params, shape=_ALL_SHAPES[class_index])
        if rng.random() < 0.5:
            params = replace(params, start=params.end, end=params.start)
        return Scene(params, _along(params, np.linspace(0.0, 1.0, T)))
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
    if task == "acceleration":  # decelerate is drawn as accelerate and reversed
        params = _track(rng, size, random_way=True)
        return Scene(params, _along(params, np.linspace(0.0, 1.0, T) ** 2))
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
    elif task == "event_time":  # late is drawn as early and reversed
        if class_index == 1:  # centred: either middle start when there are two
            start = (T - length) // 2 + int(rng.integers(0, 2)) * ((T - length) % 2)
        else:
            start = int(rng.integers(0, max(0, T // 3 - length) + 1))
        flashes = _off_track_flashes(rng, params, size=size, times=((start, length),))
    else:  # count_flashes: the pattern at a random slot; a slot is a segment of 8-frame segment sampling
        patterns = _FLASH_PATTERNS[class_index]
        pattern = patterns[int(rng.integers(0, len(patterns)))]
        slot = T // _SLOTS
        first = int(rng.integers(0, _SLOTS - len(pattern) + 1))
        lit = [first + i for i, on in enumerate(pattern) if on]
        runs = [(i, 1) for i in lit if i - 1 not in lit]
        runs = [(i, n) for i, _ in runs for n in [next(k for k in range(1, 4) if i + k not in lit)]]
        times = tuple((slot * i, slot * n) for i, n in runs)
        flashes = _off_track_flashes(rng, params, size=size, times=times)
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


def frame_order(task: str, class_index: int, num_frames: int) -> np.ndarray:
    """Which frame of its base scene (`task_scene`) each frame of a clip of the class shows: int [T].

    The identity for a base class; for the twin of a `TWIN_PAIRS` pair its partner's frames
    reversed, or for ``path_shape`` cyclically shifted by half the clip.
    """
    check_task(task, class_index)
    order_T = np.arange(num_frames)
    if class_index not in {b for _, b in TWIN_PAIRS[task]}:
        return order_T
    return np.roll(order_T, num_frames // 2) if task == "path_shape" else order_T[::-1].copy()


def render_task_clip(
    task: str, class_index: int, *, rng: np.random.Generator, num_frames: int, size: int
) -> np.ndarray:
    """Renders one clip of a class of `task` (before encoding): uint8 [num_frames, size, size, 3].

    The twin class of a `TWIN_PAIRS` pair renders its partner's scene from the same random state,
    noise included, and reorders the frames (`frame_order`): so both classes of a pair hold exactly
    the same frames. ``direction`` is `render.render_clip`, byte for byte.
    """
    twin_of = {b: a for a, b in TWIN_PAIRS[task]} if task in TWIN_PAIRS else {}
    scene = task_scene(task, twin_of.get(class_index, class_index), rng=rng, num_frames=num_frames, size=size)
    clip_THW3 = add_noise(_draw_scene(scene, size=size), rng=rng)
    return clip_THW3[frame_order(task, class_index, num_frames)]
