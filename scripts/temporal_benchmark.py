#!/usr/bin/env python
"""The temporal benchmark: every fusion option with the same learning-rate grid and schedule on each
synthetic task family, the rate chosen on val, other seeds at that rate reported on the held-out test split.

    python scripts/temporal_benchmark.py OUT_DIR [--quick] [--end-to-end] [-- train.py overrides ...]

Per task (videos under --data-dir/<task>, default data/temporal_benchmark/<task>, generated on first use):
  0. (frozen, the default) the token cache OUT/cache/<task> of train, val and test: the per-frame
     tokens of the tiny ViT that `python train.py dataset.task=<task>` starts from, never trained
     (`scripts/cache_tokens.py train_config=[...]`); runs train on it with `experiment=temporal_frozen`.
     With --backbone static the frozen backbone is instead the tiny ViT trained on the static task
     `dataset.task=shape` (per-frame labels: the shape drawn; the analogue of an image-pretrained
     backbone): first `train.py dataset.task=shape trainer.epochs=<--static-epochs, default 10>` (the
     default recipe, videos under --data-dir/shape) -> OUT/backbone_static, then every task cached with
     `ckpt=OUT/backbone_static/checkpoints/best.pt dataset.task=<task>`.
     With --end-to-end the runs train the whole model on the videos instead (the default recipe).
Every run trains until val stops improving: `trainer.patience` (--patience, default 3 validations in a
row without a better clip-level val top-1) within the cap `trainer.epochs` (--max-epochs, default 96),
every option alike. Each step runs once per head (--heads, default mean and attentive):
  1. grid: `train.py -m fusion=<all> optim.lr=<grid> trainer.seed=<grid seeds> head=<head>`
     -> OUT/grid/<task>/<head> (default lrs 1e-4 3e-4 1e-3 3e-3 1e-2, grid seeds 0 1)
  2. every grid run's best.pt evaluated on val over all its views; per option, the lr with the best mean
     of that val top-1 (ties: the smaller lr; squarefuse/report/lr_grid.py)
  3. final: that lr, seeds --seeds (default 2 3 4 5 6: not the grid's) -> OUT/final/<task>/<head>/<option>;
     each best.pt (chosen on val) evaluated on test with the twin confusion; test is read only here
Two positive controls go through 1-3 with the same lr grid, seeds and selection (not with --no-controls):
the token control `fusion=joint_mlp` (an MLP over all the tokens of a clip) among the fusions, and the
pixel control `backbone=pixels fusion=joint_mlp` trained on the videos themselves, each frame averaged down
to 8 x 8 pixels (OUT/grid_pixels/<task>/<head>, OUT/final/<task>/<head>/pixels+joint_mlp), with the frozen
runs' trainer settings and, in place of the cached eval views, train views of their zoom. A task is
informative only where the token control reaches 90 % test top-1 (squarefuse/report/matrix.py).
  4. `scripts/report.py OUT/final --matrix --out OUT/report` (the matrix: squarefuse/report/matrix.py),
     OUT/report/lr_grid.md (every grid point, the chosen rates, the fusion parameters), budget.md and
     budget_<task>.png (val top-1 within the earlier protocol's 96 steps and converged; val curves
     against optimiser steps: squarefuse/report/budget.py)
`--train` is the training command prefix (default: this Python with train.py). Wall times of each
phase go to OUT/benchmark.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import subprocess
import sys
import time
from pathlib import Path

from squarefuse.apps.cache_tokens import run_cache_tokens
from squarefuse.apps.evaluate import run_eval
from squarefuse.config.compose_config import compose_app_config, override
from squarefuse.config.output_dirs import default_eval_dir
from squarefuse.report.app import make_report
from squarefuse.report.budget import budget_markdown, plot_budget_curves
from squarefuse.report.lr_grid import choose_lrs, grid_markdown, params_note
from squarefuse.report.matrix import PIXEL_CONTROL, TOKEN_CONTROL
from squarefuse.report.runs import load_runs

REPO = Path(__file__).resolve().parents[1]

FUSIONS = (
    "none",
    "square",
    "square_quantiles_only",
    "square_trend_only",
    "square_light",
    "temporal_attn",
    "temporal_shift",
    "temporal_conv",
)
TASKS = (
    "direction",
    "path_shape",
    "repetitions",
    "speed",
    "event_order",
    "event_time",
    "acceleration",
    "count_flashes",
)
# Every option is read out both ways: a mean over tokens (cannot compare positions) and an attentive
# probe (V-JEPA's: a learned query over all tokens), configs/head/.
HEADS = ("mean", "attentive")
QUICK_TASKS = ("path_shape", "event_order")
# init: the never-trained tiny ViT train.py starts from; static: that ViT trained on dataset.task=shape.
BACKBONES = ("init", "static")
STATIC_TASK = "shape"
CACHED_SPLITS = ("train", "val", "test")
# TOKEN_CONTROL: the fusion (configs/fusion/joint_mlp.yaml) an MLP over all the tokens of a clip;
# PIXEL_CONTROL: the report's column of its run on the pixels (squarefuse/report/groups.py:fusion_option).
PIXEL_MODEL = ["backbone=pixels", f"fusion={TOKEN_CONTROL}"]
# The frozen runs train on the cached eval views: a centre crop of crop_size / eval_short_side = 224 / 256 of
# the frame's side (64 / 73 at 64 px). The pixel control, on the videos, trains on crops of that zoom
# (area (224 / 256)^2 = 0.77, square) at a random place: the same picture scale in train and test, no
# other augmentation (the synthetic dataset has no flip, RandAugment or erasing).
EVAL_ZOOM_VIEWS = ["dataset.scale=[0.77,0.77]", "dataset.ratio=[1.0,1.0]"]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the benchmark folder (must not exist)")
    parser.add_argument("--quick", action="store_true", help=f"tasks {' '.join(QUICK_TASKS)}, seeds 2 3 4")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, help="default: all (--quick: two)")
    parser.add_argument("--fusions", nargs="+", default=list(FUSIONS), help="fusion options (configs/fusion/)")
    parser.add_argument(
        "--no-controls",
        action="store_true",
        help=f"skip the token ({TOKEN_CONTROL}) and pixel ({PIXEL_CONTROL}) controls: then no task is informative",
    )
    parser.add_argument("--heads", nargs="+", default=list(HEADS), help="heads every option runs with (configs/head/)")
    parser.add_argument(
        "--lrs", nargs="+", type=float, default=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2], help="the lr grid, every option"
    )
    parser.add_argument("--grid-seeds", nargs="+", type=int, default=[0, 1], help="seeds of every grid point")
    parser.add_argument(
        "--seeds", nargs="+", type=int, help="seeds at the chosen lr (default 2 3 4 5 6; --quick 2 3 4)"
    )
    parser.add_argument("--max-epochs", type=int, default=96, help="the cap of every run (trainer.epochs)")
    parser.add_argument(
        "--patience",
        type=int,
        default=3,
        help="validations in a row without a better val top-1 that end a run (trainer.patience), every option alike",
    )
    parser.add_argument(
        "--end-to-end", action="store_true", help="train the whole model on the videos, not on the frozen cache"
    )
    parser.add_argument(
        "--backbone",
        choices=BACKBONES,
        default="init",
        help="the frozen backbone: init = never trained (train.py's start); static = trained on dataset.task=shape",
    )
    parser.add_argument(
        "--static-epochs", type=int, default=10, help="--backbone static: trainer.epochs of the backbone's run"
    )
    parser.add_argument(
        "--data",
        nargs="+",
        default=["dataset.generate.val_per_class=32", "dataset.generate.test_per_class=64"],
        help="dataset.* overrides of every task's videos (default: 32 val and 64 test videos a class)",
    )
    parser.add_argument(
        "--data-dir", type=Path, default=REPO / "data" / "temporal_benchmark", help="where each task's videos go"
    )
    parser.add_argument("--train", default=f"{shlex.quote(sys.executable)} train.py", help="training command prefix")
    # train.py overrides for every run come after "--"
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.overrides = argv[split + 1 :]
    args.train_prefix = shlex.split(args.train)
    args.tasks = args.tasks or list(QUICK_TASKS if args.quick else TASKS)
    args.seeds = args.seeds or ([2, 3, 4] if args.quick else [2, 3, 4, 5, 6])
    # Until val stops improving, within the cap; the user's overrides after "--" still win.
    args.overrides = [f"trainer.epochs={args.max_epochs}", f"trainer.patience={args.patience}", *args.overrides]
    args.controls = not args.no_controls
    if args.backbone == "static" and args.end_to_end:
        parser.error("--backbone static trains a frozen backbone: it does not go with --end-to-end")
    if args.controls and TOKEN_CONTROL not in args.fusions:
        args.fusions = [*args.fusions, TOKEN_CONTROL]
    if args.out.exists():
        parser.error(f"{args.out} exists; give a new benchmark folder (runs are never overwritten)")
    return args


def data_root(data_dir: Path, task: str) -> Path:
    return data_dir / task


def run(command: list[str]) -> None:
    print("+", shlex.join(command), flush=True)
    subprocess.run(command, cwd=REPO, check=True)


def joined(values: list) -> str:
    return ",".join(str(v) for v in values)


def sweep(train: list[str], settings: list[str], data: list[str], sweep_dir: Path, overrides: list[str]) -> list[str]:
    """`train.py -m SETTINGS DATA hydra.sweep.dir=SWEEP_DIR OVERRIDES`."""
    return [*train, "-m", *settings, *data, override("hydra.sweep.dir", sweep_dir), *overrides]


def pixel_control_data(video_data: list[str], end_to_end: bool) -> list[str]:
    """The pixel control's model and data: the videos, and the trainer settings the other runs have."""
    if end_to_end:
        return [*video_data, *PIXEL_MODEL]  # the default recipe, as every end-to-end run
    # The frozen runs' experiment (epochs, batch, threads) with the videos in place of the token cache.
    return ["experiment=temporal_frozen", "dataset=synthetic", *video_data, *EVAL_ZOOM_VIEWS, *PIXEL_MODEL]


