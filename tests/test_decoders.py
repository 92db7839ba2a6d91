"""Decoders: decord, PyAV and torchcodec agree (also on rotated videos), decode-time resize, bad files raise
DecodeError, a hung decoder is killed in time."""

from __future__ import annotations

import logging
import os
import time

import av
import numpy as np
import pytest
import torch
from helpers.videos import frame_level, video_frames
from torchvision.transforms.v2 import functional as F

from squarefuse.datasets.decoding import video_reader
from squarefuse.datasets.decoding.backends import PyAVBackend, _decord_safe_width, decode_size
from squarefuse.datasets.decoding.video_reader import (
    DecodeError,
    DecodeTimeout,
    open_video,
    resolve_decoder,
)

TORCHCODEC = pytest.param("torchcodec", marks=pytest.mark.torchcodec)
BOTH = ["decord", "pyav"]
ALL = [*BOTH, TORCHCODEC]
GUARD = [None, 20.0]  # in-process, and in the guarded decoding process


@pytest.mark.parametrize("ext,size", [(".mp4", (64, 48)), (".webm", (64, 48)), (".mp4", (50, 34)), (".webm", (45, 32))])
@pytest.mark.parametrize("other", ["pyav", TORCHCODEC])
def test_decoders_return_frames_identical_to_decord(make_video, tmp_path, ext, size, other):
    width, height = size
    path = make_video(tmp_path / f"v{ext}", num_frames=37, width=width, height=height)
    indices = [0, 5, 36, 5, 17, 18, 2, 30, 36]  # unsorted, repeated, last frame
    out = {}
    for name in ("decord", other):
        with open_video(path, name) as video:
            assert (video.num_frames, video.height, video.width) == (37, height, width)
            assert video.fps == pytest.approx(12.0)
            out[name] = video.get_frames(indices)
    assert out["decord"].dtype == torch.uint8 and out["decord"].shape == (len(indices), height, width, 3)
    # Measured: exactly equal on H.264 and VP9 (all use FFmpeg's decoders and RGB conversion).
    assert torch.equal(out["decord"], out[other])


@pytest.mark.parametrize("name", ALL)
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


@pytest.mark.parametrize("name", ALL)
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


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
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


@pytest.mark.parametrize("name", BOTH)
def test_hang_on_the_first_video_of_a_fresh_process_costs_the_timeout_only(tmp_path, name):
    # Before: the first open with a decoder had 60 s of start-up margin added to its timeout, so
    # a first video that hangs cost timeout + 60 s. Now the margin covers only the library import.
    fifo = _fifo(tmp_path)
    video_reader._decode_process().close()  # the next open starts a fresh process
    start = time.monotonic()
    with pytest.raises(DecodeTimeout, match=r"hangs.mp4: the decoder did not answer within 2 s \(open\)"):
        open_video(fifo, name, timeout=2.0)
    # Generous: a fresh process and the decoder's import take ~1 s on an idle machine.
    assert time.monotonic() - start < 2.0 + 15


def test_decoder_library_that_does_not_load_is_named(make_video, tmp_path, monkeypatch):
    path = make_video(tmp_path / "v.mp4", num_frames=4)
    video_reader._decode_process().close()
    # The decoding process inherits this environment: a module path that shadows PyAV with a broken one.
    (tmp_path / "av").mkdir()
    (tmp_path / "av" / "__init__.py").write_text("raise ImportError('a broken PyAV')\n")
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    with pytest.raises(DecodeError, match="v.mp4: the decoding process could not load pyav: ImportError: a broken"):
        open_video(path, "pyav", timeout=20.0)
    monkeypatch.undo()
    video_reader._decode_process().close()
    with open_video(path, "pyav", timeout=20.0) as video:
        assert video.get_frames([3]).shape[0] == 1


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


def test_torchcodec_that_cannot_load_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(video_reader, "torchcodec_problem", lambda: "torchcodec is not installed")
    with pytest.raises(ValueError, match=r"dataset.decoder=torchcodec: torchcodec is not installed.*apt-get install"):
        resolve_decoder("torchcodec")


