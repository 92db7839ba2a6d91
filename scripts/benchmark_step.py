"""Where a training step's time goes, measured side by side in one run.

    python scripts/benchmark_step.py                       # CPU preset here; the GPU preset when CUDA is there
    python scripts/benchmark_step.py --preset gpu --batch 48 --workers 16 --json bench.json

Prints and (with --json) writes:
  1. fusion:  forward+backward of SQuaRe-Fuse next to a ViT-B/16 backbone step (its share, target <1%);
  2. loader:  clips/s of one loader worker for the K400/SSv2 train pipelines vs raw decoding of the
              same frames (scripts/benchmark_loader.py), and the cost of the photometric
              augmentation that `dataset.augment_on_device` moves to the training device;
  3. train:   training clips/s and the share of step time spent waiting for data with the real
              loader (generated K400-like files, `--workers` workers) vs with one batch kept in
              memory (no data cost at all): their ratio says how data-bound the configuration is;
              peak memory; model FLOPs utilisation on a GPU.

Presets: `gpu` = ViT-B/16, 16 frames x 224 px, dense stride 4, bf16, fused AdamW; `cpu` = the same
pipeline with a small ViT at 112 px and 8 frames so that it finishes in minutes on two cores.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import benchmark_loader  # a sibling script: scripts/ is on sys.path when this file runs

REPO = Path(__file__).resolve().parents[1]

# Dense bf16 peak of the GPUs we know (TFLOP/s), for model FLOPs utilisation.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "V100": 125.0}

PRESETS = {
    "gpu": {
        "backbone": "vit_b16",
        "img_size": 224,
        "frames": 16,
        "stride": 4,
        "batch": 32,
        "precision": "bf16",
        "fusion_batch": 2,
        "fusion_frames": 16,
        "extra": [],
    },
    "cpu": {
        "backbone": "tiny",
        "img_size": 112,
        "frames": 8,
        "stride": 4,
        "batch": 8,
        "precision": "fp32",
        "fusion_batch": 1,
        "fusion_frames": 8,
        "extra": ["backbone.model_kwargs.depth=4"],
    },
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: gpu when CUDA is available")
    p.add_argument("--batch", type=int, default=None, help="training clips per step (preset default)")
    p.add_argument(
        "--workers", type=int, default=None, help="loader workers for the real-loader run (default: the trainer's auto)"
    )
    p.add_argument("--steps", type=int, default=10, help="timed training steps per mode")
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--videos", type=int, default=8, help="distinct generated K400-like videos")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--skip", nargs="*", default=[], choices=["fusion", "loader", "train"])
    p.add_argument(
        "--override",
        action="append",
        default=[],
        help="extra training config override for the train part, e.g. dataset.decoder=torchcodec (repeatable)",
    )
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args()


def gpu_peak_tflops(torch) -> float | None:
    name = torch.cuda.get_device_name()
    return next((tf for key, tf in PEAK_TFLOPS.items() if key in name), None)


def bench_fusion(torch, device, preset: dict) -> dict:
    import benchmark_fusion  # noqa: PLC0415

    bench = benchmark_fusion.Bench(
        device=device,
        batch=preset["fusion_batch"],
        frames=preset["fusion_frames"],
        img_size=224,
        amp=device.type == "cuda",
    )
    rounds = benchmark_fusion.Rounds(warmup=1, repeats=3 if device.type == "cuda" else 2, layer_repeats=5)
    result = benchmark_fusion.measure(bench, rounds)
    return {
        "shape": f"B={preset['fusion_batch']} T={preset['fusion_frames']} 224px ViT-B/16",
        "median_seconds": result["median_seconds"],
        "ratios": result["ratios"],
    }


def bench_device_augment(torch, device, frames: int, img_size: int) -> dict:
    """Milliseconds per clip of RandAugment n4 m7 + erasing 0.25 on the training device."""
    from squarefuse.datasets.transforms import DeviceAugment  # noqa: PLC0415

    augment = DeviceAugment(randaug_n=4, randaug_m=7, random_erasing=0.25)
    batch = torch.randint(0, 256, (8, frames, 3, img_size, img_size), dtype=torch.uint8, device=device)
    times = []
    for i in range(6):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        augment(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 1:
            times.append((time.perf_counter() - start) / batch.shape[0])
    return {
        "device": str(device),
        "clip": f"{frames}x{img_size}x{img_size}",
        "ms_per_clip": round(1000 * statistics.median(times), 2),
    }


def make_list_dataset(work: Path, count: int, entries: int = 1024) -> tuple[Path, Path]:
    """`count` distinct K400-like videos (H.264 340x256, 30 fps, 10 s), listed `entries` times in all."""
    spec = benchmark_loader.FULL[0]
    paths = [benchmark_loader.write_test_video(spec, work / f"k400_like_{i}.mp4") for i in range(count)]
    lines = [f"{paths[i % count].name} {i % 400}" for i in range(entries)]
    listing = work / "train.txt"
    listing.write_text("\n".join(lines) + "\n")
    return listing, work


def build_trainer(preset: dict, args, listing: Path, video_dir: Path, run_dir: Path, workers):
    from hydra import compose, initialize_config_dir  # noqa: PLC0415

    from squarefuse.training.trainer import Trainer  # noqa: PLC0415

    overrides = [
        "dataset=list",
        f"backbone={preset['backbone']}",
        "backbone.pretrained=false",
        f"backbone.img_size={preset['img_size']}",
        *preset["extra"],
        f"dataset.train_file={listing}",
        f"dataset.video_dir={video_dir}",
        "dataset.num_classes=400",
        "dataset.sampling=dense",
        f"dataset.num_frames={preset['frames']}",
        f"dataset.stride={preset['stride']}",
        "dataset.repeated_aug=1",
        "trainer.val_every=0",
        "logger=none",
        f"trainer.batch_size={args.batch or preset['batch']}",
        f"trainer.precision={preset['precision']}",
        f"trainer.num_workers={workers}",
        f"trainer.compile={args.compile}",
        "trainer.log_every=1000000",
        "trainer.ckpt_every=1000000",
        "trainer.epochs=1000",
        *args.override,
    ]
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    return Trainer(cfg, run_dir), overrides


def time_steps(torch, trainer, batches, steps: int, warmup: int) -> dict:
    for _ in range(warmup):
        trainer.train_step(batches)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    wait = 0.0
    start = time.perf_counter()
    for _ in range(steps):
        _, w = trainer.train_step(batches)
        wait += w
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    clips = steps * trainer.global_batch
    return {
        "clips_per_s": round(clips / elapsed, 2),
        "data_wait": round(wait / elapsed, 3),
        "seconds": round(elapsed, 2),
    }


def step_flops(torch, trainer, batch) -> float:
    """Model FLOPs of one forward+backward on `batch` (torch's FLOP counter)."""
    from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415

    video, mask, target = trainer._prepare(batch)
    with FlopCounterMode(display=False) as counter:
        from squarefuse.runtime.precision import autocast  # noqa: PLC0415

        with autocast(trainer.device, trainer.precision):
            logits = trainer.model(video, mask)
        logits.float().sum().backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def bench_train(torch, device, preset: dict, args, work: Path) -> dict:
    from squarefuse.runtime.workers import default_num_workers  # noqa: PLC0415

    listing, video_dir = make_list_dataset(work, args.videos)
    workers = args.workers if args.workers is not None else default_num_workers()
    trainer, overrides = build_trainer(preset, args, listing, video_dir, work / "run", workers)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    real = time_steps(torch, trainer, iter(trainer.loader), args.steps, args.warmup_steps)
    batch = next(iter(trainer.loader))
    memory = time_steps(torch, trainer, itertools.repeat(batch), args.steps, args.warmup_steps)
    out = {
        "config": " ".join(overrides),
        "global_batch": trainer.global_batch,
        "workers": workers,
        "real_loader": real,
        "in_memory": memory,
        "real/in_memory": round(real["clips_per_s"] / memory["clips_per_s"], 3),
    }
    if device.type == "cuda":
        out["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        peak = gpu_peak_tflops(torch)
        flops = step_flops(torch, trainer, batch)
        out["model_tflops_per_step"] = round(flops / 1e12, 3)
        if peak:
            steps_per_s = memory["clips_per_s"] / trainer.global_batch
            out["mfu_in_memory"] = round(flops * steps_per_s / (peak * 1e12), 3)
            out["mfu_real_loader"] = round(flops * real["clips_per_s"] / trainer.global_batch / (peak * 1e12), 3)
    return out


def main() -> None:
    args = parse_args()
    import torch  # noqa: PLC0415 (torch does not load decord; the loader benchmark needs that order)

    threads = torch.get_num_threads()
    results: dict = {}
    if "loader" not in args.skip:
        results["loader"] = benchmark_loader.main(["--rounds", "5", "--iters", "4", "--json"])
        torch.set_num_threads(threads)  # it measures one worker with one thread

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset_name = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    preset = PRESETS[preset_name]
    results["device"] = (
        torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    )
    results["preset"] = preset_name
    if "loader" not in args.skip:
        results["device_augment"] = bench_device_augment(torch, device, preset["frames"], preset["img_size"])
    if "fusion" not in args.skip:
        results["fusion"] = bench_fusion(torch, device, preset)
    if "train" not in args.skip:
        with tempfile.TemporaryDirectory() as tmp:
            results["train"] = bench_train(torch, device, preset, args, Path(tmp))
    results["host_peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)

    print(f"\n== benchmark ({results['device']}, preset {preset_name}) ==")
    if "fusion" in results:
        r = results["fusion"]["ratios"]
        print(
            f"fusion: layer / ViT-B/16 step = {100 * r['layer/backbone']:.3f}% (target < 1%), "
            f"layer / seed sketch = {r['layer/seed']:.3f} ({results['fusion']['shape']})"
        )
    for name, r in results.get("loader", {}).items():
        print(
            f"loader {name}: one worker {r['pipeline_clips_s']} clips/s vs raw decode {r['raw_decode_clips_s']} "
            f"-> ratio {r['ratio']} (target >= 0.85)"
        )
    if "device_augment" in results:
        d = results["device_augment"]
        print(
            f"device augment (RandAugment n4 m7 + erasing, on {d['device']}): "
            f"{d['ms_per_clip']} ms per {d['clip']} clip"
        )
    if "train" in results:
        t = results["train"]
        print(
            f"train: real loader {t['real_loader']['clips_per_s']} clips/s (waiting for data "
            f"{100 * t['real_loader']['data_wait']:.0f}% of the time, {t['workers']} workers) vs in-memory "
            f"{t['in_memory']['clips_per_s']} clips/s -> {t['real/in_memory']}"
        )
        for key in ("peak_memory_gb", "model_tflops_per_step", "mfu_in_memory", "mfu_real_loader"):
            if key in t:
                print(f"  {key}: {t[key]}")
    print(f"host peak RSS: {results['host_peak_rss_gb']} GB")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
