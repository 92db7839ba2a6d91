"""The synthetic task families: each one's classes are separated by its documented statistic, computed
on rendered clips, and not by what single frames show; twins hold the same frames; splits are disjoint."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from squarefuse.datasets.synthetic import TASKS, TWIN_PAIRS, draw_frames, ensure_synthetic, render_task_clip, task_scene
from squarefuse.datasets.synthetic import generate as synthetic
from squarefuse.datasets.synthetic.tasks import Scene

T, SIZE = 16, 48


def render(task: str, class_index: int, seed: int) -> np.ndarray:
    return render_task_clip(task, class_index, rng=np.random.default_rng(seed), num_frames=T, size=SIZE)


def base_scene(task: str, class_index: int, seed: int) -> tuple[Scene, int]:
    """The scene `render` drew for this clip (a twin draws its partner's), and the partner."""
    base = {b: a for a, b in TWIN_PAIRS[task]}.get(class_index, class_index)
    return task_scene(task, base, rng=np.random.default_rng(seed), num_frames=T, size=SIZE), base


def reorder(task: str, class_index: int, base: int, frames: np.ndarray) -> np.ndarray:
    """What render_task_clip does to a twin's frames (the construction the twin test checks)."""
    if class_index == base:
        return frames
    return np.roll(frames, T // 2, axis=0) if task == "path_shape" else frames[::-1]


def foreground(clip: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Pixels far from the scene without what is measured: bool [T, H, W] (noise std is 4)."""
    return np.abs(clip.astype(np.float32) - background).max(axis=-1) > 40


def position_along_track(task: str, class_index: int, seed: int) -> np.ndarray:
    """The shape's centroid in the rendered clip, projected on its track (pixels), per frame."""
    clip = render(task, class_index, seed)
    scene, base = base_scene(task, class_index, seed)
    vanished = scene.traj_T4.copy()
    vanished[:, 2] = 1e-3  # the shape shrunk to nothing: the background alone
    background = draw_frames(scene.params, vanished, size=SIZE)
    mask = foreground(clip, background)
    ys, xs = np.mgrid[:SIZE, :SIZE]
    centroid_T2 = np.stack([[xs[m].mean(), ys[m].mean()] for m in mask])
    axis = np.subtract(scene.params.end[:2], scene.params.start[:2])
    axis = np.abs(axis) / np.linalg.norm(axis)  # right / down is positive
    return centroid_T2 @ axis


def flash_signal(task: str, class_index: int, seed: int) -> tuple[np.ndarray, list[float]]:
    """Per flash, the share of its disc that differs from the scene drawn without flashes: [F, T]."""
    clip = render(task, class_index, seed)
    scene, base = base_scene(task, class_index, seed)
    without = reorder(task, class_index, base, draw_frames(scene.params, scene.traj_T4, size=SIZE))
    mask = foreground(clip, without)
    ys, xs = np.mgrid[:SIZE, :SIZE]
    signals = []
    for flash in scene.flashes:
        disc = (xs + 0.5 - flash.x) ** 2 + (ys + 0.5 - flash.y) ** 2 <= (0.7 * flash.radius) ** 2
        signals.append(mask[:, disc].mean(axis=1))
    return np.asarray(signals), [flash.x for flash in scene.flashes]


def legendre(signal_T: np.ndarray, degree: int) -> float:
    """The coefficient of the Legendre polynomial of `degree` of the signal over t in [-1, 1]."""
    return float(np.polynomial.legendre.legfit(np.linspace(-1, 1, len(signal_T)), signal_T, degree)[degree])


SEEDS = range(10)


def test_default_task_renders_the_version_5_clips_byte_for_byte():
    # sha256 of these clips as generator version 5 (before the task families) rendered them.
    digest = hashlib.sha256()
    for split in ("train", "val"):
        for c in range(8):
            for index in (0, 5):
                rng = synthetic._video_rng(0, split, c, index)
                digest.update(render_task_clip("direction", c, rng=rng, num_frames=16, size=80).tobytes())
    assert digest.hexdigest() == "c7884732519696fd36fde1a92fd1219bfea98b7abab363ecfb4cae783fbee9d8"


@pytest.mark.parametrize("task", [t for t in TASKS if TWIN_PAIRS[t]])
def test_twins_hold_the_same_frames(task):
    for a, b in TWIN_PAIRS[task]:
        for seed in range(3):
            clip_a, clip_b = render(task, a, seed), render(task, b, seed)
            assert sorted(f.tobytes() for f in clip_a) == sorted(f.tobytes() for f in clip_b)
            assert not np.array_equal(clip_a, clip_b)  # only the order differs


def test_path_shape_is_separated_by_the_quadratic_trend_not_the_linear_one():
    p2 = {c: [legendre(position_along_track("path_shape", c, s), 2) for s in SEEDS] for c in (0, 1)}
    p1 = [legendre(position_along_track("path_shape", c, s), 1) for c in (0, 1) for s in SEEDS]
    assert max(p2[0]) < -3 and min(p2[1]) > 3  # out and back: a peak; back and out: a valley (pixels)
    assert max(map(abs, p1)) < 0.2 * min(map(abs, p2[0] + p2[1]))


def reversals(position_T: np.ndarray) -> int:
    steps = np.diff(position_T)
    signs = np.sign(steps[np.abs(steps) > 0.5])
    return int(np.count_nonzero(signs[1:] != signs[:-1]))


def test_repetitions_are_counted_by_the_reversals_of_the_motion():
    for c, times in enumerate((1, 2, 3)):
        for s in SEEDS:
            assert reversals(position_along_track("repetitions", c, s)) == 2 * times - 1


def test_speed_is_the_share_of_frames_in_motion():
    for c, share in enumerate((1.0, 0.5)):
        for s in SEEDS:
            moving = np.abs(np.diff(position_along_track("speed", c, s))) > 0.5
            assert abs(moving.mean() - share) <= 0.15, (c, s, moving)


def test_event_order_is_the_sign_of_the_linear_trend_of_right_minus_left_flashes():
    for c, sign in enumerate((1, -1)):
        for s in SEEDS:
            signal_FT, xs = flash_signal("event_order", c, s)
            right_minus_left = signal_FT[int(np.argmax(xs))] - signal_FT[int(np.argmin(xs))]
            assert np.sign(legendre(right_minus_left, 1)) == sign


def test_event_time_is_the_time_of_the_flash():
    for c, (low, high) in enumerate(((0, 1 / 3), (1 / 3, 2 / 3), (2 / 3, 1))):
        for s in SEEDS:
            signal_T = flash_signal("event_time", c, s)[0][0]
            when = (np.arange(T) + 0.5) @ signal_T / signal_T.sum() / T
            assert low <= when <= high, (c, s, when)


def test_count_flashes_needs_8_frames(tmp_path):
    small = dict(seed=0, train_per_class=1, val_per_class=1, test_per_class=1, num_frames=7, size=32, fps=8)
    with pytest.raises(ValueError, match="num_frames=7: task 'count_flashes' needs at least 8 frames"):
        ensure_synthetic(tmp_path, task="count_flashes", **small)


def frame_features(task: str, seeds: range) -> tuple[torch.Tensor, torch.Tensor]:
    """Every frame of every clip on its own, with its clip's label: a coarse saliency map [N, 192]."""
    features, labels = [], []
    for c in range(len(TASKS[task])):
        for s in seeds:
            clip = render(task, c, s).astype(np.float32)
            pooled = clip.reshape(T, 8, SIZE // 8, 8, SIZE // 8, 3).mean(axis=(2, 4))
            features.append(np.abs(pooled - np.median(pooled, axis=(1, 2), keepdims=True)).reshape(T, -1))
            labels += [c] * T
    return torch.tensor(np.concatenate(features)), torch.tensor(labels)


def per_frame_classifier(task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A logistic regression fitted on single frames (their order lost); its predictions on the
    frames of held-out clips, and their labels."""
    x, y = frame_features(task, range(100, 130))
    mean, std = x.mean(0), x.std(0) + 1e-6
    weight = torch.zeros(x.shape[1], len(TASKS[task]), requires_grad=True)
    bias = torch.zeros(len(TASKS[task]), requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=200)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy((x - mean) / std @ weight + bias, y) + 1e-3 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    x_test, y_test = frame_features(task, range(200, 212))
    with torch.no_grad():
        return ((x_test - mean) / std @ weight + bias).argmax(1), y_test


@pytest.mark.slow
@pytest.mark.parametrize("task", ["direction", "path_shape", "event_order", "event_time", "acceleration"])
def test_single_frames_do_not_tell_twins_apart(task):
    pred, label = per_frame_classifier(task)
    twin = {a: b for pair in TWIN_PAIRS[task] for a, b in (pair, pair[::-1])}
    in_pair = torch.tensor(
        [p == t or twin.get(int(t)) == p for p, t in zip(pred.tolist(), label.tolist(), strict=True)]
    )
    # Within a pair of twins the frames say nothing: right as often as the twin.
    pairs_right = (pred == label)[torch.tensor([int(t) in twin for t in label.tolist()]) & in_pair]
    assert abs(pairs_right.float().mean().item() - 0.5) < 0.1
    if task == "direction":  # the classifier does read what frames show: which pair (chance 0.25)
        assert in_pair.float().mean().item() > 0.4


@pytest.mark.slow
def test_every_task_generates_balanced_disjoint_splits_and_a_task_change_regenerates(tmp_path):
    root = tmp_path / "syn"
    small = dict(seed=0, train_per_class=2, val_per_class=1, test_per_class=2, num_frames=8, size=32, fps=8)
    for task, names in TASKS.items():
        splits = ensure_synthetic(root, task=task, **small)
        assert splits.class_names == list(names) == splits.classes_file.read_text().splitlines()
        assert json.loads((root / "manifest.json").read_text())["params"]["task"] == task
        contents = {}
        for split in ("train", "val", "test"):
            lines = [line.rsplit(" ", 1) for line in splits.list_file(split).read_text().splitlines()]
            labels = [int(label) for _, label in lines]
            assert labels == sorted(labels) and all(
                labels.count(c) == small[f"{split}_per_class"] for c in range(len(names))
            )
            contents[split] = {(root / path).read_bytes() for path, _ in lines}
        assert not contents["test"] & (contents["train"] | contents["val"]) and not contents["train"] & contents["val"]
        twins = [line.split(" | ") for line in splits.twins_file.read_text().splitlines()]
        assert twins == [[names[a], names[b]] for a, b in TWIN_PAIRS[task]]
    with pytest.raises(ValueError, match="dataset.task='spin'"):
        ensure_synthetic(root, task="spin", **small)