def _write_rotated(path, degrees: int, *, width: int = 128, height: int = 96):
    """An H.264 mp4 whose display matrix turns it `degrees` counter-clockwise (a phone video)."""
    frames = video_frames(12, width, height)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=12)
        stream.height, stream.width, stream.pix_fmt = height, width, "yuv420p"
        stream.options = {"crf": "12", "preset": "ultrafast", "g": "8"}
        stream.set_display_rotation(degrees)
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return frames


@pytest.mark.skipif(
    not hasattr(av.video.stream.VideoStream, "set_display_rotation"), reason="PyAV < 18 cannot write it"
)
@pytest.mark.parametrize("degrees", [90, -90, 180])
def test_rotated_videos_decode_upright_and_identical_with_every_decoder(tmp_path, degrees):
    path = tmp_path / f"rot{degrees}.mp4"
    stored = _write_rotated(path, degrees)
    upright = np.rot90(stored, k=degrees // 90, axes=(1, 2))  # as FFmpeg's own tools display it
    names = ["decord", "pyav"] + ([] if video_reader.torchcodec_problem() else ["torchcodec"])
    out = {}
    for name in names:
        for timeout in GUARD:
            with open_video(path, name, timeout=timeout) as video:
                assert (video.height, video.width) == upright.shape[1:3], (name, timeout)
                frames = video.get_frames([0, 7, 11])
            assert frames.shape == (3, *upright.shape[1:]), (name, timeout)
            out[name, timeout] = frames
    # Upright: the pattern turned as the display matrix says, within compression noise.
    assert (out["pyav", None].float() - torch.from_numpy(upright[[0, 7, 11]]).float()).abs().mean() < 4
    for key, frames in out.items():
        assert torch.equal(frames, out["decord", None]), key
    # Decode-time resize keeps the upright aspect ratio (decord's size applies after its rotation).
    expected = (53, 40) if degrees % 180 else (40, 53)
    for name in names:
        with open_video(path, name, short_side=40) as video:
            small = video.get_frames([7])
        assert small.shape == (1, *expected, 3), name
        reference = F.resize(out[name, None][1:2].permute(0, 3, 1, 2), list(expected), antialias=True)
        assert (small.permute(0, 3, 1, 2).float() - reference.float()).abs().mean() < 4, name


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("timeout", GUARD)
def test_decode_time_resize_gives_the_short_side_close_to_decode_then_resize(make_video, tmp_path, name, timeout):
    path = make_video(tmp_path / "big.mp4", num_frames=10, width=320, height=240)
    with open_video(path, name, timeout=timeout) as video:
        full = video.get_frames([0, 9])
    with open_video(path, name, timeout=timeout, short_side=96) as video:
        assert (video.height, video.width) == (96, 128)
        small = video.get_frames([0, 9])
    assert small.shape == (2, 96, 128, 3)
    reference = F.resize(full.permute(0, 3, 1, 2), [96], antialias=True).permute(0, 2, 3, 1)
    assert (small.float() - reference.float()).abs().mean() < 3
    # Near the wanted size (short side <= 1.25x): decoded as stored, not resampled twice.
    with open_video(path, name, timeout=timeout, short_side=200) as video:
        assert torch.equal(video.get_frames([0, 9]), full)


def test_decode_size():
    assert decode_size(720, 1280, 256) == (256, 455)
    assert decode_size(1280, 720, 256) == (455, 256)
    assert decode_size(320, 426, 256) is None  # 320 <= 1.25 * 256: not worth a second resampling
    assert decode_size(720, 1280, None) is None


def test_decord_width_avoids_its_row_padding_bug(make_video, tmp_path):
    import decord  # noqa: PLC0415 - decord loads after torch

    path = make_video(tmp_path / "v.mp4", num_frames=3, width=320, height=240)
    assert _decord_safe_width(96) == 96
    for width in (16, 24, 48, 72):
        with pytest.raises(decord.DECORDError):  # the bug the safe width avoids
            decord.VideoReader(str(path), width=width, height=40).get_batch([0]).asnumpy()
        safe = _decord_safe_width(width)
        assert abs(safe - width) <= 2
        assert decord.VideoReader(str(path), width=safe, height=40).get_batch([0]).asnumpy().shape == (1, 40, safe, 3)
