"""A token cache with NaN in a shard: eval stops naming the videos and their inputs, training names the batch's videos.

The cache holds the float tokens of a frozen backbone; a damaged shard (a bad disk, an interrupted
copy) can hold NaN where no video file ever could (pixels are uint8). Neither eval nor training may
turn such inputs into an accuracy or blame the learning rate for them.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers.checkpoints import CLASS_NAMES, make_checkpoint, tiny_list_overrides
from helpers.configs import compose_config, tiny_trainer_overrides
from helpers.videos import write_video

from squarefuse.apps.cache_tokens import run_cache_tokens
from squarefuse.apps.evaluate import run_eval
from squarefuse.datasets.token_cache import file_checksum
from squarefuse.training.trainer import run_config, train

LABELS = [0, 1, 2, 0, 1, 2]
FRAMES = 4


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A float32 token cache (train and val: the same 6 videos, 3 per shard) of a frozen tiny backbone."""
    root = tmp_path_factory.mktemp("videos")
    rng = np.random.default_rng(0)
    for i in range(len(LABELS)):
        write_video(root / f"v{i}.mp4", frames=rng.integers(0, 256, (FRAMES, 32, 32, 3), dtype=np.uint8), fps=4)
    lines = "".join(f"v{i}.mp4 {label}\n" for i, label in enumerate(LABELS))
    (root / "train.txt").write_text(lines)
    (root / "val.txt").write_text(lines)
    (root / "classes.txt").write_text("".join(f"{c}\n" for c in CLASS_NAMES))
    video_cfg = compose_config(
        "train", [*tiny_list_overrides(root), f"dataset.num_frames={FRAMES}", "dataset.sampling=segment", "head=mean"]
    )
    ckpt, _ = make_checkpoint(tmp_path_factory.mktemp("video_run") / "best.pt", video_cfg)
    out = tmp_path_factory.mktemp("cache") / "cache"
    for split in ("train", "val"):
        overrides = [f"ckpt={ckpt}", f"out={out}", f"split={split}", "num_workers=0", "device=cpu", "progress=false"]
        run_cache_tokens(compose_config("cache_tokens", [*overrides, "views=1x1", "dtype=float32", "shard_size=3"]))
    return out


def damaged_copy(cache: Path, to: Path, split: str, rows: list[int]) -> Path:
    """A copy of `cache` whose first shard of `split` holds NaN in the tokens of `rows`, as written: the
    checksum in its index.json is the NaN shard's (the backbone gave NaN when the cache was made; a
    shard damaged after that is refused by its checksum before any of this: test_token_cache_integrity)."""
    shutil.copytree(cache, to)
    shard_path = to / split / "shard_000000.npy"
    shard = np.load(shard_path)
    shard[rows, :, :, :, :4] = np.nan
    np.save(shard_path, shard)
    index = json.loads((to / split / "index.json").read_text())
    index["files"][shard_path.name] = file_checksum(shard_path)
    (to / split / "index.json").write_text(json.dumps(index))
    return to


def token_run_cfg(cache: Path, *extra: str):
    overrides = ["dataset=tokens", f"dataset.root={cache}", "recipe=frozen_tokens", "fusion=temporal_conv"]
    return compose_config("train", [*overrides, *tiny_trainer_overrides(batch_size=2), *extra])


def test_eval_on_a_damaged_cache_stops_naming_the_videos_and_their_inputs(cache, tmp_path):
    cfg = run_config(token_run_cfg(cache))  # the backbone's token layout, from the cache
    ckpt, _ = make_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt", cfg)
    damaged = damaged_copy(cache, tmp_path / "damaged", "val", rows=[1])
    eval_cfg = ["num_workers=0", "device=cpu", "progress=false", f"dataset.root={damaged}"]
    with pytest.raises(ValueError) as error:
        run_eval(compose_config("eval", [f"ckpt={ckpt}", *eval_cfg]), tmp_path / "out")
    message = str(error.value)
    assert message.startswith(f"the model's outputs are NaN or infinite for 1 of {len(LABELS)} videos: ")
    assert message.count("v1.mp4 (index 1)") == 2  # the video, and its inputs as the cause
    assert "hold NaN or infinite values: the data is damaged" in message and "cache_tokens.py" in message
    assert not (tmp_path / "out" / "results.json").exists()

    run_eval(compose_config("eval", [f"ckpt={ckpt}", *eval_cfg[:-1]]), tmp_path / "intact")
    json.loads((tmp_path / "intact" / "results.json").read_text(), parse_constant=lambda c: pytest.fail(c))


def test_training_on_a_damaged_cache_names_the_videos_not_the_learning_rate(cache, tmp_path):
    damaged = damaged_copy(cache, tmp_path / "damaged", "train", rows=[0, 1, 2])
    with pytest.raises(FloatingPointError) as error:
        train(token_run_cfg(damaged, "trainer.epochs=1"), tmp_path / "run")
    message = str(error.value)
    # The NaN tokens need not make the loss NaN (a token the head leaves out still gives NaN gradients):
    # the first step with such a video stops, naming it, before the weights turn NaN.
    assert re.match(r"non-finite inputs at step \d+ \(epoch 0\); the weights were not updated", message)
    assert "The batch's inputs hold NaN or infinite values (" in message and "the data is damaged" in message
    assert "Lower optim.lr" not in message
    named = message.split("infinite values (")[1].split(")")[0].split(", ")
    assert named and all(Path(name).name in {"v0.mp4", "v1.mp4", "v2.mp4"} for name in named)
