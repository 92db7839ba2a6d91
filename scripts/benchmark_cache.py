"""What a token cache saves: fusion training on cached tokens vs a frozen backbone on the videos.

Measured on this machine (tiny backbone, built-in synthetic videos, CPU), in one run:
  1. train clips/s of the trainer on the videos with `backbone.freeze=true` and on a cache of the
     same backbone's tokens (`dataset=tokens`), rounds interleaved (machine load hits both
     alike), the trainer's own clips/s per log window after the first; medians and their ratio;
  2. disk bytes per video of the cache for each token option (all, cls, pooled 4x4), and the
     time the caching took.
Computed from FLOP counts (`squarefuse.models.complexity`, no weights: pretrained=false), not
measured: the FLOPs of one SSv2 fusion run (the default fusion, 30 epochs) with a frozen ViT-B/16
and a frozen CLIP ViT-B/16 at 8 and 16 frames, from the videos vs cache-once-then-train, and the
disk size of the caches.

    python scripts/benchmark_cache.py            # about 1.5 minutes on 2 CPU cores (quiet machine)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from squarefuse.apps.cache_tokens import run_cache_tokens
from squarefuse.checkpoint import save_checkpoint
from squarefuse.config.compose_config import compose_app_config
from squarefuse.config.resolvers import register_resolvers
from squarefuse.datasets import build_dataset
from squarefuse.models import build_classifier
from squarefuse.models.complexity import model_complexity
from squarefuse.training.trainer import train

REPO = Path(__file__).resolve().parents[1]
# SSv2: videos per split, classes, and the views a fusion study caches / evaluates.
SSV2_TRAIN, SSV2_VAL = 168_913, 24_777
EPOCHS = 30
TRAIN_VIEWS, TEST_VIEWS = 4, 6  # cached train views (4 clips x 1 crop), test views (2 clips x 3 crops)
# A training step is forward + backward: about 3x the forward's FLOPs.
TRAIN_FACTOR = 3


def _parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of both runs")
    p.add_argument("--work", default=None, help="folder for the videos, cache and runs (default: a temporary one)")
    return p.parse_args()


def tiny_checkpoint(work: Path) -> Path:
    """A checkpoint of the tiny model on the synthetic videos (random weights: speed does not care)."""
    cfg = compose_app_config("train", [f"dataset.root={work / 'videos'}", "dataset.generate.train_per_class=16"])
    class_names = build_dataset(cfg.dataset, "train").class_names  # generates the videos
    torch.manual_seed(0)
    model = build_classifier(cfg.backbone, cfg.fusion, cfg.head, num_classes=len(class_names))
    state = {
        "model": model.state_dict(),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "class_names": list(class_names),
        "step": 0,
        "epoch": 0,
    }
    return save_checkpoint(state, work / "tiny" / "checkpoints" / "last.pt")


def cache(ckpt: Path, out: Path, split: str, *extra: str) -> float:
    cfg = compose_app_config(
        "cache_tokens", [f"ckpt={ckpt}", f"out={out}", f"split={split}", "device=cpu", "progress=false", *extra]
    )
    start = time.perf_counter()
    run_cache_tokens(cfg)
    return time.perf_counter() - start


def clips_per_s(run_dir: Path) -> float:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [r["clips_per_s"] for r in records if r.get("split") == "train"][1:]  # the first: worker start-up
    return statistics.median(windows)


COMMON = ["trainer.num_workers=1", "trainer.device=cpu", "trainer.val_every=0", "trainer.log_every=8"]


def measure_speed(work: Path, cache_dir: Path, rounds: int) -> None:
    videos = [
        f"dataset.root={work / 'videos'}",
        "dataset.generate.train_per_class=16",
        "backbone.freeze=true",
        "trainer.epochs=2",
        *COMMON,
    ]
    tokens = ["dataset=tokens", f"dataset.root={cache_dir}", "trainer.epochs=10", *COMMON]
    speeds: dict[str, list[float]] = {"videos": [], "cache": []}
    for r in range(rounds):
        for name, overrides in (("videos", videos), ("cache", tokens)):
            run_dir = work / f"run_{name}_{r}"
            train(compose_app_config("train", overrides), run_dir)
            speeds[name].append(clips_per_s(run_dir))
    v, c = statistics.median(speeds["videos"]), statistics.median(speeds["cache"])
    print("\n## Measured: train clips/s, frozen tiny backbone (depth 4, 64 px, 8 frames), batch 16, 1 worker, CPU")
    print(f"from videos (backbone.freeze=true): {v:8.1f} clips/s   rounds: {[round(s, 1) for s in speeds['videos']]}")
    print(f"from the cache (dataset=tokens):    {c:8.1f} clips/s   rounds: {[round(s, 1) for s in speeds['cache']]}")
    print(f"ratio (median/median): {c / v:.1f}x")


def measure_bytes(ckpt: Path, work: Path) -> None:
    print(
        "\n## Measured: cache size per video (synthetic val split, 2x1 views x 8 frames, tiny backbone D=96, float16)"
    )
    for option in ("all", "cls", "pooled"):
        out = work / f"cache_{option}"
        seconds = cache(ckpt, out, "val", f"tokens={option}", "grid=2")
        index = json.loads((out / "val" / "index.json").read_text())
        size = sum(p.stat().st_size for p in (out / "val").glob("shard_*"))
        info = json.loads((out / "cache.json").read_text())
        print(
            f"tokens={option:6s} (N={info['num_tokens']:2d}): {size / len(index['videos']):9.0f} bytes/video "
            f"({len(index['videos'])} videos cached in {seconds:.1f} s)"
        )


def computed_costs() -> None:
    print(
        f"\n## Computed from FLOP counts, not measured: one SSv2 fusion run (fusion=square, head=cls), "
        f"{EPOCHS} epochs over {SSV2_TRAIN} train videos, test on {SSV2_VAL} val videos x {TEST_VIEWS} views; "
        f"the cache holds {TRAIN_VIEWS} views per train video; training = {TRAIN_FACTOR}x forward FLOPs"
    )
    print(
        f"{'backbone':38s} {'T':>3s} {'from videos':>12s} {'cache once':>11s} {'run on cache':>13s} "
        f"{'ratio 1 run':>11s} {'ratio 15 runs':>13s} {'cache GB all/pooled4x4':>23s}"
    )
    for backbone in ("vit_b16", "vit_b16_clip"):
        for frames in (8, 16):
            cfg = compose_app_config(
                "train",
                [f"backbone={backbone}", "backbone.pretrained=false", "dataset=ssv2", "head=cls", "fusion=square"],
            )
            model = build_classifier(cfg.backbone, cfg.fusion, cfg.head, num_classes=174).eval()
            flops = model_complexity(model, frames, 224)["flops_per_clip"]
            backbone_f = flops["backbone"]
            fusion_head = flops["fusion"] + flops["head"]
            # From the videos, frozen: backbone forward + fusion/head training per train clip and epoch.
            from_videos = EPOCHS * SSV2_TRAIN * (backbone_f + TRAIN_FACTOR * fusion_head)
            from_videos += SSV2_VAL * TEST_VIEWS * (backbone_f + fusion_head)
            cache_once = (SSV2_TRAIN * TRAIN_VIEWS + SSV2_VAL * TEST_VIEWS) * backbone_f
            on_cache = EPOCHS * SSV2_TRAIN * TRAIN_FACTOR * fusion_head + SSV2_VAL * TEST_VIEWS * fusion_head
            runs = 15  # e.g. 5 fusions x 3 seeds
            n_all, n_pooled = 197, 17
            views = SSV2_TRAIN * TRAIN_VIEWS + SSV2_VAL * TEST_VIEWS
            gb = [views * frames * n * 768 * 2 / 1e9 for n in (n_all, n_pooled)]
            print(
                f"{cfg.backbone.name:38s} {frames:3d} {from_videos / 1e15:9.1f} PF {cache_once / 1e15:8.1f} PF "
                f"{on_cache / 1e15:10.3f} PF {from_videos / (cache_once + on_cache):10.1f}x "
                f"{runs * from_videos / (cache_once + runs * on_cache):12.1f}x {gb[0]:11.0f} / {gb[1]:9.0f}"
            )


def main() -> None:
    args = _parse_args()
    register_resolvers()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        ckpt = tiny_checkpoint(work)
        cache_dir = work / "cache"
        seconds = cache(ckpt, cache_dir, "train", "views=2x1")
        cache(ckpt, cache_dir, "val", "views=2x1")
        print(f"cached the train split (2x1 views, tokens=all) in {seconds:.1f} s")
        measure_speed(work, cache_dir, args.rounds)
        measure_bytes(ckpt, work)
    computed_costs()


if __name__ == "__main__":
    main()
