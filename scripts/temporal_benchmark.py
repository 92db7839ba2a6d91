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
  1. grid: `train.py -m fusion=<all> optim.lr=<grid> trainer.seed=<grid seeds> head=<head>`
     -> OUT/grid/<task>/<head>/fusions, the pixel control -> OUT/grid/<task>/<head>/pixels+joint_mlp
     (default lrs 1e-4 3e-4 1e-3 3e-3 1e-2, grid seeds 0 1)
  2. per option, the lr with the best mean over the grid seeds of the val top-1 that picked best.pt
     (ties: the smaller lr; squarefuse/report/lr_grid.py)
  3. final: that lr, seeds --seeds (default 2 3 4 5 6: not the grid's) -> OUT/final/<task>/<head>/<option>;
     each best.pt (chosen on val) evaluated on test with the twin confusion as its sweep ends; test is
     read only here
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
The training sweeps run --jobs at a time (default: the CPU count, each frozen run using one thread;
with --end-to-end 1), each one's output in OUT/logs/<sweep>.log. `--train` is the training command prefix (default: this
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
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from squarefuse.apps.cache_tokens import run_cache_tokens
from squarefuse.apps.evaluate import run_eval
from squarefuse.config.compose_config import compose_app_config, override
from squarefuse.config.output_dirs import default_eval_dir
from squarefuse.report.app import make_report
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
        help="training sweeps run at a time (default: the CPU count, as a frozen run uses one torch thread; "
        "with --end-to-end 1, as those runs use the cores their loader workers leave)",
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
    if args.jobs is None:
        args.jobs = 1 if args.end_to_end else os.cpu_count() or 1
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: must be >= 1")
    if args.out.exists():
        parser.error(f"{args.out} exists; give a new benchmark folder (runs are never overwritten)")
    return args


def data_root(data_dir: Path, task: str) -> Path:
    return data_dir / task


@dataclass(frozen=True)
class Sweep:
    """One `train.py -m` command: its sweep folder, the log its output goes to, and its cost in runs, by
    which the sweeps of a batch start, the costliest first, so that the last ones to end are short."""

    folder: Path
    command: list[str]
    log: Path
    cost: float = 1.0


class SweepFailed(RuntimeError):
    """A training sweep exited with an error: the message names its log."""


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
        raise SweepFailed(f"the sweep {sweep.folder} failed (exit {code}); its log {sweep.log} ends:\n{tail}")
    print(f"done {sweep.folder} in {time.perf_counter() - start:.0f} s", flush=True)


def joined(values: list) -> str:
    return ",".join(str(v) for v in values)


def pixel_control_data(video_data: list[str], pixel_cache: Path, end_to_end: bool) -> list[str]:
    """The pixel control's model and data: with --end-to-end the videos (the default recipe, as every
    end-to-end run), else its cache of the videos' eval views, trained as the frozen runs are."""
    if end_to_end:
        return [*video_data, *PIXEL_MODEL]
    return ["experiment=temporal_frozen", override("dataset.root", pixel_cache), f"fusion={TOKEN_CONTROL}"]


def named_sweep(
    args: argparse.Namespace, out: Path, phase: str, task: str, head: str, name: str, settings: list[str], runs: int
) -> Sweep:
    """`train.py -m SETTINGS hydra.sweep.dir=OUT/PHASE/TASK/HEAD/NAME OVERRIDES`, of `runs` runs."""
    folder = out / phase / task / head / name
    command = [*args.train_prefix, "-m", *settings, override("hydra.sweep.dir", folder), *args.overrides]
    return Sweep(folder, command, out / "logs" / f"{phase}_{task}_{head}_{name}.log", runs)


def grid_commands(
    args: argparse.Namespace, data: list[str], pixel_data: list[str], out: Path, task: str, head: str
) -> list[Sweep]:
    """Every option with `head` at every grid point (lrs x grid seeds): one sweep of all the fusions on
    `data` (OUT/grid/TASK/HEAD/fusions: one Python start-up for them all), and one of the pixel control
    on `pixel_data` (OUT/grid/TASK/HEAD/pixels+joint_mlp)."""
    points = [f"optim.lr={joined(args.lrs)}", f"trainer.seed={joined(args.grid_seeds)}", f"head={head}"]
    per_option = len(args.lrs) * len(args.grid_seeds)
    fusions = [f"fusion={joined(args.fusions)}", *data, *points]
    sweeps = [named_sweep(args, out, "grid", task, head, "fusions", fusions, per_option * len(args.fusions))]
    if args.controls:
        sweeps.append(named_sweep(args, out, "grid", task, head, PIXEL_CONTROL, [*pixel_data, *points], per_option))
    return sweeps


def final_commands(
    args: argparse.Namespace,
    data: list[str],
    pixel_data: list[str],
    out: Path,
    task: str,
    head: str,
    chosen: dict[tuple[str, str], float],
) -> list[Sweep]:
    """Every option with `head` at its chosen lr (`chosen[(task, option)]`) with the final seeds, one
    sweep per option (OUT/final/TASK/HEAD/OPTION), the pixel control last."""
    settings = {fusion: [f"fusion={fusion}", *data] for fusion in args.fusions}
    if args.controls:
        settings[PIXEL_CONTROL] = pixel_data
    seeds = [f"trainer.seed={joined(args.seeds)}", f"head={head}"]
    sweeps = []
    for option, model in settings.items():
        lr = f"optim.lr={chosen[(task, option)]}"
        sweeps.append(named_sweep(args, out, "final", task, head, option, [*model, lr, *seeds], len(args.seeds)))
    return sweeps


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


@dataclass
class Task:
    """A task's videos, the model and data overrides of its fusion runs and of its pixel control, and the
    sweeps of its grid per head that have not ended."""

    name: str
    videos: Path
    data: list[str]
    pixel_data: list[str]
    grid: dict[str, list[Sweep]]
    grid_left: dict[str, int]


def prepare_task(args: argparse.Namespace, out: Path, name: str, backbone_ckpt: Path | None) -> Task:
    """The task's inputs; without --end-to-end its token cache and its pixel cache, made in this process."""
    videos = data_root(args.data_dir.resolve(), name)
    video_data = [f"dataset.task={name}", override("dataset.root", videos), *args.data]
    frozen = ["experiment=temporal_frozen", override("dataset.root", out / "cache" / name)]
    pixel_data = pixel_control_data(video_data, out / "cache_pixels" / name, args.end_to_end)
    if not args.end_to_end:
        cache_tokens(video_data, out / "cache" / name, backbone_ckpt)
        if args.controls:  # the pixel backbone has no weights: the same cache whatever the backbone
            cache_tokens([*video_data, *PIXEL_MODEL], out / "cache_pixels" / name)
    task = Task(name, videos, video_data if args.end_to_end else frozen, pixel_data, {}, {})
    for head in args.heads:
        task.grid[head] = grid_commands(args, task.data, task.pixel_data, out, name, head)
        task.grid_left[head] = len(task.grid[head])
    return task


def run_benchmark(args: argparse.Namespace, out: Path, backbone_ckpt: Path | None, times: dict[str, float]) -> None:
    """Steps 0-3 for every task, the sweeps --jobs at a time, each started as soon as what it needs is
    there: a task's grid once its caches are made (while the sweeps of the tasks before it run), its
    final sweeps once its grid has ended and the lrs are chosen, its test evaluations as each final
    sweep ends. Of the sweeps ready, final ones start first, then those of the earlier tasks, the
    costliest first: the tasks end one after another, so a benchmark stopped early keeps whole tasks.
    Caches and evaluations run in this thread (one thread composes configs), the sweeps in processes
    of their own. The first failure stops the sweeps not started and is raised."""
    start = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=args.jobs)
    running: dict[Future, tuple[Task, str, str, Sweep]] = {}  # -> task, head, phase, sweep
    ready: list[tuple[tuple[bool, int, float], Task, str, str, Sweep]] = []  # (priority, task, head, phase, sweep)
    finals_left: dict[str, int] = {}
    times["test evaluations"] = 0.0

    def launch(task: Task, head: str, phase: str, sweeps: list[Sweep]) -> None:
        for sweep in sweeps:
            ready.append(((phase != "final", args.tasks.index(task.name), -sweep.cost), task, head, phase, sweep))
        ready.sort(key=lambda item: item[0])

    def fill() -> None:
        while ready and len(running) < args.jobs:
            _, task, head, phase, sweep = ready.pop(0)
            running[pool.submit(run_logged, sweep)] = (task, head, phase, sweep)

    def ended(task: Task, head: str, phase: str, sweep: Sweep) -> None:
        if phase == "grid":
            task.grid_left[head] -= 1
            if not task.grid_left[head]:
                # Step 2: on val, by the number that picked best.pt (every view: trainer.val_views=all).
                chosen, _ = choose_lrs(load_runs([s.folder for s in task.grid[head]]))
                finals = final_commands(args, task.data, task.pixel_data, out, task.name, head, chosen)
                finals_left[task.name] = finals_left.get(task.name, 0) + len(finals)
                launch(task, head, "final", finals)
            return
        eval_start = time.perf_counter()
        for ckpt in sorted(sweep.folder.glob("*/checkpoints/best.pt")):  # test is read only here
            evaluate(ckpt, "test", override("twin_pairs", task.videos / "twins.txt"))
        times["test evaluations"] += time.perf_counter() - eval_start
        finals_left[task.name] -= 1
        if not finals_left[task.name] and not any(task.grid_left.values()):
            times[f"{task.name}: done after"] = time.perf_counter() - start

    def collect(block: bool) -> None:
        done, _ = wait(list(running), timeout=None if block else 0, return_when=FIRST_COMPLETED)
        for future in done:
            task, head, phase, sweep = running.pop(future)
            future.result()
            ended(task, head, phase, sweep)
            fill()

    try:
        for name in args.tasks:
            cache_start = time.perf_counter()
            task = prepare_task(args, out, name, backbone_ckpt)
            times[f"{name}: caches"] = time.perf_counter() - cache_start
            for head in args.heads:
                launch(task, head, "grid", task.grid[head])
            fill()
            collect(block=False)
        while running:
            collect(block=True)
    finally:
        for future in running:
            future.cancel()
        pool.shutdown(wait=True)


