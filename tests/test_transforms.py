"""Clip transforms: one set of random parameters per clip, uint8 erasing, eval crops."""

from __future__ import annotations

import pytest
import torch

from squarefuse.datasets.build import build_device_augment
from squarefuse.datasets.transforms import (
    DeviceAugment,
    RandomErasingUint8,
    TrainTransform,
    default_eval_short_side,
    eval_views,
)


def _ramp_clip(T=4, H=48, W=64):
    """uint8 [T,3,H,W]: red rises left to right, blue top to bottom, frames identical."""
    x = torch.linspace(0, 255, W).round().to(torch.uint8)
    y = torch.linspace(0, 255, H).round().to(torch.uint8)
    frame = torch.stack([x.expand(H, W), torch.full((H, W), 100, dtype=torch.uint8), y[:, None].expand(H, W)])
    return frame.expand(T, 3, H, W).clone()


def _is_flipped(video_TCHW):
    red = video_TCHW[:, 0].float()
    return red[..., :4].mean() > red[..., -4:].mean()


def test_train_transform_same_random_parameters_for_all_frames():
    clip = _ramp_clip()
    transform = TrainTransform(crop_size=32, hflip=True, randaug_n=3, randaug_m=9, random_erasing=1.0)
    for _ in range(10):
        out = transform(clip.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2))  # channels-last view
        assert out.shape == (4, 3, 32, 32) and out.dtype == torch.uint8
        assert all(torch.equal(out[0], out[t]) for t in range(1, 4))


def test_hflip_only_when_asked():
    clip = _ramp_clip()
    no_flip = TrainTransform(crop_size=32, hflip=False)
    assert not any(_is_flipped(no_flip(clip)) for _ in range(30))
    flip = TrainTransform(crop_size=32, hflip=True)
    flips = sum(_is_flipped(flip(clip)) for _ in range(60))
    assert 10 < flips < 50


def test_random_erasing_fills_uint8_with_uniform_noise():
    # torchvision's value="random" on uint8 writes 0..3 and 253..255 (normal floats cast to uint8).
    clip = torch.full((3, 3, 64, 64), 200, dtype=torch.uint8)
    erase = RandomErasingUint8(p=1.0, scale=(0.2, 0.3))
    torch.manual_seed(0)
    out = erase(clip)
    changed = out != clip
    assert changed.any()
    assert torch.equal(changed[0], changed[1])  # the same patch in every frame
    values = out[changed].float()
    assert 100 < values.mean() < 155
    assert ((values > 10) & (values < 245)).float().mean() > 0.8


def test_eval_views_three_crops_along_the_long_side():
    landscape = _ramp_clip(T=2, H=48, W=96)
    views = eval_views(landscape, short_side=32, crop_size=32, num_crops=3)
    assert views.shape == (3, 2, 3, 32, 32)
    red = views[:, :, 0].float().mean(dim=(1, 2, 3))
    assert red[0] < red[1] < red[2]  # left, centre, right
    blue = views[:, :, 2].float().mean(dim=(1, 2, 3))
    assert torch.allclose(blue, blue[1], atol=1)  # all at the same height (short side fits)

    portrait = _ramp_clip(T=2, H=96, W=48)
    views = eval_views(portrait, short_side=32, crop_size=32, num_crops=3)
    blue = views[:, :, 2].float().mean(dim=(1, 2, 3))
    assert blue[0] < blue[1] < blue[2]  # top, centre, bottom

    centre = eval_views(landscape, short_side=40, crop_size=32, num_crops=1)
    assert centre.shape == (1, 2, 3, 32, 32)
    assert centre[0, :, 0].float().mean() == pytest.approx(127.5, abs=8)


def test_eval_views_rejects_bad_settings():
    clip = _ramp_clip()
    with pytest.raises(ValueError, match="dataset.test_crops=2"):
        eval_views(clip, short_side=32, crop_size=32, num_crops=2)
    with pytest.raises(ValueError, match="dataset.eval_short_side=24"):
        eval_views(clip, short_side=24, crop_size=32, num_crops=1)
    assert default_eval_short_side(224) == 256 and default_eval_short_side(64) == 73


def test_device_augment_draws_one_policy_per_clip_shared_by_its_frames():

    torch.manual_seed(0)
    frame = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    batch = frame.expand(6, 4, 3, 32, 32).clone()  # 6 identical clips of 4 identical frames
    out = DeviceAugment(randaug_n=2, randaug_m=9, random_erasing=0.0)(batch)
    assert out.shape == batch.shape and out.dtype == torch.uint8
    for clip in out:  # the same policy for every frame of a clip
        assert all(torch.equal(clip[0], f) for f in clip[1:])
    assert len({bytes(clip[0].flatten().numpy()) for clip in out}) > 1  # clips differ


def test_augment_on_device_moves_randaugment_out_of_the_worker():

    cfg = {"name": "synthetic", "augment_on_device": True, "randaug_n": 4, "randaug_m": 7, "random_erasing": 0.25}
    device_aug = build_device_augment(cfg)
    names = [type(t).__name__ for t in device_aug.transform.transforms]
    assert names == ["RandAugment", "RandomErasingUint8"]
    assert build_device_augment({**cfg, "augment_on_device": False}) is None
    assert build_device_augment({**cfg, "name": "tokens"}) is None  # cached tokens have no pixels
    assert build_device_augment({**cfg, "randaug_n": 0, "random_erasing": 0.0}) is None
    worker = TrainTransform(crop_size=16, randaug_n=4, randaug_m=7, random_erasing=0.25, photometric=False)
    assert [type(t).__name__ for t in worker.transform.transforms] == ["RandomResizedCrop"]