def grid_commands(
    args: argparse.Namespace, data: list[str], video_data: list[str], out: Path, task: str, head: str
) -> dict[Path, list[str]]:
    """{sweep folder: the command of its grid}: every fusion on `data`, and the pixel control on the
    videos, each with `head`."""
    points = [f"optim.lr={joined(args.lrs)}", f"trainer.seed={joined(args.grid_seeds)}", f"head={head}"]
    fusions = [f"fusion={joined(args.fusions)}"]
    grid_dir = out / "grid" / task / head
    commands = {grid_dir: sweep(args.train_prefix, fusions + points, data, grid_dir, args.overrides)}
    if args.controls:
        pixels = pixel_control_data(video_data, args.end_to_end)
        pixel_dir = out / "grid_pixels" / task / head
        commands[pixel_dir] = sweep(args.train_prefix, points, pixels, pixel_dir, args.overrides)
    return commands


def final_commands(
    args: argparse.Namespace, data: list[str], video_data: list[str], out: Path, task: str, head: str, chosen: dict
) -> list[list[str]]:
    """Each option with `head` at its chosen lr (`chosen[(task, option)]`) with the final seeds, the
    pixel control last."""
    seeds = [f"trainer.seed={joined(args.seeds)}", f"head={head}"]
    commands = []
    for fusion in args.fusions:
        settings = [f"fusion={fusion}", f"optim.lr={chosen[(task, fusion)]}", *seeds]
        final_dir = out / "final" / task / head / fusion
        commands.append(sweep(args.train_prefix, settings, data, final_dir, args.overrides))
    if args.controls:
        pixels = pixel_control_data(video_data, args.end_to_end)
        settings = [f"optim.lr={chosen[(task, PIXEL_CONTROL)]}", *seeds]
        final_dir = out / "final" / task / head / PIXEL_CONTROL
        commands.append(sweep(args.train_prefix, settings, pixels, final_dir, args.overrides))
    return commands


