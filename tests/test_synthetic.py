"""The synthetic dataset generator: real files, deterministic, time-reversed twins, safe to share."""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch  # noqa: F401 - loaded before decord, as everywhere in the package
from helpers.processes import children_of, kill_all, wait_gone
from helpers.scripts import run_script
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from squarefuse.datasets.synthetic import CLASS_NAMES, ensure_synthetic, render
from squarefuse.datasets.synthetic import generate as synthetic

REPO = Path(__file__).resolve().parents[1]

# Small enough to generate in well under a second; large enough for every class and codec.
SMALL = dict(
    task="direction", seed=0, train_per_class=2, val_per_class=2, test_per_class=2, num_frames=8, size=64, fps=8
)
# For the tests of the dataset's life cycle (reuse, regeneration, locking, crashes), which read
# lists, manifests and bytes but not the pictures: half the generation time of SMALL (measured
# 0.5 s against 1.1 s on 2 cores). Two train videos per class, so that a test can ask for fewer.
LIFECYCLE = dict(
    task="direction", seed=0, train_per_class=2, val_per_class=1, test_per_class=1, num_frames=2, size=32, fps=8
)


def read_pyav(path: Path) -> tuple[np.ndarray, str]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
        return frames, stream.codec_context.name


def list_entries(list_file: Path) -> list[tuple[str, int]]:
    entries = []
    for line in list_file.read_text().splitlines():
        path, label = line.split(" ")
        entries.append((path, int(label)))
    return entries


def all_files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def centroid(mask_HW: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask_HW)
    return np.array([xs.mean(), ys.mean()])


def test_lists_classes_and_codecs(tmp_path):
    splits = ensure_synthetic(tmp_path / "syn", **SMALL)
    assert splits.root == (tmp_path / "syn").resolve()
    assert splits.class_names == list(CLASS_NAMES)
    assert splits.classes_file.read_text().splitlines() == list(CLASS_NAMES)
    for list_file, per_class in (
        (splits.train_list, SMALL["train_per_class"]),
        (splits.val_list, SMALL["val_per_class"]),
        (splits.test_list, SMALL["test_per_class"]),
    ):
        entries = list_entries(list_file)
        labels = [label for _, label in entries]
        assert sorted(set(labels)) == list(range(len(CLASS_NAMES)))
        assert all(labels.count(c) == per_class for c in range(len(CLASS_NAMES)))
        for path, label in entries:
            assert not Path(path).is_absolute()
            assert (splits.root / path).is_file()
            assert CLASS_NAMES[label] in path
        suffixes = {Path(path).suffix for path, _ in entries}
        assert suffixes == {".mp4", ".webm"}, suffixes
    train_paths = {p for p, _ in list_entries(splits.train_list)}
    val_paths = {p for p, _ in list_entries(splits.val_list)}
    test_paths = {p for p, _ in list_entries(splits.test_list)}
    assert not train_paths & val_paths and not test_paths & (train_paths | val_paths)
    manifest = json.loads((splits.root / "manifest.json").read_text())
    assert manifest["params"] == {"task": "direction", **SMALL}
    assert manifest["version"] == synthetic.GENERATOR_VERSION
    twins = [line.split(" | ") for line in splits.twins_file.read_text().splitlines()]
    assert twins == [[CLASS_NAMES[c], CLASS_NAMES[c + 1]] for c in range(0, 8, 2)]


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = ensure_synthetic(tmp_path / "a", **SMALL)
    b = ensure_synthetic(tmp_path / "b", **SMALL)
    c = ensure_synthetic(tmp_path / "c", **{**SMALL, "seed": 1})
    files_a, files_b, files_c = all_files(a.root), all_files(b.root), all_files(c.root)
    assert files_a == files_b
    videos = [name for name in files_a if name.startswith("videos/")]
    assert len(videos) == 8 * (SMALL["train_per_class"] + SMALL["val_per_class"] + SMALL["test_per_class"])
    assert all(files_a[name] != files_c[name] for name in videos)
    # Train, val and test use different streams too: no video is duplicated across or within splits.
    assert len({files_a[name] for name in videos}) == len(videos)


