"""Frame samplers: segment (TSN) and dense, train and eval, short videos."""

from __future__ import annotations

import numpy as np
import pytest

from squarefuse.datasets.frame_sampling import FrameSampler, dense_indices, segment_indices


@pytest.mark.parametrize("num_frames", [8, 13, 48, 301])
def test_segment_train_one_random_frame_per_segment(num_frames):
    T = 8
    bounds = np.floor(np.linspace(0, num_frames, T + 1)).astype(int)
    seen = set()
    for seed in range(30):
        index_CT, mask_CT = segment_indices(num_frames, T, rng=np.random.default_rng(seed))
        assert index_CT.shape == (1, T) and mask_CT.all()
        index = index_CT[0]
        assert np.all(np.diff(index) > 0)  # sorted, no repeats
        assert np.all(index >= bounds[:-1]) and np.all(index < bounds[1:])  # one frame per segment
        seen.add(tuple(index))
    assert len(seen) > 1 or num_frames == T  # random unless every segment is one frame


def test_segment_eval_is_deterministic_centre_and_offsets():
    index_CT, mask_CT = segment_indices(48, 8)
    assert index_CT.tolist() == [[3, 9, 15, 21, 27, 33, 39, 45]]  # segment centres (6 frames each)
    again, _ = segment_indices(48, 8)
    assert np.array_equal(index_CT, again)
    two, mask = segment_indices(48, 8, num_clips=2)
    assert two.shape == (2, 8) and mask.all()
    # Clip c takes the frame (c + 0.5) / 2 into every segment: both in the same segment, in order.
    assert np.all(two[0] < two[1]) and np.all(two[0] // 6 == two[1] // 6)
    assert two[0].tolist() == [1, 7, 13, 19, 25, 31, 37, 43]


@pytest.mark.parametrize("num_frames", [61, 100, 300])
def test_dense_train_and_eval(num_frames):
    T, stride = 16, 4
    span = (T - 1) * stride + 1
    starts = set()
    for seed in range(20):
        index_CT, mask_CT = dense_indices(num_frames, T, stride, rng=np.random.default_rng(seed))
        index = index_CT[0]
        assert mask_CT.all() and np.all(np.diff(index) == stride)
        assert index[0] >= 0 and index[-1] < num_frames
        starts.add(int(index[0]))
    assert len(starts) == 1 if num_frames == span else len(starts) > 5  # random start when there is room
    clips, mask = dense_indices(num_frames, T, stride, num_clips=5)
    assert clips.shape == (5, T) and mask.all()
    assert clips[0, 0] == 0 and clips[-1, -1] == num_frames - 1  # evenly spread over the video
    assert np.all(np.diff(clips[:, 0]) >= 0)
    assert np.array_equal(clips, dense_indices(num_frames, T, stride, num_clips=5)[0])
    centre, _ = dense_indices(num_frames, T, stride)
    assert centre[0, 0] == (num_frames - span) // 2


def test_short_videos_pad_or_loop():
    index, mask = segment_indices(5, 8)
    assert index.tolist() == [[0, 1, 2, 3, 4, 4, 4, 4]]
    assert mask.tolist() == [[True] * 5 + [False] * 3]
    index, mask = segment_indices(5, 8, short_video="loop")
    assert index.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2]] and mask.all()
    index, mask = dense_indices(10, 4, 4, rng=np.random.default_rng(0))
    assert index.tolist() == [[0, 4, 8, 8]] and mask.tolist() == [[True, True, True, False]]
    index, mask = dense_indices(10, 4, 4, short_video="loop", num_clips=2)
    assert index.tolist() == [[0, 4, 8, 2]] * 2 and mask.all()


def test_frame_sampler_checks_its_config():
    with pytest.raises(ValueError, match="dataset.sampling='uniform'"):
        FrameSampler(sampling="uniform", num_frames=8, train=True)
    with pytest.raises(ValueError, match="dataset.short_video='wrap'"):
        FrameSampler(sampling="dense", num_frames=8, stride=2, train=True, short_video="wrap")
    train = FrameSampler(sampling="dense", num_frames=4, stride=2, train=True, num_clips=3)
    with pytest.raises(ValueError, match="random generator"):
        train(100)
    assert train(100, np.random.default_rng(0))[0].shape == (1, 4)  # train: one clip, whatever num_clips
    evaluation = FrameSampler(sampling="segment", num_frames=4, train=False, num_clips=2)
    assert evaluation(100, np.random.default_rng(0))[0].shape == (2, 4)
    assert np.array_equal(evaluation(100, np.random.default_rng(1))[0], evaluation(100)[0])
