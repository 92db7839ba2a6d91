"""Decoders: decord and PyAV agree, bad files raise DecodeError, a hung decoder is killed in time."""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import pytest
import torch
from conftest import frame_level

from squarefuse.datasets import video_reader
from squarefuse.datasets.decode_backends import PyAVBackend
from squarefuse.datasets.video_reader import DecodeError, DecodeTimeout, open_video, resolve_decoder

BOTH = ["decord", "pyav"]
GUARD = [None, 20.0]  # in-process, and in the guarded decoding process


@pytest.mark.parametrize("ext,size", [(".mp4", (64, 48)), (".webm", (64, 48)), (".mp4", (50, 34)), (".webm", (45, 32))])
def test_decord_and_pyav_return_identical_frames(make_video, tmp_path, ext, size):
    width, height = size
    path = make_video(tmp_path / f"v{ext}", num_frames=37, width=width, height=height)
    indices = [0, 5, 36, 5, 17, 18, 2, 30, 36]  # unsorted, repeated, last frame
    out = {}
    for name in BOTH:
        with open_video(path, name) as video:
            assert (video.num_frames, video.height, video.width) == (37, height, width)
            assert video.fps == pytest.approx(12.0)
            out[name] = video.get_frames(indices)
    assert out["decord"].dtype == torch.uint8 and out["decord"].shape == (len(indices), height, width, 3)
    # Measured: exactly equal on H.264 and VP9 (both use FFmpeg's decoders and RGB conversion).
    assert torch.equal(out["decord"], out["pyav"])


@pytest.mark.parametrize("name", BOTH)
@pytest.mark.parametrize("timeout", GUARD)
@pytest.mark.parametrize("ext", [".mp4", ".webm"])
def test_frames_are_the_requested_ones(make_video, tmp_path, name, timeout, ext):
    path = make_video(tmp_path / f"v{ext}", num_frames=27)
    indices = [26, 0, 13, 7, 7]
    with open_video(path, name, timeout=timeout) as video:
        frames = video.get_frames(indices)
        beyond = video.get_frames([26, 27, 1000])  # clamped to the last frame
    green = frames[..., 1].float().mean(dim=(1, 2))
    expected = torch.tensor([frame_level(t) for t in indices], dtype=torch.float32)
    assert torch.allclose(green, expected, atol=4), (green, expected)
    assert torch.equal(beyond[1], beyond[0]) and torch.equal(beyond[2], beyond[0])
    # The left-to-right ramp of the red channel survives decoding (no flip inside the decoder).
    assert frames[0, :, -4:, 0].float().mean() > frames[0, :, :4, 0].float().mean() + 150


@pytest.mark.parametrize("name", BOTH)
@pytest.mark.parametrize("timeout", GUARD)
def test_bad_files_raise_decode_error_naming_the_file(bad_videos, tmp_path, name, timeout):
    for path in [*bad_videos.values(), tmp_path / "does_not_exist.mp4"]:
        with pytest.raises(DecodeError, match=str(path.name)):
            with open_video(path, name, timeout=timeout) as video:
                video.get_frames(range(video.num_frames))


def test_pyav_clamps_indices_past_the_real_end(make_video, tmp_path):
    """A container that lists more frames than decode (decord's over-count) gets the last real frame."""
    path = make_video(tmp_path / "v.mp4", num_frames=12)
    backend = PyAVBackend(str(path))
    real_last = backend.read([11])
    # Pretend the index lists 3 frames that never decode.
    step = backend._frame_pts[1] - backend._frame_pts[0]
    backend._frame_pts += [backend._frame_pts[-1] + step * k for k in (1, 2, 3)]
    backend.num_frames += 3
    frames = backend.read([10, 11, 12, 14])
    backend.close()
    assert frames.shape[0] == 4
    assert np.array_equal(frames[2], real_last[0]) and np.array_equal(frames[3], real_last[0])


def _fifo(tmp_path, name="hangs.mp4"):
    # Opening a FIFO nobody writes to blocks inside FFmpeg's open(): a real decoder call stuck in C.
    path = tmp_path / name
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("name", BOTH)
def test_hung_decoder_is_killed_within_the_timeout(make_video, tmp_path, name):
    fifo = _fifo(tmp_path)
    good = make_video(tmp_path / "good.webm", num_frames=10)
    with open_video(good, name, timeout=20.0) as video:  # the decoding process is up and warm
        video.get_frames([0])
    start = time.monotonic()
    with pytest.raises(DecodeTimeout, match="hangs.mp4"):
        open_video(fifo, name, timeout=1.0)
    assert time.monotonic() - start < 6.0
    # The job goes on: the next video decodes in a fresh process.
    with open_video(good, name, timeout=20.0) as video:
        assert video.get_frames([3]).shape == (1, 48, 64, 3)


class _SleepHoldingTheGil:
    """Unpickled in the decoding process as a C call that sleeps while holding the GIL."""

    def __reduce__(self):
        return (eval, ("__import__('ctypes').PyDLL(None).sleep(60)",))


class _CrashTheProcess:
    """Unpickled in the decoding process as an immediate exit (a decoder crashing it)."""

    def __reduce__(self):
        return (os._exit, (3,))


def test_guard_does_not_need_the_gil_and_survives_crashes(make_video, tmp_path):
    good = make_video(tmp_path / "good.mp4", num_frames=10)
    process = video_reader._decode_process()
    with open_video(good, "decord", timeout=20.0) as video:
        video.get_frames([0])
        start = time.monotonic()
        with pytest.raises(DecodeTimeout, match="stuck.mp4"):
            process.request(("read", 1, _SleepHoldingTheGil()), path="stuck.mp4", timeout=1.0)
        assert time.monotonic() - start < 6.0
    with open_video(good, "decord", timeout=20.0) as video:
        with pytest.raises(DecodeError, match="crash.mp4: the decoding process died .*exit code 3"):
            process.request(("read", 1, _CrashTheProcess()), path="crash.mp4", timeout=20.0)
    with open_video(good, "decord", timeout=20.0) as video:
        assert video.get_frames([9]).shape[0] == 1


def test_resolve_decoder(monkeypatch, caplog):
    assert resolve_decoder("pyav") == "pyav"
    with pytest.raises(ValueError, match="dataset.decoder='opencv'"):
        resolve_decoder("opencv")
    monkeypatch.setattr(video_reader, "_decord_installed", lambda: False)
    monkeypatch.setattr(video_reader, "_fallback_warned", False)
    with caplog.at_level(logging.WARNING):
        assert resolve_decoder("decord") == "pyav"
        assert resolve_decoder("decord") == "pyav"
    assert sum("decord is not installed" in r.message for r in caplog.records) == 1


def test_decoding_process_is_recycled_between_videos(make_video, tmp_path, monkeypatch):
    monkeypatch.setattr(video_reader, "_RECYCLE_AFTER_OPENS", 2)
    path = make_video(tmp_path / "v.mp4", num_frames=6)
    process = video_reader._decode_process()
    process.close()
    generations = []
    for _ in range(5):
        with open_video(path, "pyav", timeout=20.0) as video:
            video.get_frames([5])
            generations.append(process.generation)
    first = generations[0]
    assert generations == [first, first, first + 1, first + 1, first + 2]
