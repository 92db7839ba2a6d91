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

`--loop` measures instead what the trainer's loop costs on a cache (issue 29's "time to verdict":
at least half the speed of a bare loop), on the temporal benchmark's setting: the default synthetic
videos (1024 train, 128 val), their tokens cached by the never-trained tiny ViT (2x1 views),
`experiment=temporal_frozen fusion=square head=mean` (batch 32, no workers, one torch thread, 12
epochs, validation every 4). In one process, rounds interleaved (another job's load on this shared
machine hits both alike):
  trainer: `Trainer(cfg, run_dir).fit()`, timed whole from the end of its first optimiser step to
     the end of `fit` (every later step, each epoch's start, checkpoint saves and validations), and
     its own clips/s per log window of metrics.jsonl (the steps only) alongside;
  bare: the same model built by the same builder (`build_classifier`, the cached_tokens backbone)
     and the same optimiser (`build_optimizer`: AdamW), forward, cross-entropy, backward and AdamW
     step on in-memory float16 batches of the same shape, as many steps, the same thread count.
Medians over rounds and their ratio (the first trainer round also pays this process's one-time
imports, torchmetrics at its first validation: the medians leave that out). Start-up, paid once per
run of a sweep and reported apart: composing the config, and `Trainer(...)` up to the end of its
first step (data, model, cache check).

    python scripts/benchmark_cache.py --loop     # about 1 minute on 2 CPU cores (quiet machine)
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from squarefuse.apps.cache_tokens import run_cache_tokens
from squarefuse.checkpoint import save_checkpoint
from squarefuse.config.compose_config import compose_app_config
from squarefuse.config.resolvers import register_resolvers
from squarefuse.datasets import build_dataset
from squarefuse.datasets.token_cache import read_cache_info
from squarefuse.models import build_classifier
from squarefuse.models.complexity import model_complexity
from squarefuse.training.config_checks import check_train_config
from squarefuse.training.optim import build_optimizer, scaled_lr
from squarefuse.training.trainer import Trainer, train

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
    p.add_argument("--loop", action="store_true", help="the trainer's loop on a cache vs a bare loop (only that)")
    return p.parse_args()


def tiny_checkpoint(work: Path, train_per_class: int = 16) -> Path:
    """A checkpoint of the tiny model on the synthetic videos (random weights: speed does not care)."""
    cfg = compose_app_config(
        "train", [f"dataset.root={work / 'videos'}", f"dataset.generate.train_per_class={train_per_class}"]
    )
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


# The temporal benchmark's frozen-token runs (scripts/temporal_benchmark.py), one fusion of them.
LOOP_RUN = ["experiment=temporal_frozen", "fusion=square", "head=mean", "trainer.device=cpu"]


def trainer_round(cache_dir: Path, run_dir: Path) -> dict[str, float]:
    """One trainer run on the cache: its start-up, its clips/s after the first step, its logged clips/s."""
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, not a resumed one (--work of an earlier benchmark)
    start = time.perf_counter()
    cfg = compose_app_config("train", [*LOOP_RUN, f"dataset.root={cache_dir}"])
    composed = time.perf_counter()
    trainer = Trainer(cfg, run_dir)
    first_step_done: list[float] = []
    train_step = trainer.train_step

    def timed_step(batches):
        result = train_step(batches)
        if not first_step_done:
            first_step_done.append(time.perf_counter())
        return result

    trainer.train_step = timed_step  # an instance attribute: the loop calls it as it calls the method
    trainer.fit()
    end = time.perf_counter()
    steps = trainer.total_steps - 1  # after the first
    return {
        "compose_s": composed - start,
        "startup_s": first_step_done[0] - composed,
        "clips_per_s": steps * trainer.global_batch / (end - first_step_done[0]),
        "logged_clips_per_s": clips_per_s(run_dir),
        "steps": trainer.total_steps,
        "batch": trainer.global_batch,
    }


def bare_round(cache_dir: Path, steps: int, batch: int) -> float:
    """The bare loop's clips/s: the trainer's model and optimiser, in-memory batches, nothing else."""
    cfg = compose_app_config("train", [*LOOP_RUN, f"dataset.root={cache_dir}"])
    check_train_config(cfg)  # fills in the token layout from the cache, as the trainer does
    torch.set_num_threads(int(cfg.trainer.cpu_threads))
    torch.manual_seed(0)
    num_classes = len(read_cache_info(cache_dir)["class_names"])
    model = build_classifier(cfg.backbone, cfg.fusion, cfg.head, num_classes).train()
    optimizer = build_optimizer(model, cfg.optim, scaled_lr(cfg.optim, batch), torch.device("cpu"))
    kw = cfg.backbone.model_kwargs
    shape = (batch, int(cfg.dataset.num_frames), int(kw.num_tokens), int(kw.embed_dim))
    batches = [
        (torch.randn(shape).half(), torch.ones(shape[:2], dtype=torch.bool), torch.randint(num_classes, (batch,)))
        for _ in range(8)
    ]
    start = time.perf_counter()
    for step in range(steps):
        tokens, mask, label = batches[step % len(batches)]
        loss = F.cross_entropy(model(tokens.float(), mask), label)  # float16 in memory, as cached
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steps * batch / (time.perf_counter() - start)


def measure_loop(work: Path, rounds: int) -> None:
    ckpt = tiny_checkpoint(work, train_per_class=128)  # the synthetic default, as the temporal benchmark's
    cache_dir = work / "loop_cache"
    for split in ("train", "val"):
        cache(ckpt, cache_dir, split, "views=2x1", "num_workers=0")
    runs: list[dict[str, float]] = []
    bare: list[float] = []
    for r in range(rounds):
        runs.append(trainer_round(cache_dir, work / f"loop_run_{r}"))
        bare.append(bare_round(cache_dir, runs[-1]["steps"] - 1, int(runs[-1]["batch"])))

    def median(key: str) -> float:
        return statistics.median(run[key] for run in runs)

    def rounded(values, digits: int = 1) -> list[float]:
        return [round(v, digits) for v in values]

    t, logged, b = median("clips_per_s"), median("logged_clips_per_s"), statistics.median(bare)
    print(
        f"\n## Measured: the trainer on a token cache vs a bare loop, {' '.join(LOOP_RUN[:3])}, "
        f"{runs[0]['steps']} steps of batch {runs[0]['batch']}, {torch.get_num_threads()} torch thread(s), CPU"
    )
    rows = (
        ("trainer, timed after its first step (epochs, saves, validation)", t, [r["clips_per_s"] for r in runs]),
        ("trainer, its logged clips/s (steps only; median window)", logged, [r["logged_clips_per_s"] for r in runs]),
        ("bare loop (forward, loss, backward, AdamW step)", b, bare),
    )
    for label, value, values in rows:
        print(f"{label:66s} {value:8.1f} clips/s   rounds: {rounded(values)}")
    print(f"ratio trainer/bare (median/median): {t / b:.2f}   (logged clips/s: {logged / b:.2f})")
    print(
        f"start-up per run: compose {median('compose_s'):.2f} s, Trainer(...) to the end of its first step "
        f"{median('startup_s'):.2f} s   rounds: {rounded((r['startup_s'] for r in runs), 2)}"
    )


def main() -> None:
    args = _parse_args()
    register_resolvers()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.loop:
            measure_loop(work, args.rounds)
            return
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
