"""Cost of each fusion option next to a ViT-B/16 backbone step, and of SQuaRe-Fuse next to the seed sketch.

Part 1, the share of every option of the ``fusion`` config group (configs/fusion/*.yaml, as
Hydra composes it, d_model=768) in a ViT-B/16 training step: forward+backward of the layer on the
backbone's tokens [B,T,N,768] (no mask, and with the last quarter of the frames padded) over
forward+backward of the backbone on the B*T frames, interleaved round by round, one table.
A layer inserted after k blocks (``fusion.after_blocks``) costs k times its row.

Part 2 measures forward+backward time, interleaved in one run (so that machine load affects all
alike), of:
  * backbone: timm ``vit_base_patch16_224`` (random init, num_classes=0) on B*T frames,
  * layer: ``SQuaReFuse`` (D=768, K=8, Q=3, P=2) on tokens [B,T,197,768], no mask,
  * layer_masked: the same with a [B,T] mask (the last quarter of the frames padded),
  * seed: the seed design's sketch (tests/reference/seed_sketch.py) at the same shape,
and prints medians over ``--repeats`` rounds after ``--warmup`` rounds (each round: one
backbone step, then ``--layer-repeats`` interleaved runs of the three fusion steps), with
the ratios layer/backbone (target < 1%) and layer/seed (target <= 1).

    python scripts/benchmark_fusion.py                      # CPU, B=2, T=16, 224px
    python scripts/benchmark_fusion.py --quick              # CPU, B=1, T=16, 112px: a few minutes on 2 cores
    python scripts/benchmark_fusion.py --device cuda --amp  # bf16 autocast on a GPU
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import timm
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from squarefuse.models.classifier import split_fusion_config
from squarefuse.models.fusion import SQuaReFuse

REPO = Path(__file__).resolve().parents[1]

# The seed sketch is a test reference, not part of the package: tests/ is neither installed nor on
# a script's import path, so the file is loaded by its path.
_seed_spec = importlib.util.spec_from_file_location("seed_sketch", REPO / "tests" / "reference" / "seed_sketch.py")
_seed_sketch = importlib.util.module_from_spec(_seed_spec)
_seed_spec.loader.exec_module(_seed_sketch)
SeedSQuaReFuse = _seed_sketch.SQuaReFuse


CONFIG_DIR = REPO / "configs"


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=2, help="timed rounds (medians are reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument(
        "--layer-repeats",
        type=int,
        default=5,
        help="runs of each fusion step per round (they are cheap next to the backbone)",
    )
    p.add_argument("--amp", action="store_true", help="bf16 autocast for all of them")
    p.add_argument(
        "--quick",
        action="store_true",
        help="B=1, 112 px, one timed round (three runs of each fusion step): a few minutes on 2 CPU cores",
    )
    p.add_argument(
        "--options",
        nargs="*",
        default=None,
        help="fusion config options for the table (default: every configs/fusion/*.yaml)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.img_size, args.repeats, args.warmup, args.layer_repeats = 1, 112, 1, 1, 3
    return args


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


class Rounds(NamedTuple):
    """How long to measure: untimed rounds, timed rounds, runs of each fusion step per round."""

    warmup: int
    repeats: int
    layer_repeats: int


class Bench:
    """A ViT-B/16 (random init) with its input frames, and the tokens [B,T,N,D] a fusion layer sees."""

    def __init__(self, *, device: torch.device, batch: int, frames: int, img_size: int, amp: bool) -> None:
        torch.manual_seed(0)
        B, T = batch, frames
        self.device = device
        self.backbone = timm.create_model(
            "vit_base_patch16_224", pretrained=False, num_classes=0, img_size=img_size
        ).to(device)
        self.D = D = self.backbone.embed_dim
        self.N = N = self.backbone.patch_embed.num_patches + self.backbone.num_prefix_tokens
        self.images = torch.randn(B * T, 3, img_size, img_size, device=device)
        self.tokens = torch.randn(B, T, N, D, device=device, requires_grad=True)
        self.grad_tokens = torch.randn(B, T, N, D, device=device)
        self.clip_mask = torch.ones(B, T, dtype=torch.bool, device=device)
        self.clip_mask[:, T - T // 4 :] = False
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)

    def step_backbone(self) -> None:
        self.backbone.zero_grad(set_to_none=True)
        with self.autocast:
            out = self.backbone.forward_features(self.images)  # [B*T, N, D]: the tokens the layer fuses
        out.backward(self.grad_tokens.view(out.shape).to(out.dtype))

    def step_fusion(self, layer: torch.nn.Module, mask: torch.Tensor | None, *, returns_aux: bool = True) -> None:
        layer.zero_grad(set_to_none=True)
        self.tokens.grad = None
        with self.autocast:
            out = layer(self.tokens) if mask is None else layer(self.tokens, valid_mask=mask)
        h = out[0] if returns_aux else out
        # NoFusion returns its input: the backward then costs nothing beyond the tokens' own.
        h.backward(self.grad_tokens.to(h.dtype))

    def interleaved(self, fusion_steps: dict[str, Callable[[], None]], rounds: Rounds) -> dict[str, list[float]]:
        """Seconds of each round's backbone step and of ``rounds.layer_repeats`` runs of every fusion step."""
        times: dict[str, list[float]] = {name: [] for name in ["backbone", *fusion_steps]}
        for round_idx in range(rounds.warmup + rounds.repeats):
            timed = round_idx >= rounds.warmup
            t = _timed(self.step_backbone, self.device)
            if timed:
                times["backbone"].append(t)
            for _ in range(rounds.layer_repeats):
                for name, fn in fusion_steps.items():
                    t = _timed(fn, self.device)
                    if timed:
                        times[name].append(t)
        return times