def static_backbone_command(args: argparse.Namespace, out: Path) -> list[str]:
    """`train.py` on the static task (the default recipe, --static-epochs) -> OUT/backbone_static."""
    videos = data_root(args.data_dir.resolve(), STATIC_TASK)
    return [
        *args.train_prefix,
        f"dataset.task={STATIC_TASK}",
        override("dataset.root", videos),
        *args.data,
        f"trainer.epochs={args.static_epochs}",
        override("hydra.run.dir", out / "backbone_static"),
    ]


def backbone_overrides(video_data: list[str], ckpt: Path | None) -> list[str]:
    """cache_tokens' backbone on the task of `video_data`: the checkpoint's (its backbone, cached on that
    task's videos), or without one the never-trained tiny ViT `train.py VIDEO_DATA` starts from."""
    if ckpt is None:
        return ["train_config=[" + ",".join(f'"{o}"' for o in video_data) + "]"]
    task, root = video_data[:2]  # dataset.task=..., dataset.root=...
    return [override("ckpt", ckpt), task, root]


def cache_tokens(video_data: list[str], cache: Path, ckpt: Path | None = None) -> None:
    """Cache train, val and test of the videos with the frozen backbone (`backbone_overrides`)."""
    for split in CACHED_SPLITS:
        overrides = [
            *backbone_overrides(video_data, ckpt),
            f"split={split}",
            override("out", cache),
            "num_workers=0",
            "progress=false",
        ]
        print("+ cache_tokens", shlex.join(overrides), flush=True)
        run_cache_tokens(compose_app_config("cache_tokens", overrides))