def write_reports(args: argparse.Namespace, out: Path) -> Path:
    """Step 4: the matrix and the budget (`scripts/report.py --matrix`), and the lr grid of each head, into
    OUT/report; returns that folder."""
    report = make_report([out / "final"], out / "report", matrix=True)
    grid_notes = []
    for head in args.heads:
        head_runs = load_runs([out / "grid" / task / head for task in args.tasks])
        head_chosen, points = choose_lrs(head_runs)
        grid_notes.append(f"### head={head}\n\n" + grid_markdown(head_chosen, points) + "\n" + params_note(head_runs))
    (report.out_dir / "lr_grid.md").write_text("\n".join(grid_notes))
    return report.out_dir


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
    try:
        run_benchmark(args, out, backbone_ckpt, times)
    except SweepFailed as e:
        print(f"temporal_benchmark: {e}\nthe runs that ended are kept in {out}", file=sys.stderr)
        return 1
    report_dir = write_reports(args, out)
    times["total"] = time.perf_counter() - start
    summary = {
        "args": argv,
        "backbone": args.backbone,
        "jobs": args.jobs,
        "checkpoint": backbone_ckpt and str(backbone_ckpt),
        "wall_s": times,
    }
    (out / "benchmark.json").write_text(json.dumps(summary, indent=2) + "\n")
    for name in ("matrix.md", "lr_grid.md", "budget.md"):
        print((report_dir / name).read_text())
    print("wall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
