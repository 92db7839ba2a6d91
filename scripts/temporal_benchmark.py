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
row without a better val top-1) within the cap `trainer.epochs` (--max-epochs, default 96), and
validates over every view of each val video (`trainer.val_views=all`, as eval.py reads val), every
option alike: best.pt and the lr choice go by that one number. Each step runs once per head (--heads,
default mean and attentive):
  1. grid: per option, `train.py -m fusion=<option> optim.lr=<grid> trainer.seed=<grid seeds> head=<head>`
     -> OUT/grid/<task>/<head>/<option> (default lrs 1e-4 3e-4 1e-3 3e-3 1e-2, grid seeds 0 1)
  2. per option, the lr with the best mean over the grid seeds of the val top-1 that picked best.pt
     (ties: the smaller lr; squarefuse/report/lr_grid.py)
  3. final: that lr, seeds --seeds (default 2 3 4 5 6: not the grid's) -> OUT/final/<task>/<head>/<option>;
     each best.pt (chosen on val) evaluated on test with the twin confusion; test is read only here
Two positive controls go through 1-3 with the same lr grid, seeds and selection (not with --no-controls):
the token control `fusion=joint_mlp` (an MLP over all the tokens of a clip) among the fusions, and the
pixel control `pixels+joint_mlp`: the same MLP on the raw frames, each frame averaged down to 8 x 8
pixels (`backbone=pixels`, no weights), cached like the tokens from the same eval views of the same
videos (OUT/cache_pixels/<task>) and trained like them. A task is informative only where the token
control reaches 90 % test top-1 (squarefuse/report/matrix.py).
  4. `scripts/report.py OUT/final --matrix --out OUT/report` (the matrix: squarefuse/report/matrix.py),
     OUT/report/lr_grid.md (every grid point, the chosen rates, the fusion parameters), budget.md and
     budget_<task>.png (val top-1 within the earlier protocol's 96 steps and converged; val curves
     against optimiser steps: squarefuse/report/budget.py)
The training sweeps run --jobs at a time (default: the CPU count; each frozen run uses one thread),
each one's output in OUT/logs/<sweep>.log. `--train` is the training command prefix (default: this
Python with train.py). Wall times of each phase go to OUT/benchmark.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
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
    parser.add_argument(
        "--jobs",
        type=int,
        default=os.cpu_count() or 1,
        help="training sweeps run at a time (default: the CPU count; a frozen run uses one thread)",
    )
    parser.add_argument("--train", default=f"{shlex.quote(sys.executable)} train.py", help="training command prefix")
    # train.py overrides for every run come after "--"
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.overrides = argv[split + 1 :]
    args.train_prefix = shlex.split(args.train)
    args.tasks = args.tasks or list(QUICK_TASKS if args.quick else TASKS)
    args.seeds = args.seeds or ([2, 3, 4] if args.quick else [2, 3, 4, 5, 6])
    # Until val (every view) stops improving, within the cap; the user's overrides after "--" still win.
    args.overrides = [
        f"trainer.epochs={args.max_epochs}",
        f"trainer.patience={args.patience}",
        "trainer.val_views=all",
        *args.overrides,
    ]
    args.controls = not args.no_controls
    if args.backbone == "static" and args.end_to_end:
        parser.error("--backbone static trains a frozen backbone: it does not go with --end-to-end")
    if args.controls and TOKEN_CONTROL not in args.fusions:
        args.fusions = [*args.fusions, TOKEN_CONTROL]
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: must be >= 1")
    if args.out.exists():
        parser.error(f"{args.out} exists; give a new benchmark folder (runs are never overwritten)")
    return args


def data_root(data_dir: Path, task: str) -> Path:
    return data_dir / task


@dataclass(frozen=True)
class Sweep:
    """One `train.py -m` command: its sweep folder, and the log its output goes to."""

    folder: Path
    command: list[str]
    log: Path


def run(command: list[str]) -> None:
    print("+", shlex.join(command), flush=True)
    subprocess.run(command, cwd=REPO, check=True)


def run_logged(sweep: Sweep) -> None:
    """Run the sweep, its output into its log; a failure raises naming the log, with its last lines."""
    sweep.log.parent.mkdir(parents=True, exist_ok=True)
    print("+", shlex.join(sweep.command), ">", sweep.log, flush=True)
    start = time.perf_counter()
    with open(sweep.log, "w") as log:
        code = subprocess.run(sweep.command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
    if code:
        tail = "\n".join(sweep.log.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"the sweep {sweep.folder} failed (exit {code}); its log {sweep.log} ends:\n{tail}")
    print(f"done {sweep.folder} in {time.perf_counter() - start:.0f} s", flush=True)


def run_sweeps(sweeps: list[Sweep], jobs: int) -> None:
    """Run the sweeps `jobs` at a time (each in a process of its own); the first failure cancels
    those not started and is raised once the running ones end."""
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(run_logged, sweep) for sweep in sweeps]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [future.exception() for future in futures if future in done and future.exception()]
        if failed:
            for future in futures:
                future.cancel()
            raise failed[0]


def joined(values: list) -> str:
    return ",".join(str(v) for v in values)


def pixel_control_data(video_data: list[str], pixel_cache: Path, end_to_end: bool) -> list[str]:
    """The pixel control's model and data: with --end-to-end the videos (the default recipe, as every
    end-to-end run), else its cache of the videos' eval views, trained as the frozen runs are."""
    if end_to_end:
        return [*video_data, *PIXEL_MODEL]
    return ["experiment=temporal_frozen", override("dataset.root", pixel_cache), f"fusion={TOKEN_CONTROL}"]


