"""Drawing the synthetic clips: a shape's appearance, its trajectory, the lit frames, the noise.

`sample_clip_params` draws a clip's appearance and trajectory end points, `draw_frames` renders a
trajectory, `render_clip` one clip of the `direction` task (its classes in time-reversed pairs).
Pure numpy: the generator's subprocess loads nothing else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "CLASS_NAMES",
    "ClipParams",
    "add_noise",
    "class_motion",
    "class_trajectory",
    "draw_frames",
    "render_clip",
    "sample_clip_params",
    "twin_of",
]

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


SUPERSAMPLE = 2  # anti-aliasing: shapes are rasterised on a 2x grid and averaged
_NOISE_STD = 4.0  # per-pixel Gaussian noise (uint8 units), fresh in every frame
# Fixed scene lighting, the same in every video: brighter towards the right, bluer towards the top
# and redder towards the bottom. A shape's position then shows in its colour, a global statistic
# that a small ViT trained from scratch reads early (as it reads size), instead of first having
# to learn position embeddings: measured on the default set, the tiny model reached 94-97% val
# top-1 within 1200 steps for seeds that stayed at 45-60% without the lighting. Every frame is
# lit alike, so time order still decides each pair.
_LIGHT_GAIN = (0.6, 1.4)  # brightness multiplier at the left and at the right edge
_LIGHT_CAST = 40.0  # red-minus-blue shift from the top to the bottom edge (uint8 units)


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


def class_motion(class_index: int) -> str:
    """The base motion of a class: ``move_x``, ``move_y``, ``scale`` or ``turn``."""
    _check_class_index(class_index)
    return _BASE_MOTIONS[class_index // 2]


def twin_of(class_index: int) -> int:
    """Returns the class whose videos are the time reversal of ``class_index``'s."""
    return class_index ^ 1


def _luma(rgb: np.ndarray) -> float:
    return float(0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])


def contrasting_colour(rng: np.random.Generator, *, against: np.ndarray, min_luma_difference: float) -> np.ndarray:
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
    colour = contrasting_colour(rng, against=background, min_luma_difference=100.0)
    dot_colour = contrasting_colour(rng, against=colour, min_luma_difference=90.0)
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


def pixel_coverage(mask: np.ndarray) -> np.ndarray:
    """Fraction of each pixel's sub-samples inside a supersampled mask: float32 [H, W, 1]."""
    ss = SUPERSAMPLE
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
    ss = SUPERSAMPLE
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
        cover_body = pixel_coverage(body)
        frame = background_HW3 + (colour - background_HW3) * cover_body
        if dot is not None:
            cover_dot = pixel_coverage(dot & body)
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
    params = sample_clip_params(class_motion(base_class), rng=rng, size=size)
    clip_THW3 = add_noise(draw_frames(params, class_trajectory(base_class, params, num_frames), size=size), rng=rng)
    return clip_THW3[::-1].copy() if class_index % 2 else clip_THW3


def add_noise(frames: np.ndarray, *, rng: np.random.Generator) -> np.ndarray:
    """Fresh per-pixel noise on float frames [T, H, W, 3] (modified in place), rounded to uint8."""
    # Luminance noise (one value per pixel for all channels) is a third of the cost of RGB noise.
    frames += _NOISE_STD * rng.standard_normal(size=frames.shape[:3] + (1,), dtype=np.float32)
    return np.clip(np.rint(frames, out=frames), 0, 255, out=frames).astype(np.uint8)


def _check_class_index(class_index: int) -> None:
    if not 0 <= class_index < len(CLASS_NAMES):
        raise ValueError(f"class_index={class_index} out of range 0..{len(CLASS_NAMES) - 1}")
