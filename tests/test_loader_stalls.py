"""No app waits on its data loader without bound: decoding in a forked worker after this process
decoded does not hang (PyAV's per-thread converter), and a worker that gets stuck or dies ends the
batch loop with an error naming the batch's videos and what to change."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from squarefuse.apps.batch_settings import batch_settings
from squarefuse.datasets.decoding.video_reader import open_video
from squarefuse.datasets.preprocess import VideoNormalizer
from squarefuse.evaluation.inference_loop import BatchSettings, run_batches
from squarefuse.runtime.workers import LoaderStalled

CPU = torch.device("cpu")
STUCK, KILLED = 5, 0  # the items that hang / kill their worker


def _read_frames(path: str) -> None:
    with open_video(path, "pyav") as video:
        video.get_frames([0, 3, 6])


def test_a_worker_forked_after_this_process_decoded_can_decode(make_video, tmp_path):
    # PyAV >= 18 keeps each thread's RGB converter, and with it FFmpeg's scaling threads (one per
    # core); a forked child inherited the converter without the threads and waited for them for ever.
    path = str(make_video(tmp_path / "a.mp4", num_frames=10, width=40, height=32))
    _read_frames(path)  # here first: what eval/predict in-process, or an earlier test, does
    child = multiprocessing.get_context("fork").Process(target=_read_frames, args=(path,))
    child.start()
    child.join(timeout=30)
    hung = child.is_alive()
    if hung:
        child.kill()
        child.join()
    assert not hung, "decoding in the forked child hung"
    assert child.exitcode == 0


class _Items:
    """Eval items of 1 view; item STUCK never returns, item KILLED kills its worker (when `kill`)."""

    def __init__(self, n: int, *, kill: bool = False) -> None:
        self.records = [SimpleNamespace(path=f"/videos/v{i}.mp4") for i in range(n)]
        self.kill = kill

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        if index == STUCK:
            time.sleep(3600)  # a decoder stuck in C, an NFS read that never returns
        if self.kill and index == KILLED:
            os.kill(os.getpid(), signal.SIGKILL)  # the OOM killer
        return {
            "video": torch.zeros(1, 2, 3, 8, 8, dtype=torch.uint8),
            "mask": torch.ones(1, 2, dtype=torch.bool),
            "label": 0,
            "index": index,
            "failed": False,
        }


def _settings(timeout: float) -> BatchSettings:
    normalizer = VideoNormalizer([0.5] * 3, [0.5] * 3, CPU)
    return BatchSettings(CPU, normalizer, batch_size=2, num_workers=1, precision="fp32", loader_timeout=timeout)


def _mean(video: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"mean": video.flatten(1).mean(dim=1)}


def _no_worker_left() -> bool:
    return not any(p.is_alive() for p in multiprocessing.active_children())


def test_a_stuck_worker_ends_the_batch_loop_with_an_error_naming_the_batch(tmp_path):
    started = time.monotonic()
    with pytest.raises(LoaderStalled) as error:
        run_batches(_mean, _Items(8), _settings(timeout=2), shard=range(8))
    elapsed = time.monotonic() - started
    message = str(error.value)
    assert "batch 2 (videos 4, 5 (/videos/v4.mp4, /videos/v5.mp4))" in message, message
    assert "timed out after 2 seconds" in message
    assert "num_workers=0" in message and "loader_timeout=" in message
    assert elapsed < 30, elapsed  # the timeout, not the hour the item sleeps
    assert _no_worker_left()  # the stuck worker (it ignores SIGTERM) was killed


def test_a_dead_worker_ends_the_batch_loop_at_once_naming_its_pid(tmp_path):
    started = time.monotonic()
    with pytest.raises(LoaderStalled) as error:
        run_batches(_mean, _Items(4, kill=True), _settings(timeout=600), shard=range(4))
    message = str(error.value)
    # Item 0: the worker dies while this process waits for the first batch. (PyTorch's SIGCHLD
    # handler raises wherever the main thread is; a death while it computes a batch surfaces as
    # PyTorch's own RuntimeError, which names the pid but not the videos.)
    assert "batch 0 (videos 0, 1 (" in message and "DataLoader worker (pid" in message, message
    assert time.monotonic() - started < 60  # found dead at once, not after the 600 s timeout
    assert _no_worker_left()


def test_a_batch_loop_without_stalls_is_unchanged():
    out = run_batches(_mean, _Items(5), _settings(timeout=30), shard=[4, 0, 3])
    assert out["indices"].tolist() == [4, 0, 3] and out["errors"] == {}


@pytest.mark.parametrize("value", [0, -5, "soon", float("inf")])
def test_loader_timeout_must_be_seconds_above_zero(value):
    cfg = OmegaConf.create({"batch_size": 2, "num_workers": 1, "precision": "fp32", "loader_timeout": value})
    with pytest.raises(ValueError, match="loader_timeout="):
        batch_settings(cfg, CPU, VideoNormalizer([0.5] * 3, [0.5] * 3, CPU))


def test_loader_timeout_is_read_from_the_app_config():
    cfg = OmegaConf.create({"batch_size": 2, "num_workers": 1, "precision": "fp32", "loader_timeout": 7})
    assert batch_settings(cfg, CPU, VideoNormalizer([0.5] * 3, [0.5] * 3, CPU)).loader_timeout == 7.0
