"""The token cache: caching, training on it (exactly as a frozen backbone on the videos), eval, refusals, resume.

Videos here are 10 frames of 32x32 noise, and the frozen tiny backbone sees them exactly the same
way in a train clip and in the cache's eval view: 10-frame segment sampling (one frame per
segment, so no random offset), a random resized crop of the whole square frame (scale and ratio
1) and an eval short side equal to the crop size, no flip, no augmentation.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.checkpoints import CLASS_NAMES, make_checkpoint, tiny_list_overrides
from helpers.configs import compose_config, tiny_trainer_overrides
from helpers.scripts import run_script, torchrun
from helpers.videos import write_video
from omegaconf import OmegaConf

from squarefuse.apps.cache_tokens import run_cache_tokens
from squarefuse.apps.evaluate import run_eval
from squarefuse.datasets.token_cache import TokenDataset, pool_tokens
from squarefuse.training.trainer import Trainer, check_train_config, run_config, train

REPO = Path(__file__).resolve().parents[1]
LABELS = [0, 1, 2, 0, 1, 2, 0, 1]
FRAMES = 10
# The same views of the same frames in a train clip and in the cache (see the module docstring).
SAME_VIEWS = [
    f"dataset.num_frames={FRAMES}",
    "dataset.sampling=segment",
    "dataset.eval_short_side=32",
]


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("token_videos")
    rng = np.random.default_rng(0)
    lines = []
    for i, label in enumerate(LABELS):
        write_video(root / f"v{i}.mp4", frames=rng.integers(0, 256, (FRAMES, 32, 32, 3), dtype=np.uint8), fps=8)
        lines.append(f"v{i}.mp4 {label}\n")
    (root / "train.txt").write_text("".join(lines))
    (root / "val.txt").write_text("".join(lines[:5]))
    (root / "classes.txt").write_text("".join(f"{c}\n" for c in CLASS_NAMES))
    return root


def video_overrides(root: Path) -> list[str]:
    return [*tiny_list_overrides(root), "fusion=temporal_conv", *SAME_VIEWS]


@pytest.fixture(scope="module")
def ckpt(videos, tmp_path_factory) -> Path:
    cfg = compose_config("train", [*video_overrides(videos), "head=mean"])
    path, _ = make_checkpoint(tmp_path_factory.mktemp("token_run") / "checkpoints" / "best.pt", cfg)
    return path


def cache_cfg(ckpt: Path, out: Path, *extra: str):
    return compose_config(
        "cache_tokens",
        [f"ckpt={ckpt}", f"out={out}", "num_workers=0", "device=cpu", "progress=false", "views=1x1", *extra],
    )


def make_cache(ckpt: Path, out: Path, *extra: str) -> Path:
    for split in ("train", "val"):
        run_cache_tokens(cache_cfg(ckpt, out, f"split={split}", *extra))
    return out


@pytest.fixture(scope="module")
def cache32(ckpt, tmp_path_factory) -> Path:
    return make_cache(ckpt, tmp_path_factory.mktemp("cache") / "fp32", "dtype=float32", "shard_size=3")


# The same recipe both ways (frozen_tokens), trainer settings for a few exact steps.
TRAIN = ["recipe=frozen_tokens", "head=mean", "fusion=temporal_conv", *tiny_trainer_overrides(batch_size=2)]


def losses(run_dir: Path, split: str = "train") -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r.get("split") == split]


def video_train_cfg(videos: Path, ckpt: Path, *extra: str):
    return compose_config(
        "train",
        [
            *video_overrides(videos),
            *TRAIN,
            "backbone=tiny",  # after the recipe's cached_tokens
            "backbone.freeze=true",
            "dataset.scale=[1.0,1.0]",
            "dataset.ratio=[1.0,1.0]",
            "dataset.hflip=false",
            "dataset.randaug_n=0",
            "dataset.random_erasing=0",
            f"trainer.init_from={ckpt}",
            *extra,
        ],
    )


def token_train_cfg(cache: Path, ckpt: Path | None, *extra: str):
    init = [f"trainer.init_from={ckpt}"] if ckpt else []
    return compose_config("train", ["dataset=tokens", f"dataset.root={cache}", *TRAIN, *init, *extra])


def test_checks_leave_the_config_as_it_is_and_the_run_config_is_completed_from_the_cache(cache32):
    # train.py checks the composed config before the trainer exists: the backbone's token layout is
    # still null there and comes from the cache, into a copy (the run's config), never into `cfg`.
    cfg = token_train_cfg(cache32, None)
    composed = OmegaConf.to_container(cfg)
    check_train_config(cfg)
    assert OmegaConf.to_container(cfg) == composed and cfg.backbone.model_kwargs.embed_dim is None
    completed = run_config(cfg)
    assert OmegaConf.to_container(cfg) == composed
    info = json.loads((cache32 / "cache.json").read_text())
    assert completed.backbone.model_kwargs.embed_dim == info["embed_dim"] == 48
    assert completed.backbone.name == info["backbone_name"] and completed.backbone.img_size == info["img_size"]
    assert completed.dataset.weights_hash == info["weights_hash"] and completed.dataset.num_frames == FRAMES
    check_train_config(completed)  # again, as the trainer does: the filled-in values match the cache
    assert run_config(completed) == completed


@pytest.mark.slow
def test_training_on_the_cache_equals_training_from_the_videos_with_a_frozen_backbone(videos, ckpt, cache32, tmp_path):
    train(video_train_cfg(videos, ckpt), tmp_path / "videos")
    train(token_train_cfg(cache32, ckpt), tmp_path / "tokens")
    from_videos, from_cache = losses(tmp_path / "videos"), losses(tmp_path / "tokens")
    assert len(from_videos) == len(from_cache) == 8  # 2 epochs x 4 steps
    np.testing.assert_allclose(from_cache, from_videos, rtol=0, atol=1e-5)
    np.testing.assert_allclose(
        losses(tmp_path / "tokens", "val_clip"), losses(tmp_path / "videos", "val_clip"), atol=1e-5
    )

    # eval.py: the cache run on the cache, the video run on the videos, the same views.
    results = {}
    for name in ("videos", "tokens"):
        cfg = compose_config(
            "eval", [f"ckpt={tmp_path / name / 'checkpoints' / 'last.pt'}", "num_workers=0", "device=cpu"]
        )
        results[name] = run_eval(cfg, tmp_path / f"eval_{name}")
    assert results["tokens"].num_videos == results["videos"].num_videos == 5
    assert results["tokens"].top1 == results["videos"].top1
    probs = {name: torch.load(tmp_path / f"eval_{name}" / "probs.pt", weights_only=True) for name in results}
    assert torch.equal(probs["tokens"]["indices"], probs["videos"]["indices"])
    torch.testing.assert_close(probs["tokens"]["probs"], probs["videos"]["probs"], atol=1e-5, rtol=0)
    # The cache model holds the fusion and head only, and says so in model_info.json.
    info = json.loads((tmp_path / "tokens" / "model_info.json").read_text())
    assert info["params"]["backbone"] == 0 and info["flops_per_clip"]["backbone"] == 0 and info["params"]["fusion"] > 0


def test_cache_holds_every_views_tokens_and_reads_back_memory_mapped(ckpt, tmp_path):
    out = tmp_path / "cache"
    # 4 of the 10 frames per clip: the 2 clips are other frames.
    extra = ["split=val", "views=2x1", "tokens=pooled", "grid=1", "shard_size=2", "dataset.num_frames=4"]
    run_cache_tokens(cache_cfg(ckpt, out, *extra))
    info = json.loads((out / "cache.json").read_text())
    assert (
        info["num_tokens"] == 2 and info["views"] == [2, 1] and info["tokens"] == "pooled" and info["num_frames"] == 4
    )
    assert len(info["weights_hash"]) == 64
    shard = np.load(out / "val" / "shard_000000.npy", mmap_mode="r")
    assert isinstance(shard, np.memmap) and shard.dtype == np.float16 and shard.shape == (2, 2, 4, 2, 48)
    dataset = TokenDataset({"name": "tokens", "root": str(out)}, "val")
    assert len(dataset) == 5 and dataset.views == (2, 1) and [r.label for r in dataset.records] == LABELS[:5]
    item = dataset[4]
    assert item["video"].shape == (2, 4, 2, 48) and item["mask"].all() and item["label"] == LABELS[4]
    # The two cached clips are different frames: different tokens.
    assert not torch.equal(item["video"][0], item["video"][1])


def test_pooled_tokens_average_the_patch_grid():
    tokens = torch.arange(2 * 17 * 3, dtype=torch.float32).reshape(2, 17, 3)  # 1 class token + 4x4 patches
    pooled = pool_tokens(tokens, "pooled", num_prefix_tokens=1, grid=2)
    assert pooled.shape == (2, 5, 3)
    torch.testing.assert_close(pooled[:, 0], tokens[:, 0])
    patches = tokens[:, 1:].reshape(2, 4, 4, 3)
    torch.testing.assert_close(pooled[:, 1], patches[:, :2, :2].mean(dim=(1, 2)))
    torch.testing.assert_close(pooled[:, 4], patches[:, 2:, 2:].mean(dim=(1, 2)))
    assert pool_tokens(tokens, "cls", num_prefix_tokens=1, grid=2).shape == (2, 1, 3)
    with pytest.raises(ValueError, match="grid=5"):
        pool_tokens(tokens, "pooled", num_prefix_tokens=1, grid=5)


@pytest.mark.parametrize(
    ("override", "key"),
    [("dataset.num_frames=8", "num_frames"), ("dataset.tokens=pooled", "tokens"), ("dataset.img_size=64", "img_size")],
)
def test_a_cache_made_otherwise_than_the_run_expects_is_refused_naming_both_values(cache32, override, key, tmp_path):
    info = json.loads((cache32 / "cache.json").read_text())
    with pytest.raises(ValueError, match=rf"dataset\.{key}=.* was made with {key} {info[key]!r}"):
        train(token_train_cfg(cache32, None, override), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


@pytest.mark.slow
def test_eval_refuses_a_cache_remade_with_another_backbone(ckpt, cache32, videos, tmp_path):
    train(token_train_cfg(cache32, None, "trainer.epochs=1"), tmp_path / "run")
    other_ckpt, _ = make_checkpoint(
        tmp_path / "other.pt", compose_config("train", [*video_overrides(videos), "head=mean"]), seed=1
    )
    other = make_cache(other_ckpt, tmp_path / "other_cache", "dtype=float32")
    cfg = compose_config(
        "eval",
        [f"ckpt={tmp_path / 'run/checkpoints/last.pt'}", f"dataset.root={other}", "num_workers=0", "device=cpu"],
    )
    with pytest.raises(ValueError, match="dataset.weights_hash=.* was made with weights_hash"):
        run_eval(cfg, tmp_path / "eval")


def test_bad_cache_folders_name_the_folder_and_what_to_do(cache32, tmp_path):
    def refused(root: Path, match: str) -> None:
        with pytest.raises(ValueError, match=match):
            TokenDataset({"name": "tokens", "root": str(root)}, "train")

    refused(tmp_path / "nowhere", "no such folder")
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", r"empty is not a complete token cache: cache.json is missing.*rerun continues")
    old = tmp_path / "old"
    old.mkdir()
    (old / "cache.json").write_text(json.dumps({"version": 0}))
    refused(old, r"format version 0.*remake it")
    # Half-written by a killed run: cache.json and a shard, no index yet.
    half = tmp_path / "half"
    (half / "train").mkdir(parents=True)
    (half / "cache.json").write_text((cache32 / "cache.json").read_text())
    (half / "train" / "shard_000000.npy").write_bytes((cache32 / "train" / "shard_000000.npy").read_bytes())
    refused(half, r"half/train is not a complete token cache: index.json is missing")
    refused(cache32.parent / "nothing", "no such folder")
    with pytest.raises(ValueError, match="has no 'test' split"):
        TokenDataset({"name": "tokens", "root": str(cache32)}, "test")


@pytest.mark.slow
def test_recaching_keeps_the_cache_and_other_settings_are_refused_without_overwrite(ckpt, tmp_path):
    out = make_cache(ckpt, tmp_path / "cache", "shard_size=4")
    shard = out / "train" / "shard_000000.npy"
    mtime = shard.stat().st_mtime_ns
    run_cache_tokens(cache_cfg(ckpt, out, "split=train", "shard_size=4"))  # nothing to do
    assert shard.stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match=r"other settings \(tokens: 'all' there, 'cls' now; .*overwrite=true"):
        run_cache_tokens(cache_cfg(ckpt, out, "split=train", "tokens=cls"))
    assert shard.stat().st_mtime_ns == mtime and (out / "train" / "index.json").is_file()
    with pytest.raises(ValueError, match=r"also holds the splits \['val'\]"):
        run_cache_tokens(cache_cfg(ckpt, out, "split=train", "tokens=cls", "overwrite=true"))
    assert (out / "val" / "index.json").is_file() and shard.is_file()


def test_mixup_is_refused_on_cached_tokens(cache32, tmp_path):
    with pytest.raises(ValueError, match="trainer.mixup=0.8.*mix pixels.*set both to 0"):
        train(token_train_cfg(cache32, None, "trainer.mixup=0.8"), tmp_path / "run")


def _cache_args(ckpt: Path, out: Path) -> list[str]:
    """The script and its arguments: the train split (8 videos) in 4 shards of 2."""
    args = [f"ckpt={ckpt}", f"out={out}", "split=train", "num_workers=0", "device=cpu", "views=1x1", "shard_size=2"]
    return [str(REPO / "scripts" / "cache_tokens.py"), *args, "progress=false"]


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, **kwargs)


def _shards(out: Path) -> dict[str, np.ndarray]:
    return {p.name: np.load(p) for p in sorted((out / "train").glob("shard_*.npy"))}


@pytest.fixture(scope="module")
def whole_cache(ckpt, tmp_path_factory) -> Path:
    """The train split cached by one uninterrupted run of the script: what the other runs must reproduce."""
    out = tmp_path_factory.mktemp("whole") / "cache"
    done = run_script(*_cache_args(ckpt, out), cwd=out.parent, env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.slow
def test_a_killed_cache_run_continues_and_caches_each_video_once(ckpt, whole_cache, tmp_path):
    out = tmp_path / "cache"
    # Killed (os._exit, as SIGKILL would) right after the second shard was written.
    killer = (
        "import os, runpy, sys; import squarefuse.apps.cache_tokens as app; w = app.write_shard; n = [0]\n"
        "def write(*a, **k):\n    w(*a, **k); n[0] += 1\n    n[0] == 2 and os._exit(9)\n"
        "app.write_shard = write\n"
        "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    killed = _run([sys.executable, "-c", killer, *_cache_args(ckpt, out)])
    assert killed.returncode == 9, killed.stderr[-3000:]
    done = {p.name: p.stat().st_mtime_ns for p in (out / "train").glob("shard_*.json")}
    assert sorted(done) == ["shard_000000.json", "shard_000001.json"] and not (out / "train" / "index.json").exists()
    with pytest.raises(ValueError, match="not a complete token cache"):
        TokenDataset({"name": "tokens", "root": str(out)}, "train")

    resumed = run_script(*_cache_args(ckpt, out), cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert {p: (out / "train" / p).stat().st_mtime_ns for p in done} == done  # kept, not redone
    index = json.loads((out / "train" / "index.json").read_text())
    assert sorted(v["index"] for v in index["videos"]) == list(range(len(LABELS)))
    # The same cache as one uninterrupted run.
    assert _shards(out).keys() == _shards(whole_cache).keys()
    for name, array in _shards(whole_cache).items():
        np.testing.assert_array_equal(_shards(out)[name], array, err_msg=name)


@pytest.mark.slow
def test_two_processes_make_the_same_cache_as_one(ckpt, whole_cache, tmp_path):
    two = _run(torchrun(*_cache_args(ckpt, tmp_path / "two")))
    assert two.returncode == 0, two.stderr[-3000:]
    assert _shards(tmp_path / "two").keys() == _shards(whole_cache).keys()
    for name, array in _shards(whole_cache).items():
        np.testing.assert_array_equal(_shards(tmp_path / "two")[name], array, err_msg=name)
    index = [json.loads((root / "train" / "index.json").read_text()) for root in (whole_cache, tmp_path / "two")]
    assert index[0]["videos"] == index[1]["videos"]


@pytest.mark.slow
def test_resume_on_the_cache_is_exact_with_a_view_drawn_per_sample(ckpt, tmp_path, monkeypatch):
    """Interrupted mid-epoch and resumed: the same losses and weights as uninterrupted (2 cached views, EMA)."""
    cache = make_cache(ckpt, tmp_path / "cache", "views=2x1", "dataset.num_frames=4")
    extra = ["trainer.epochs=3", "trainer.num_workers=1", "trainer.ema.enabled=true", "trainer.ema.decay=0.9"]
    Trainer(token_train_cfg(cache, None, *extra), tmp_path / "full").fit()
    original_step = Trainer.train_step

    def interrupt_after_5(self, batches):
        out = original_step(self, batches)
        if self.state.step == 5:  # mid-epoch 1 (4 steps per epoch)
            self._stop_signal = 15
        return out

    monkeypatch.setattr(Trainer, "train_step", interrupt_after_5)
    assert Trainer(token_train_cfg(cache, None, *extra), tmp_path / "cut").fit()["status"] == "interrupted"
    monkeypatch.setattr(Trainer, "train_step", original_step)
    assert Trainer(token_train_cfg(cache, None, *extra), tmp_path / "cut").fit()["status"] == "finished"
    assert losses(tmp_path / "cut") == pytest.approx(losses(tmp_path / "full"), rel=1e-5, abs=1e-6)
    assert len(losses(tmp_path / "full")) == 12
    full = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)
    cut = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)
    for part in ("model", "ema"):
        for key, value in full[part].items():
            torch.testing.assert_close(cut[part][key], value, rtol=1e-5, atol=1e-6, msg=f"{part}.{key}")


def _train_config_override(overrides: list[str]) -> str:
    return "train_config=[" + ",".join(f'"{o}"' for o in overrides) + "]"


def test_a_cache_without_a_checkpoint_holds_the_tokens_of_the_backbone_train_py_starts_from(videos, ckpt, tmp_path):
    # The ckpt fixture's model weights are the initialisation drawn after torch.manual_seed(0) from the
    # same train config: the cache of `train_config=[...]` (trainer.seed=0) must be the very same.
    overrides = [*video_overrides(videos), "head=mean"]
    common = ["num_workers=0", "device=cpu", "progress=false", "views=1x1", "dtype=float32", "split=train"]
    bare = tmp_path / "bare"
    run_cache_tokens(compose_config("cache_tokens", [_train_config_override(overrides), f"out={bare}", *common]))
    from_ckpt = tmp_path / "from_ckpt"
    run_cache_tokens(cache_cfg(ckpt, from_ckpt, "split=train", "use_ema=false", "dtype=float32"))
    bare_info = json.loads((bare / "cache.json").read_text())
    ckpt_info = json.loads((from_ckpt / "cache.json").read_text())
    assert bare_info["weights_hash"] == ckpt_info["weights_hash"]
    assert bare_info["train_config"] == overrides and bare_info["checkpoint"] is None
    assert _shards(bare).keys() == _shards(from_ckpt).keys()
    for name, array in _shards(from_ckpt).items():
        np.testing.assert_array_equal(_shards(bare)[name], array, err_msg=name)
    # Another trainer.seed draws another backbone.
    other = tmp_path / "seed1"
    seeded = _train_config_override([*overrides, "trainer.seed=1"])
    run_cache_tokens(compose_config("cache_tokens", [seeded, f"out={other}", *common]))
    assert json.loads((other / "cache.json").read_text())["weights_hash"] != bare_info["weights_hash"]


def test_the_backbone_is_given_once_as_a_checkpoint_or_as_a_train_config(videos, ckpt, tmp_path):
    def refused(overrides: list[str], match: str) -> None:
        with pytest.raises(ValueError, match=match):
            run_cache_tokens(compose_config("cache_tokens", [f"out={tmp_path / 'cache'}", "device=cpu", *overrides]))

    train_config = _train_config_override(video_overrides(videos))
    refused([], r"either as ckpt=PATH .* or as train_config=\[OVERRIDES\].*not neither")
    refused([f"ckpt={ckpt}", train_config], "not both")
    refused(["train_config=path_shape"], r"train_config='path_shape': must be a list of train.py overrides")
    refused([_train_config_override(["fusion=nope"])], r"train config with overrides \['fusion=nope'\].*fusion/nope")
    refused([_train_config_override(["dataset=tokens", f"dataset.root={tmp_path}"])], "no such folder|tokens")
    assert not (tmp_path / "cache").exists()


def test_a_missing_shard_is_refused_naming_it(cache32, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(cache32, copy)
    (copy / "train" / "shard_000001.npy").unlink()
    with pytest.raises(ValueError, match=r"copy/train is incomplete: shard_000001.npy is missing"):
        TokenDataset({"name": "tokens", "root": str(copy)}, "train")


def test_a_mean_head_on_a_cache_of_prefix_tokens_only_is_refused(ckpt, tmp_path):
    cache = make_cache(ckpt, tmp_path / "cls_cache", "tokens=cls")
    with pytest.raises(ValueError, match=r"head MeanHead averages the patch tokens.*dataset.tokens=cls.*use head=cls"):
        train(token_train_cfg(cache, None, "head=mean"), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
    check_train_config(token_train_cfg(cache, None, "head=cls"))
    # Asked of the head (its `reads_patch_tokens`), not of its class name.
    scaled = ["head._target_=test_model.ScaledMeanHead", "~head.dropout", "+head.scale=2.0"]
    with pytest.raises(ValueError, match=r"head ScaledMeanHead averages the patch tokens.*dataset.tokens=cls"):
        check_train_config(token_train_cfg(cache, None, "head=mean", *scaled))


def test_an_attentive_head_trains_and_evaluates_on_the_cache_and_reads_prefix_token_caches(ckpt, cache32, tmp_path):
    attentive = ["head=attentive", "head.pos_embed=space_time", "trainer.epochs=1"]
    summary = train(token_train_cfg(cache32, None, *attentive), tmp_path / "run")
    assert summary["status"] == "finished" and all(np.isfinite(losses(tmp_path / "run")))
    # The run's stored config is the completed one: it says which cache the run was trained on.
    saved, info = OmegaConf.load(tmp_path / "run" / "config.yaml"), json.loads((cache32 / "cache.json").read_text())
    assert saved.backbone.model_kwargs.num_tokens == info["num_tokens"]
    assert saved.dataset.weights_hash == info["weights_hash"] and saved.backbone.name == info["backbone_name"]
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    cfg = compose_config("eval", [f"ckpt={last}", "num_workers=0", "device=cpu"])
    assert run_eval(cfg, tmp_path / "eval").num_videos == 5
    # It reads every token, prefix tokens included, so a cache of class tokens only is fine.
    cls_cache = make_cache(ckpt, tmp_path / "cls_cache", "tokens=cls")
    check_train_config(token_train_cfg(cls_cache, None, *attentive))