def options(args: argparse.Namespace, data: list[str], pixel_data: list[str]) -> list[tuple[str, list[str]]]:
    """(option, its model and data overrides) of everything the benchmark trains: each fusion on
    `data`, then the pixel control on `pixel_data`."""
    trained = [(fusion, [f"fusion={fusion}", *data]) for fusion in args.fusions]
    return [*trained, (PIXEL_CONTROL, pixel_data)] if args.controls else trained


def option_sweep(
    args: argparse.Namespace, out: Path, phase: str, task: str, head: str, option: str, settings: list[str]
) -> Sweep:
    """`train.py -m SETTINGS hydra.sweep.dir=OUT/PHASE/TASK/HEAD/OPTION OVERRIDES`."""
    folder = out / phase / task / head / option
    command = [*args.train_prefix, "-m", *settings, override("hydra.sweep.dir", folder), *args.overrides]
    return Sweep(folder, command, out / "logs" / f"{phase}_{task}_{head}_{option}.log")


def grid_commands(
    args: argparse.Namespace, data: list[str], pixel_data: list[str], out: Path, task: str, head: str
) -> list[Sweep]:
    """Every option with `head` at every grid point: lrs x grid seeds, one sweep per option."""
    points = [f"optim.lr={joined(args.lrs)}", f"trainer.seed={joined(args.grid_seeds)}", f"head={head}"]
    return [
        option_sweep(args, out, "grid", task, head, option, [*settings, *points])
        for option, settings in options(args, data, pixel_data)
    ]


def final_commands(
    args: argparse.Namespace,
    data: list[str],
    pixel_data: list[str],
    out: Path,
    task: str,
    head: str,
    chosen: dict[tuple[str, str], float],
) -> list[Sweep]:
    """Every option with `head` at its chosen lr (`chosen[(task, option)]`) with the final seeds."""
    seeds = [f"trainer.seed={joined(args.seeds)}", f"head={head}"]
    return [
        option_sweep(args, out, "final", task, head, option, [*settings, f"optim.lr={chosen[(task, option)]}", *seeds])
        for option, settings in options(args, data, pixel_data)
    ]


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
    # Each task's videos, and the model inputs of its runs (caches first: they are made in this process).
    videos, data, pixel_data = {}, {}, {}
    for task in args.tasks:
        task_start = time.perf_counter()
        videos[task] = data_root(args.data_dir.resolve(), task)
        video_data = [f"dataset.task={task}", override("dataset.root", videos[task]), *args.data]
        data[task] = (
            video_data
            if args.end_to_end
            else ["experiment=temporal_frozen", override("dataset.root", out / "cache" / task)]
        )
        pixel_data[task] = pixel_control_data(video_data, out / "cache_pixels" / task, args.end_to_end)
        if not args.end_to_end:
            cache_tokens(video_data, out / "cache" / task, backbone_ckpt)
            if args.controls:  # the pixel backbone has no weights: the same cache whatever the backbone
                cache_tokens([*video_data, *PIXEL_MODEL], out / "cache_pixels" / task)
            times[f"{task}: token cache"] = time.perf_counter() - task_start

    phase_start = time.perf_counter()
    grids = {
        (task, head): grid_commands(args, data[task], pixel_data[task], out, task, head)
        for task in args.tasks
        for head in args.heads
    }
    run_sweeps([sweep for sweeps in grids.values() for sweep in sweeps], args.jobs)
    # The rate is chosen on val by the number that picked best.pt (over every view: trainer.val_views=all).
    chosen = {key: choose_lrs(load_runs([sweep.folder for sweep in sweeps]))[0] for key, sweeps in grids.items()}
    times["grid"] = time.perf_counter() - phase_start

    phase_start = time.perf_counter()
    finals = [
        final_commands(args, data[task], pixel_data[task], out, task, head, chosen[(task, head)])
        for task, head in grids
    ]
    run_sweeps([sweep for sweeps in finals for sweep in sweeps], args.jobs)
    times["final runs"] = time.perf_counter() - phase_start

    phase_start = time.perf_counter()
    for task in args.tasks:
        for ckpt in sorted((out / "final" / task).glob("*/*/*/checkpoints/best.pt")):
            evaluate(ckpt, "test", override("twin_pairs", videos[task] / "twins.txt"))
    times["test evaluations"] = time.perf_counter() - phase_start

    report = make_report([out / "final"], out / "report", matrix=True)
    grid_notes = []
    for head in args.heads:
        head_runs = load_runs([out / "grid" / task / head for task in args.tasks])
        head_chosen, points = choose_lrs(head_runs)
        grid_notes.append(f"### head={head}\n\n" + grid_markdown(head_chosen, points) + "\n" + params_note(head_runs))
    (report.out_dir / "lr_grid.md").write_text("\n".join(grid_notes))
    final_runs = load_runs([out / "final"])
    (report.out_dir / "budget.md").write_text(budget_markdown(final_runs))
    plot_budget_curves(final_runs, report.out_dir)
    times["total"] = time.perf_counter() - start
    (out / "benchmark.json").write_text(
        json.dumps(
            {
                "args": argv,
                "backbone": args.backbone,
                "jobs": args.jobs,
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