def test_both_codecs_decode_with_pyav_and_decord(tmp_path):
    import decord  # noqa: PLC0415 - after torch

    splits = ensure_synthetic(tmp_path / "syn", **SMALL)
    paths = [splits.root / p for p, _ in list_entries(splits.val_list)[:2]]
    codecs = {}
    for path in paths:
        frames_pyav, codec = read_pyav(path)
        codecs[path.suffix] = codec
        assert frames_pyav.shape == (SMALL["num_frames"], SMALL["size"], SMALL["size"], 3)
        reader = decord.VideoReader(str(path), num_threads=1)
        assert len(reader) == SMALL["num_frames"]
        assert reader.get_avg_fps() == pytest.approx(SMALL["fps"])
        frames_decord = reader.get_batch(list(range(len(reader)))).asnumpy()
        # Both go through FFmpeg's decoder and the same colour conversion.
        assert np.abs(frames_decord.astype(int) - frames_pyav).max() <= 2
    assert codecs == {".mp4": "h264", ".webm": "vp9"}


@pytest.mark.parametrize("class_index", range(len(CLASS_NAMES)))
def test_twin_is_exact_time_reversal(class_index):
    twin = render.twin_of(class_index)
    assert twin != class_index and render.twin_of(twin) == class_index
    clip = render.render_clip(class_index, rng=np.random.default_rng(7), num_frames=9, size=48)
    clip_twin = render.render_clip(twin, rng=np.random.default_rng(7), num_frames=9, size=48)
    assert clip.dtype == np.uint8 and clip.shape == (9, 48, 48, 3)
    np.testing.assert_array_equal(clip_twin, clip[::-1])
    # The clip is not its own reversal: only time order tells the twins apart.
    assert np.abs(clip.astype(int) - clip[::-1]).mean() > 1.0

    base = class_index & ~1
    params = render.sample_clip_params(render._BASE_MOTIONS[base // 2], rng=np.random.default_rng(3), size=48)
    np.testing.assert_array_equal(
        render.class_trajectory(base + 1, params, 12), render.class_trajectory(base, params, 12)[::-1]
    )


def decoded_shape_masks(root: Path, path: str, label: int) -> np.ndarray:
    """Shape pixels of a generated file: far from its background drawn alone (lighting included)."""
    split, _, name = Path(path).parts[-3:]
    rng = synthetic._video_rng(SMALL["seed"], split, label, int(Path(name).stem))
    # render_clip draws the base motion's parameters first from the video's generator.
    params = render.sample_clip_params(render._BASE_MOTIONS[label // 2], rng=rng, size=SMALL["size"])
    traj = render.class_trajectory(label, params, SMALL["num_frames"])
    traj[:, 2] = 1e-3  # a vanishing shape: the background alone
    background = render.draw_frames(params, traj, size=SMALL["size"])
    frames, _ = read_pyav(root / path)
    return np.linalg.norm(frames.astype(np.float32) - background, axis=-1) > 35.0


def test_decoded_videos_move_grow_in_their_direction(tmp_path):
    splits = ensure_synthetic(tmp_path / "syn", **SMALL)
    size = SMALL["size"]
    checked = 0
    for path, label in list_entries(splits.train_list) + list_entries(splits.val_list):
        name = CLASS_NAMES[label]
        if name.startswith("turn"):
            continue  # turning keeps the centroid in place: tested on the drawn frames below
        masks = decoded_shape_masks(splits.root, path, label)
        first, last = masks[0], masks[-1]
        shift_x, shift_y = centroid(last) - centroid(first)
        growth = last.sum() / first.sum()
        if name == "move_left_to_right":
            assert shift_x > 0.3 * size and abs(shift_y) < 0.1 * size, (path, shift_x, shift_y)
        elif name == "move_right_to_left":
            assert shift_x < -0.3 * size and abs(shift_y) < 0.1 * size, (path, shift_x, shift_y)
        elif name == "move_top_to_bottom":
            assert shift_y > 0.3 * size and abs(shift_x) < 0.1 * size, (path, shift_x, shift_y)
        elif name == "move_bottom_to_top":
            assert shift_y < -0.3 * size and abs(shift_x) < 0.1 * size, (path, shift_x, shift_y)
        elif name == "grow":
            assert growth > 4.0, (path, growth)
        else:
            assert name == "shrink"
            assert growth < 0.25, (path, growth)
        checked += 1
    assert checked == 6 * (SMALL["train_per_class"] + SMALL["val_per_class"])


@pytest.mark.parametrize("shape", ["half_disc", "sector", "arrow", "ell", "dotted_disc"])
def test_turn_clockwise_turns_clockwise_on_screen(shape):
    from torchvision.transforms.v2 import functional as F  # noqa: PLC0415

    size = 64
    params = render.sample_clip_params("turn", rng=np.random.default_rng(0), size=size)
    # The dot painted in the background colour is cut out of the shape mask, so the mask of
    # dotted_disc is as asymmetric as the shape is.
    params = dataclasses.replace(params, shape=shape, dot_colour=params.background)
    for class_name, clockwise in (("turn_clockwise", True), ("turn_anticlockwise", False)):
        traj = render.class_trajectory(CLASS_NAMES.index(class_name), params, 8)
        frames = render.draw_frames(params, traj, size=size)
        empty = traj.copy()
        empty[:, 2] = 1e-3  # a vanishing shape: the lit background alone
        background = render.draw_frames(params, empty, size=size)
        masks = torch.from_numpy(np.linalg.norm(frames - background, axis=-1) > 35.0).float()[:, None]
        for t in range(len(traj) - 1):
            step = abs(float(np.degrees(traj[t + 1, 3] - traj[t, 3])))
            centre = [float(traj[t, 0]) - 0.5, float(traj[t, 1]) - 0.5]
            # torchvision turns anticlockwise on screen for positive angles.
            overlap = {
                turn: float((F.rotate(masks[t], angle, center=centre) * masks[t + 1]).sum())
                for turn, angle in (("clockwise", -step), ("anticlockwise", step))
            }
            best = max(overlap, key=overlap.get)
            assert best == ("clockwise" if clockwise else "anticlockwise"), (shape, class_name, t, overlap)


def test_concurrent_calls_generate_once(tmp_path):
    root = tmp_path / "shared"
    gate = tmp_path / "go"
    child = textwrap.dedent(
        f"""
        import importlib.util, json, os, sys, time
        from pathlib import Path
        # Loaded by path: the module needs only numpy and PyAV, and skipping the package's torch
        # import keeps both children quick to start.
        spec = importlib.util.spec_from_file_location("synthetic", {synthetic.__file__!r})
        synthetic = sys.modules["synthetic"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(synthetic)

        real_generate = synthetic._generate_in_subprocess
        def counted_generate(staging, params):
            with open({str(tmp_path / "generations.log")!r}, "a") as log:
                log.write(f"{{os.getpid()}}\\n")
            time.sleep(1.0)  # hold the lock long enough for the other process to queue on it
            return real_generate(staging, params)
        synthetic._generate_in_subprocess = counted_generate

        Path(sys.argv[1]).touch()
        while not Path({str(gate)!r}).exists():
            time.sleep(0.01)
        splits = synthetic.ensure_synthetic({str(root)!r}, **json.loads(sys.argv[2]))
        lines = splits.train_list.read_text().splitlines()
        print(json.dumps({{"lines": len(lines),
                           "complete": all((splits.root / l.split()[0]).is_file() for l in lines)}}))
        """
    )
    ready = [tmp_path / f"ready{i}" for i in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", child, str(r), json.dumps(LIFECYCLE)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in ready
    ]
    deadline = time.monotonic() + 60
    while not all(r.exists() for r in ready):
        for proc in procs:
            assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "the child processes did not start"
        time.sleep(0.01)
    gate.touch()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert (tmp_path / "generations.log").read_text().count("\n") == 1
    assert results == [{"lines": 8 * LIFECYCLE["train_per_class"], "complete": True}] * 2
    assert not list(root.glob(".staging-*"))


def test_reuse_and_regenerate_on_change(tmp_path, caplog):
    root = tmp_path / "syn"
    caplog.set_level(logging.INFO, logger=synthetic.__name__)
    splits = ensure_synthetic(root, **LIFECYCLE)
    first_video = splits.root / list_entries(splits.train_list)[0][0]
    stamp = first_video.stat().st_mtime_ns

    caplog.clear()
    ensure_synthetic(root, **LIFECYCLE)
    assert first_video.stat().st_mtime_ns == stamp  # re-used, not rewritten
    assert not caplog.records

    ensure_synthetic(root, **{**LIFECYCLE, "num_frames": 10})
    assert any("Regenerating" in r.message and "params" in r.message for r in caplog.records)
    frames, _ = read_pyav(first_video)
    assert frames.shape[0] == 10
    assert json.loads((root / "manifest.json").read_text())["params"]["num_frames"] == 10

    # Fewer videos per class: the lists shrink and the old extra files are gone.
    ensure_synthetic(root, **{**LIFECYCLE, "num_frames": 10, "train_per_class": 1})
    assert len(list_entries(root / "train.txt")) == 8
    assert len(list(root.glob("videos/train/*/*"))) == 8


@pytest.mark.parametrize("damage", ["version", "missing_video", "no_manifest", "staging_left"])
def test_incomplete_or_stale_dataset_is_regenerated(tmp_path, damage):
    root = tmp_path / "syn"
    splits = ensure_synthetic(root, **LIFECYCLE)
    video = splits.root / list_entries(splits.val_list)[-1][0]
    original = video.read_bytes()
    manifest_path = root / "manifest.json"
    if damage == "version":
        manifest = json.loads(manifest_path.read_text())
        manifest["version"] = -1
        manifest_path.write_text(json.dumps(manifest))
    elif damage == "missing_video":
        video.unlink()
    elif damage == "no_manifest":  # what a crash half-way through moving the files in leaves behind
        manifest_path.rename(root / ".generating.json")
        video.write_bytes(original[: len(original) // 2])
    else:
        (root / ".staging-crashed").mkdir()
        (root / ".staging-crashed" / "junk.mp4").write_bytes(b"x")
        manifest_path.rename(root / ".generating.json")
    ensure_synthetic(root, **LIFECYCLE)
    assert video.read_bytes() == original
    assert json.loads(manifest_path.read_text())["version"] == synthetic.GENERATOR_VERSION
    assert not list(root.glob(".staging-*"))


def _fake_ssv2_root(root: Path) -> dict[Path, bytes]:
    """A folder laid out like an SSv2 root; returns every file with its bytes."""
    files = {
        root / "annotations" / "something-something-v2-labels.json": b'{"Pushing something": "0"}',
        root / "annotations" / "something-something-v2-train.json": b"[]",
        root / "videos" / "1.webm": b"not really a video 1",
        root / "videos" / "2.webm": b"not really a video 2",
        root / "train.txt": b"videos/1.webm 0\n",
        root / "classes.txt": b"Pushing something\n",
    }
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def _unchanged(files: dict[Path, bytes]) -> bool:
    return all(path.is_file() and path.read_bytes() == data for path, data in files.items())


def test_a_real_dataset_root_is_refused_and_left_untouched(tmp_path):
    files = _fake_ssv2_root(tmp_path / "ssv2")
    with pytest.raises(ValueError, match=r"(?s)dataset.root=.*ssv2.*did not write.*dataset=ssv2"):
        ensure_synthetic(tmp_path / "ssv2", **LIFECYCLE)
    assert _unchanged(files)
    assert not (tmp_path / "ssv2" / "manifest.json").exists()


def test_regeneration_deletes_only_the_generators_own_files(tmp_path):
    root = tmp_path / "syn"
    ensure_synthetic(root, **LIFECYCLE)
    mine = root / "videos" / "train" / "my_notes.txt"
    mine.write_text("keep me")
    with pytest.raises(ValueError, match="my_notes.txt"):
        ensure_synthetic(root, **{**LIFECYCLE, "num_frames": 10})
    assert mine.read_text() == "keep me"
    assert json.loads((root / "manifest.json").read_text())["params"] == {"task": "direction", **LIFECYCLE}
    mine.unlink()
    ensure_synthetic(root, **{**LIFECYCLE, "num_frames": 10})
    manifest = json.loads((root / "manifest.json").read_text())
    listed = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != ".lock"}
    assert set(manifest["files"]) == listed


def test_an_old_manifest_without_a_file_list_still_owns_its_files(tmp_path):
    root = tmp_path / "syn"
    ensure_synthetic(root, **LIFECYCLE)
    manifest = json.loads((root / "manifest.json").read_text())
    del manifest["files"]
    (root / "manifest.json").write_text(json.dumps(manifest))
    ensure_synthetic(root, **{**LIFECYCLE, "train_per_class": 1})
    assert len(list(root.glob("videos/train/*/*"))) == 8


def test_train_py_on_a_real_dataset_root_fails_and_deletes_nothing(tmp_path):
    files = _fake_ssv2_root(tmp_path / "x")
    overrides = [f"dataset.root={tmp_path / 'x'}", "trainer.max_steps=1", f"hydra.run.dir={tmp_path / 'run'}"]
    result = run_script("train.py", *overrides, cwd=REPO)
    assert result.returncode != 0
    assert "did not write" in result.stderr and "dataset=ssv2" in result.stderr
    assert _unchanged(files)


def test_failed_generation_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    root = tmp_path / "syn"

    def crash(staging, params):
        (staging / "videos").mkdir()
        (staging / "train.txt").write_text("videos/half_written.mp4 0\n")
        raise RuntimeError("encoder died")

    monkeypatch.setattr(synthetic, "_generate_in_subprocess", crash)
    with pytest.raises(RuntimeError, match="encoder died"):
        ensure_synthetic(root, **LIFECYCLE)
    assert sorted(p.name for p in root.iterdir()) == [".lock"]
    monkeypatch.undo()
    splits = ensure_synthetic(root, **LIFECYCLE)
    assert len(list_entries(splits.train_list)) == 8 * LIFECYCLE["train_per_class"]


@pytest.mark.parametrize(
    "bad, key",
    [
        (dict(size=47), "size"),
        (dict(size=16), "size"),
        (dict(train_per_class=0), "train_per_class"),
        (dict(num_frames=1), "num_frames"),
        (dict(fps=2.5), "fps"),
        (dict(seed=-1), "seed"),
    ],
)
def test_bad_parameters_name_the_key(tmp_path, bad, key):
    with pytest.raises(ValueError, match=key):
        ensure_synthetic(tmp_path / "syn", **{**SMALL, **bad})
    assert not (tmp_path / "syn" / "manifest.json").exists()


@pytest.mark.slow
def test_default_size_generation_and_dataset(tmp_path):
    from squarefuse.datasets import build_dataset  # noqa: PLC0415

    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "configs"), version_base="1.3"):
        defaults = compose("train", overrides=["dataset=synthetic"]).dataset  # every key a dataset config has
    generate = OmegaConf.to_container(defaults.generate)
    num_train, num_val = 8 * generate["train_per_class"], 8 * generate["val_per_class"]

    start = time.perf_counter()
    splits = ensure_synthetic(tmp_path / "syn", task=defaults.task, **generate)
    seconds = time.perf_counter() - start
    print(f"\nsynthetic dataset, default size ({num_train} train + {num_val} val videos): {seconds:.1f} s")
    assert len(list_entries(splits.train_list)) == num_train
    assert len(list_entries(splits.val_list)) == num_val

    cfg = OmegaConf.merge(
        defaults,
        {
            "name": "synthetic",
            "root": str(tmp_path / "syn"),
            "num_frames": 8,
            "sampling": "segment",
            "decoder": "decord",
            "decode_timeout": 0,
            "crop_size": 64,
            "scale": [0.5, 1.0],
            "hflip": False,
        },
    )
    train = build_dataset(cfg, "train")
    val = build_dataset(cfg, "val")
    assert train.class_names == list(CLASS_NAMES) and len(train) == num_train and len(val) == num_val
    item = train[0]
    assert item["video"].shape == (8, 3, 64, 64) and item["video"].dtype == torch.uint8
    assert item["label"] == 0 and item["num_replaced"] == 0
    item = val[len(val) - 1]
    assert item["video"].shape == (1, 8, 3, 64, 64) and not item["failed"]
    assert item["label"] == len(CLASS_NAMES) - 1


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads child processes from /proc")
def test_the_generator_dies_with_a_killed_caller(tmp_path):
    # The README promises that a killed trainer takes its processes with it; SIGKILL runs no clean-up,
    # so the generator process must end by itself. Enough videos that it would run for minutes.
    root = tmp_path / "data"
    caller = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from squarefuse.datasets.synthetic import ensure_synthetic; "
            f"ensure_synthetic({str(root)!r}, **{dict(SMALL, train_per_class=5000)!r})",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    generators: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not (generators and list(root.glob(".staging-*/videos/train/*/*"))):  # it is writing videos
            assert caller.poll() is None, caller.communicate()[1]
            assert time.monotonic() < deadline, "the generator did not start"
            generators = children_of(caller.pid)
            time.sleep(0.05)
        caller.kill()
        caller.wait()
        assert wait_gone(generators, timeout=5) == []
    finally:
        caller.kill()
        kill_all(generators)