def evaluate(ckpt: Path, split: str, *extra: str) -> None:
    """`eval.py ckpt=... split=SPLIT ...`, in this process (an eval.py start-up costs ~15 s): every view
    of every video (for a cache, all its cached views)."""
    overrides = [override("ckpt", ckpt), f"split={split}", *extra, "progress=false"]
    print("+ eval", shlex.join(overrides), flush=True)
    cfg = compose_app_config("eval", overrides)
    run_eval(cfg, default_eval_dir(str(ckpt), suffix=f"_{split}"))


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    args = parse_args(argv)
    out = args.out.resolve()
    times: dict[str, float] = {}
    start = time.perf_counter()
    backbone_ckpt = None  # the never-trained backbone
    if args.backbone == "static":
        run(static_backbone_command(args, out))
        backbone_ckpt = out / "backbone_static" / "checkpoints" / "best.pt"
        times["static backbone"] = time.perf_counter() - start
    for task in args.tasks:
        task_start = time.perf_counter()
        videos = data_root(args.data_dir.resolve(), task)
        video_data = [f"dataset.task={task}", override("dataset.root", videos), *args.data]
        if args.end_to_end:
            data = video_data
        else:
            cache = out / "cache" / task
            cache_tokens(video_data, cache, backbone_ckpt)
            times[f"{task}: token cache"] = time.perf_counter() - task_start
            data = ["experiment=temporal_frozen", override("dataset.root", cache)]
        for head in args.heads:
            grid_start = time.perf_counter()
            grids = grid_commands(args, data, video_data, out, task, head)
            for command in grids.values():
                run(command)
            # The rate is chosen on val by the rule that picks best.pt, read over every view of val.
            for ckpt in sorted(p for grid in grids for p in grid.glob("*/checkpoints/best.pt")):
                evaluate(ckpt, "val")
            chosen, _ = choose_lrs(load_runs(list(grids)))
            times[f"{task}, head {head}: grid"] = time.perf_counter() - grid_start

            final_start = time.perf_counter()
            for command in final_commands(args, data, video_data, out, task, head, chosen):
                run(command)
            times[f"{task}, head {head}: final runs"] = time.perf_counter() - final_start
        eval_start = time.perf_counter()
        for ckpt in sorted((out / "final" / task).glob("*/*/*/checkpoints/best.pt")):
            evaluate(ckpt, "test", override("twin_pairs", videos / "twins.txt"))
        times[f"{task}: test evaluations"] = time.perf_counter() - eval_start

    report = make_report([out / "final"], out / "report", matrix=True)
    grids = []
    for head in args.heads:
        folders = [out / kind / task / head for kind in ("grid", "grid_pixels") for task in args.tasks]
        head_runs = load_runs([folder for folder in folders if folder.is_dir()])
        chosen, points = choose_lrs(head_runs)
        grids.append(f"### head={head}\n\n" + grid_markdown(chosen, points) + "\n" + params_note(head_runs))
    (report.out_dir / "lr_grid.md").write_text("\n".join(grids))
    final_runs = load_runs([out / "final"])
    (report.out_dir / "budget.md").write_text(budget_markdown(final_runs))
    plot_budget_curves(final_runs, report.out_dir)
    times["total"] = time.perf_counter() - start
    (out / "benchmark.json").write_text(
        json.dumps(
            {
                "args": argv,
                "backbone": args.backbone,
                "checkpoint": backbone_ckpt and str(backbone_ckpt),
                "wall_s": times,
            },
            indent=2,
        )
        + "\n"
    )
    print((report.out_dir / "matrix.md").read_text())
    print((report.out_dir / "lr_grid.md").read_text())
    print((report.out_dir / "budget.md").read_text())
    print("wall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
