"""Which frames of a video make a clip: segment-based (TSN) and dense-stride sampling.

Both samplers return ``index_CT`` (int64 [C,T]: C clips of T frame indices, each row sorted)
and ``mask_CT`` (bool [C,T]: False for padding). Train mode draws one random clip; eval mode
gives ``num_clips`` deterministic clips.

segment (SSv2): the video is cut into T equal segments, one frame per segment: a random frame
    of each segment in train, the centre in eval. With C eval clips, clip c takes the frame at
    (c + 0.5) / C of every segment (C=2: a quarter and three quarters in), as VideoMAE and
    MMAction2 do for their 2-clip SSv2 test.
dense (K400): T frames ``stride`` apart, a span of (T-1)*stride+1 frames; a random start in
    train, C starts evenly spread over the video in eval (one clip: the centred one).

Videos too short for a clip (fewer than T frames for segment, fewer than the span for dense):
    pad (default): each real frame is used once in order and the clip is padded to T by repeating
        the last real frame with mask False, so the model can ignore the padding exactly (the
        fusion layer and heads treat a masked clip as the shorter clip);
    loop: indices wrap around to the start (index mod num_frames), all marked valid.
"""

from __future__ import annotations

import numpy as np

__all__ = ["SAMPLINGS", "SHORT_VIDEO_MODES", "FrameSampler", "dense_indices", "segment_indices"]

SAMPLINGS = ("segment", "dense")
SHORT_VIDEO_MODES = ("pad", "loop")


def _short_clip(num_frames: int, positions_T: np.ndarray, short_video: str) -> tuple[np.ndarray, np.ndarray]:
    """Indices and mask for wanted `positions_T` of which some lie past the last frame."""
    if short_video == "loop":
        return positions_T % num_frames, np.ones(positions_T.shape, dtype=bool)
    mask_T = positions_T < num_frames
    last_real = positions_T[mask_T].max() if mask_T.any() else 0
    return np.where(mask_T, positions_T, last_real), mask_T


def segment_indices(
    num_frames: int,
    num_segments: int,
    *,
    rng: np.random.Generator | None = None,
    num_clips: int = 1,
    short_video: str = "pad",
) -> tuple[np.ndarray, np.ndarray]:
    """TSN segment sampling.

    Args:
        num_frames: frames in the video (>= 1).
        num_segments: T, frames per clip.
        rng: random generator for train sampling (one random clip); None = eval (deterministic).
        num_clips: eval clips C (ignored in train).
        short_video: "pad" or "loop" when num_frames < T.

    Returns:
        index_CT int64, mask_CT bool.
    """
    assert num_frames >= 1 and num_segments >= 1
    clips = 1 if rng is not None else num_clips
    if num_frames < num_segments:
        index_T, mask_T = _short_clip(num_frames, np.arange(num_segments), short_video)
        return np.tile(index_T, (clips, 1)), np.tile(mask_T, (clips, 1))
    # Integer segment bounds so that every segment holds at least one frame and the indices
    # come out strictly increasing, covering the whole video.
    bounds = np.floor(np.linspace(0, num_frames, num_segments + 1)).astype(np.int64)
    start_T, length_T = bounds[:-1], np.diff(bounds)
    if rng is not None:
        index_CT = (start_T + rng.integers(0, length_T))[None]
    else:
        offset_C1 = (np.arange(clips)[:, None] + 0.5) / clips
        index_CT = start_T[None] + np.floor(offset_C1 * length_T[None]).astype(np.int64)
    return index_CT.astype(np.int64), np.ones(index_CT.shape, dtype=bool)


def dense_indices(
    num_frames: int,
    clip_len: int,
    stride: int,
    *,
    rng: np.random.Generator | None = None,
    num_clips: int = 1,
    short_video: str = "pad",
) -> tuple[np.ndarray, np.ndarray]:
    """Dense sampling: `clip_len` frames `stride` apart.

    Args:
        clip_len: T, frames per clip.
        stride: frames between consecutive clip frames (>= 1).
        num_clips: eval clips C, their starts evenly spread (ignored in train).
        short_video: "pad" or "loop" when the video is shorter than the clip's span.
        num_frames, rng, and the result (index_CT, mask_CT): as in `segment_indices`.
    """
    assert num_frames >= 1 and clip_len >= 1 and stride >= 1
    clips = 1 if rng is not None else num_clips
    span = (clip_len - 1) * stride + 1
    slack = num_frames - span
    if slack < 0:
        index_T, mask_T = _short_clip(num_frames, np.arange(clip_len) * stride, short_video)
        return np.tile(index_T, (clips, 1)), np.tile(mask_T, (clips, 1))
    if rng is not None:
        start_C = rng.integers(0, slack + 1, size=1)
    elif clips == 1:
        start_C = np.array([slack // 2])
    else:
        start_C = np.round(np.linspace(0, slack, clips)).astype(np.int64)
    index_CT = start_C[:, None] + np.arange(clip_len)[None] * stride
    return index_CT.astype(np.int64), np.ones(index_CT.shape, dtype=bool)


# Frames per clip. Video models use 8-64; beyond this, a batch of clips (and the FLOP count done
# before training) needs more memory than a machine has: an allocator error instead of this message.
MAX_NUM_FRAMES = 1024


class FrameSampler:
    """Frame sampling as configured by a dataset config.

    Args:
        sampling: "segment" or "dense".
        num_frames: T, frames per clip.
        stride: frame stride for dense sampling.
        train: random clips (True) or deterministic eval clips.
        num_clips: eval clips per video.
        short_video: "pad" or "loop".
    """

    def __init__(
        self,
        *,
        sampling: str,
        num_frames: int,
        stride: int = 1,
        train: bool,
        num_clips: int = 1,
        short_video: str = "pad",
    ) -> None:
        if sampling not in SAMPLINGS:
            raise ValueError(f"dataset.sampling={sampling!r}: choose one of {list(SAMPLINGS)}")
        if short_video not in SHORT_VIDEO_MODES:
            raise ValueError(f"dataset.short_video={short_video!r}: choose one of {list(SHORT_VIDEO_MODES)}")
        if not 1 <= num_frames <= MAX_NUM_FRAMES:
            raise ValueError(
                f"dataset.num_frames={num_frames}: must be in 1..{MAX_NUM_FRAMES} (frames per clip, not per video)"
            )
        if sampling == "dense" and stride < 1:
            raise ValueError(f"dataset.stride={stride}: must be >= 1")
        if num_clips < 1:
            raise ValueError(f"dataset.test_clips={num_clips}: must be >= 1")
        self.sampling, self.num_frames, self.stride = sampling, num_frames, stride
        self.train, self.num_clips, self.short_video = train, num_clips, short_video

    def __call__(self, video_frames: int, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Indices [C,T] and mask [C,T] for a video of `video_frames` frames (C = 1 in train).

        Args:
            video_frames: frames in the video.
            rng: required in train mode, ignored in eval mode.
        """
        if self.train and rng is None:
            raise ValueError("a train-mode FrameSampler needs a random generator")
        rng = rng if self.train else None
        if self.sampling == "segment":
            return segment_indices(
                video_frames, self.num_frames, rng=rng, num_clips=self.num_clips, short_video=self.short_video
            )
        return dense_indices(
            video_frames,
            self.num_frames,
            self.stride,
            rng=rng,
            num_clips=self.num_clips,
            short_video=self.short_video,
        )
