"""dataset.decode_device=cuda: start-up check, index-only train items, and the batch decoder's logic.

The batch decoder runs here on torchcodec's CPU decoder (`device="cpu"`): the same code as on the
GPU but for the device; NVDEC itself is checked by `pytest -m gpu` (tests/test_gpu.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from squarefuse.datasets.annotations import VideoRecord
from squarefuse.datasets.build import build_gpu_decoder
from squarefuse.datasets.decoding import gpu
from squarefuse.datasets.decoding.gpu import GpuClipDecoder, check_decode_device
from squarefuse.datasets.decoding.video_reader import open_video
from squarefuse.datasets.frame_sampling import FrameSampler
from squarefuse.datasets.transforms import TrainTransform
from squarefuse.datasets.video_dataset import VideoDataset


def test_cuda_decoding_without_cuda_is_a_clear_start_up_error(monkeypatch):
    monkeypatch.setattr(gpu.torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"dataset.decode_device=cuda .*no CUDA device.*decode_device=cpu"):
        check_decode_device("cuda")
    with pytest.raises(ValueError, match="dataset.decode_device='gpu'"):
        check_decode_device("gpu")
    assert check_decode_device("cpu") == "cpu"


def _train_set(paths, *, decode_device: str, repeated_aug: int = 1) -> VideoDataset:
    return VideoDataset(
        [VideoRecord(path=str(p), label=i, id=str(i)) for i, p in enumerate(paths)],
        class_names=[str(i) for i in range(len(paths))],
        frame_sampler=FrameSampler(sampling="segment", num_frames=4, train=True),
        train=True,
        crop_size=32,
        train_transform=TrainTransform(crop_size=32, scale=(0.5, 1.0)),
        eval_short_side=36,
        num_crops=1,
        decoder="pyav",
        fallback_decoder=None,
        decode_timeout=None,
        decode_short_side=None,
        repeated_aug=repeated_aug,
        decode_device=decode_device,
        max_replacements=0,
    )


@pytest.mark.torchcodec
def test_index_only_items_decoded_in_the_training_process_match_cpu_decoding(make_video, tmp_path):
    paths = [make_video(tmp_path / f"v{i}{ext}", num_frames=20) for i, ext in enumerate([".mp4", ".webm"])]
    train_set = _train_set(paths, decode_device="cuda", repeated_aug=2)
    items = [train_set[i] for i in range(2)]
    assert "video" not in items[0] and items[0]["frame_index"].shape == (4,)
    index_BT = torch.stack([item["frame_index"] for item in items])
    decoder = build_gpu_decoder(train_set, "cpu")
    assert isinstance(decoder, GpuClipDecoder) and decoder.repeated_aug == 2
    for b, path in enumerate(paths):
        with open_video(path, "decord") as video:
            expected = video.get_frames(index_BT[b].tolist()).permute(0, 3, 1, 2)
        assert torch.equal(decoder.decode(str(path), index_BT[b]), expected)
    video, replaced = decoder([str(p) for p in paths], index_BT)
    assert video.shape == (2, 2, 4, 3, 32, 32) and video.dtype == torch.uint8 and replaced == 0


@pytest.mark.torchcodec
def test_a_video_that_fails_everywhere_is_replaced_within_the_batch(make_video, tmp_path, bad_videos):
    good = make_video(tmp_path / "good.mp4", num_frames=20)
    decoder = GpuClipDecoder(
        device="cpu", transform=lambda v: v[..., :16, :16], short_side=None, cpu_decoder="pyav", decode_timeout=None
    )
    index_BT = torch.from_numpy(np.array([[0, 5, 10, 15]] * 3))
    video, replaced = decoder([str(good), str(bad_videos["text"]), str(good)], index_BT)
    assert replaced == 1 and video.shape == (3, 4, 3, 16, 16)
    assert torch.equal(video[1], video[0])


@pytest.mark.torchcodec
def test_large_videos_are_scaled_like_decode_time_resize(make_video, tmp_path):
    path = make_video(tmp_path / "big.mp4", num_frames=6, width=320, height=240)
    decoder = GpuClipDecoder(
        device="cpu", transform=lambda v: v, short_side=96, cpu_decoder="pyav", decode_timeout=None
    )
    frames = decoder.decode(str(path), torch.tensor([0, 5]))
    assert frames.shape == (2, 3, 96, 128)
    with open_video(path, "pyav", short_side=96) as video:
        cpu = video.get_frames([0, 5]).permute(0, 3, 1, 2)
    assert (frames.float() - cpu.float()).abs().mean() < 3
