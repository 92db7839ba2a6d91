"""write_video: the one PyAV encoding helper (atomic: a failed write leaves nothing new behind)."""

from __future__ import annotations

import av
import numpy as np
import pytest

from squarefuse.datasets.synthetic.encoding import write_video


def _frames(count: int, width: int = 48, height: int = 32):
    for t in range(count):
        frame = np.zeros((height, width, 3), dtype=np.uint8)
        frame[..., 1] = 20 + 8 * t
        yield frame


def _probe(path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        return frames, stream.codec_context.width, stream.codec_context.height, stream.codec_context.name


@pytest.mark.parametrize("name,codec,decoded", [("a.mp4", "libx264", "h264"), ("b.webm", "libvpx-vp9", "vp9")])
def test_writes_every_frame_and_no_temporary_file(tmp_path, name, codec, decoded):
    path = write_video(tmp_path / "sub" / name, _frames(9), 12, codec, options={"g": "4"})
    assert path == tmp_path / "sub" / name
    assert _probe(path) == (9, 48, 32, decoded)
    assert sorted(p.name for p in path.parent.iterdir()) == [name]


def test_pyav_frames_are_retimed_at_the_given_rate(tmp_path):
    source = write_video(tmp_path / "src.mp4", _frames(6), 10, "libx264")
    with av.open(str(source)) as src:
        frames = [f.reformat(width=24, height=16, format="yuv420p") for f in src.decode(video=0)]
    out = write_video(tmp_path / "out.mp4", iter(frames), 5, "libx264", container_format="mp4", threads=1)
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        assert stream.average_rate == 5 and (stream.codec_context.width, stream.codec_context.height) == (24, 16)
        assert sum(1 for _ in container.decode(stream)) == 6


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing_behind(tmp_path):
    target = tmp_path / "clip.mp4"
    target.write_bytes(b"the previous version")

    def broken():
        yield from _frames(3)
        raise RuntimeError("source ended early")

    with pytest.raises(RuntimeError, match="source ended early"):
        write_video(target, broken(), 12, "libx264")
    with pytest.raises(ValueError, match="clip.mp4: no frames to write"):
        write_video(target, [], 12, "libx264")
    assert target.read_bytes() == b"the previous version"
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]