def measure(bench: Bench, rounds: Rounds) -> dict:
    """Forward+backward seconds of the backbone, the layer (plain, masked) and the seed, interleaved."""
    layer = SQuaReFuse(d_model=bench.D, num_dirs=8, quantiles=(0.1, 0.5, 0.9), poly_order=2).to(bench.device)
    seed = SeedSQuaReFuse(bench.D, num_dirs=8, quantiles=(0.1, 0.5, 0.9), poly_order=2).to(bench.device)
    seed.load_state_dict(layer.state_dict())

    fusion_steps = {
        "layer": lambda: bench.step_fusion(layer, None),
        "layer_masked": lambda: bench.step_fusion(layer, bench.clip_mask),
        "seed": lambda: bench.step_fusion(seed, None, returns_aux=False),
    }
    times = bench.interleaved(fusion_steps, rounds)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    ratios = {
        "layer/backbone": med["layer"] / med["backbone"],
        "layer_masked/backbone": med["layer_masked"] / med["backbone"],
        "layer/seed": med["layer"] / med["seed"],
    }
    return {
        "N": bench.N,
        "D": bench.D,
        "threads": torch.get_num_threads(),
        "seconds": times,
        "median_seconds": med,
        "ratios": ratios,
    }


def fusion_layer(option: str, d_model: int) -> torch.nn.Module:
    """The layer of ``fusion=<option>`` as the classifier builds it (placement keys aside)."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"fusion={option}"])
    layer_cfg, _ = split_fusion_config(cfg.fusion)
    return instantiate(layer_cfg, _convert_="all")(d_model=d_model)


def measure_options(bench: Bench, rounds: Rounds, options: list[str]) -> dict:
    """Forward+backward seconds of a ViT-B/16 step and of every fusion option (plain, masked), interleaved."""
    layers = {option: fusion_layer(option, bench.D).to(bench.device) for option in options}
    fusion_steps = {}
    for option, layer in layers.items():
        fusion_steps[option] = lambda layer=layer: bench.step_fusion(layer, None)
        fusion_steps[f"{option} (masked)"] = lambda layer=layer: bench.step_fusion(layer, bench.clip_mask)
    times = bench.interleaved(fusion_steps, rounds)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    rows = [
        {
            "option": option,
            "params": sum(p.numel() for p in layers[option].parameters()),
            "seconds": med[option],
            "seconds_masked": med[f"{option} (masked)"],
            "share": med[option] / med["backbone"],
            "share_masked": med[f"{option} (masked)"] / med["backbone"],
        }
        for option in options
    ]
    return {"N": bench.N, "D": bench.D, "backbone_seconds": med["backbone"], "seconds": times, "rows": rows}


def print_options_table(result: dict) -> None:
    print(f"fusion options: forward+backward / ViT-B/16 step ({result['backbone_seconds']:.3f} s), medians")
    print("| fusion | params | seconds | share of step | share, 1/4 frames padded | after 4 blocks (4 x share) |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in result["rows"]:
        print(
            f"| {row['option']} | {row['params'] / 1e6:.2f} M | {row['seconds']:.4f} | {100 * row['share']:.2f} % "
            f"| {100 * row['share_masked']:.2f} % | {400 * row['share']:.2f} % |"
        )


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch.cuda.is_available() is False")
    options = args.options or sorted(p.stem for p in (CONFIG_DIR / "fusion").glob("*.yaml"))
    bench = Bench(device=device, batch=args.batch, frames=args.frames, img_size=args.img_size, amp=args.amp)
    rounds = Rounds(warmup=args.warmup, repeats=args.repeats, layer_repeats=args.layer_repeats)
    options_result = measure_options(bench, rounds, options)
    print(
        f"device={device} threads={torch.get_num_threads()} B={args.batch} T={args.frames} "
        f"N={options_result['N']} D={options_result['D']} img={args.img_size} amp={args.amp}"
    )
    print_options_table(options_result)
    print()
    result = measure(bench, rounds)
    B, T, N, D = args.batch, args.frames, result["N"], result["D"]
    times, med, ratios = result["seconds"], result["median_seconds"], result["ratios"]
    print(
        f"device={device} threads={torch.get_num_threads()} B={B} T={T} N={N} D={D} "
        f"img={args.img_size} amp={args.amp} warmup={args.warmup} repeats={args.repeats} "
        f"layer_repeats={args.layer_repeats}"
    )
    print("forward+backward, median seconds (min..max):")
    for name, ts in times.items():
        print(f"  {name:13s} {med[name]:.5f}  ({min(ts):.5f}..{max(ts):.5f})")
    print(f"layer/backbone        = {100 * ratios['layer/backbone']:.3f}%   (target < 1%)")
    print(f"layer_masked/backbone = {100 * ratios['layer_masked/backbone']:.3f}%")
    print(f"layer/seed            = {ratios['layer/seed']:.3f}     (target <= 1)")
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
                    | {"N": N, "D": D, "threads": result["threads"]},
                    "seconds": times,
                    "median_seconds": med,
                    "ratios": ratios,
                    "options": options_result,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
