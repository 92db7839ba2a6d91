"""Shared fixtures: tiny real video files (tests/helpers/videos.py) made on demand, and the tiny
synthetic dataset of `tiny_overrides`, generated once per session and copied to each module.

def test_x(make_video, tmp_path):
    path = make_video(tmp_path / "a.mp4", num_frames=20, width=64, height=48)

def test_y(data_root, tmp_path):
    Trainer(tiny_train_config(data_root), tmp_path / "run").fit()
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import av  # noqa: F401 - before anything loads decord: PyAV's VP9 encoder fails to open after it
import pytest
from helpers.configs import tiny_train_config
from helpers.videos import write_video

from squarefuse.datasets.synthetic import ensure_synthetic


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Modules with slow tests first (otherwise in file order): pytest-xdist's loadfile hands out
    # whole modules in this order (`--no-loadscope-reorder`: by default it hands out the modules
    # with the most tests first), and a long module handed out last runs alone while the other
    # workers wait.
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)


def pytest_runtest_setup(item: pytest.Item) -> None:
    # At setup, not at collection: the check starts an interpreter that imports torch (~4 s), which
    # every pytest-xdist worker would pay while collecting, though one worker runs these tests.
    if not item.get_closest_marker("torchcodec"):
        return
    from squarefuse.datasets.decoding.video_reader import TORCHCODEC_INSTALL, torchcodec_problem  # noqa: PLC0415

    if (problem := torchcodec_problem()) is not None:
        pytest.skip(f"{problem}: {TORCHCODEC_INSTALL}")


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory) -> Path:
    """The synthetic videos of `tiny_overrides`, generated once per session; tests use copies (`data_root`)."""
    root = tmp_path_factory.mktemp("tiny_synthetic")
    dataset = tiny_train_config(root).dataset
    ensure_synthetic(root, task=dataset.task, **dict(dataset.generate))
    return root


@pytest.fixture(scope="module")
def data_root(tiny_synthetic, tmp_path_factory) -> Path:
    """This module's own copy of `tiny_synthetic`: what one module's tests write there stays in that module.

    A module with other data (a list dataset) defines its own `data_root`, which takes precedence.
    """
    root = tmp_path_factory.mktemp("synthetic")
    shutil.copytree(tiny_synthetic, root, dirs_exist_ok=True)
    return root


@pytest.fixture
def make_video() -> Callable[..., Path]:
    """`write_video` as a fixture."""
    return write_video


@pytest.fixture
def bad_videos(tmp_path: Path) -> dict[str, Path]:
    """Files that are not decodable videos: zero-byte, text, truncated mp4 (both moov placements)."""
    folder = tmp_path / "bad"
    folder.mkdir()
    zero = folder / "zero.mp4"
    zero.write_bytes(b"")
    text = folder / "text.mp4"
    text.write_text("this is not a video\n" * 20)
    out = {"zero": zero, "text": text}
    for name, faststart in (("truncated", False), ("truncated_faststart", True)):
        full = write_video(folder / f"full_{name}.mp4", num_frames=30, faststart=faststart)
        data = full.read_bytes()
        full.unlink()
        cut = folder / f"{name}.mp4"
        cut.write_bytes(data[: len(data) // 2])
        out[name] = cut
    return out


@pytest.fixture
def no_network(monkeypatch):
    """Makes every timm weight download fail, as on a machine without network access."""
    # Here, not at the top: pytest-xdist's controller process imports this file too but runs no
    # test, and timm (with torch and torchvision) is ~7 s of its start-up on 2 cores.
    import timm.models._builder as builder  # noqa: PLC0415

    def refuse(*args, **kwargs):
        raise OSError("network disabled in tests")

    for fn in ("load_state_dict_from_hf", "load_state_dict_from_url", "download_cached_file"):
        monkeypatch.setattr(builder, fn, refuse)
