#!/usr/bin/env python
"""The temporal benchmark: every fusion option with the same learning-rate grid and schedule on each
synthetic task family, the rate chosen on val, other seeds at that rate reported on the held-out test split.

    python scripts/temporal_benchmark.py OUT_DIR [--quick] [--end-to-end] [-- train.py overrides ...]

Per task (videos under --data-dir/<task>, default data/temporal_benchmark/<task>, generated on first use):
  0. (frozen, the default) the token cache OUT/cache/<task> of train, val and test: the per-frame
     tokens of the tiny ViT that `python train.py dataset.task=<task>` starts from, never trained
     (`scripts/cache_tokens.py train_config=[...]`); runs train on it with `experiment=temporal_frozen`.
     With --end-to-end the runs train the whole model on the videos instead (the default recipe).
  1. grid: `train.py -m fusion=<all> optim.lr=<grid> trainer.seed=<grid seeds>` -> OUT/grid/<task>
  2. per fusion, the lr with the best mean final clip-level val top-1 (ties: the smaller lr)
  3. final: that lr, seeds --seeds (default 1 2 3: not the grid's seed 0) -> OUT/final/<task>/<fusion>;
     each best.pt (chosen on val) evaluated on test with the twin confusion; test is read only here
  4. `scripts/report.py OUT/final --matrix --out OUT/report` and OUT/report/lr_grid.md (every grid
     point, the chosen rates, the fusion parameters)
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
from squarefuse.report.lr_grid import choose_lrs, grid_markdown, params_note
from squarefuse.report.runs import load_runs

REPO = Path(__file__).resolve().parents[1]

FUSIONS = (
    "none",
    "square",
    "square_quantiles_only",
    "square_trend_only",
    "square_light",
    "square_fixed_sigma",
    "temporal_attn",
    "temporal_shift",
    "temporal_conv",
)
TASKS = ("direction", "path_shape", "repetitions", "speed", "event_order", "event_time")
QUICK_TASKS = ("path_shape", "event_order")
CACHED_SPLITS = ("train", "val", "test")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the benchmark folder (must not exist)")
    parser.add_argument("--quick", action="store_true", help=f"tasks {' '.join(QUICK_TASKS)}, seeds 1 2")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, help="default: all (--quick: two)")
    parser.add_argument("--fusions", nargs="+", default=list(FUSIONS), help="fusion options (configs/fusion/)")
    parser.add_argument("--lrs", nargs="+", type=float, default=[1e-3, 3e-3, 1e-2], help="the lr grid")
    parser.add_argument("--grid-seeds", nargs="+", type=int, default=[0], help="seeds of every grid point")
    parser.add_argument("--seeds", nargs="+", type=int, help="seeds at the chosen lr (default 1 2 3; --quick 1 2)")
    parser.add_argument(
        "--end-to-end", action="store_true", help="train the whole model on the videos, not on the frozen cache"
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
    args.tasks = args.tasks or list(QUICK_TASKS if args.quick else TASKS)
    args.seeds = args.seeds or ([1, 2] if args.quick else [1, 2, 3])
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


def cache_tokens(video_data: list[str], cache: Path) -> None:
    """Cache train, val and test of the videos with the never-trained tiny ViT `train.py` starts from."""
    for split in CACHED_SPLITS:
        overrides = [
            "train_config=[" + ",".join(f'"{o}"' for o in video_data) + "]",
            f"split={split}",
            override("out", cache),
            "num_workers=0",
            "progress=false",
        ]
        print("+ cache_tokens", shlex.join(overrides), flush=True)
        run_cache_tokens(compose_app_config("cache_tokens", overrides))


def evaluate_on_test(ckpt: Path, twins: Path) -> None:
    """`eval.py ckpt=... split=test twin_pairs=...`, in this process (an eval.py start-up costs ~15 s)."""
    overrides = [override("ckpt", ckpt), "split=test", override("twin_pairs", twins), "progress=false"]
    print("+ eval", shlex.join(overrides), flush=True)
    cfg = compose_app_config("eval", overrides)
    run_eval(cfg, default_eval_dir(str(ckpt), suffix="_test"))


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    args = parse_args(argv)
    out = args.out.resolve()
    train = shlex.split(args.train)
    times: dict[str, float] = {}
    start = time.perf_counter()
    for task in args.tasks:
        task_start = time.perf_counter()
        videos = data_root(args.data_dir.resolve(), task)
        video_data = [f"dataset.task={task}", override("dataset.root", videos), *args.data]
        if args.end_to_end:
            data = video_data
        else:
            cache = out / "cache" / task
            cache_tokens(video_data, cache)
            times[f"{task}: token cache"] = time.perf_counter() - task_start
            data = ["experiment=temporal_frozen", override("dataset.root", cache)]
        grid_start = time.perf_counter()
        grid_dir = out / "grid" / task
        sweep = [
            f"fusion={joined(args.fusions)}",
            f"optim.lr={joined(args.lrs)}",
            f"trainer.seed={joined(args.grid_seeds)}",
        ]
        run([*train, "-m", *sweep, *data, override("hydra.sweep.dir", grid_dir), *args.overrides])
        chosen, _ = choose_lrs(load_runs([grid_dir]))
        times[f"{task}: grid"] = time.perf_counter() - grid_start

        final_start = time.perf_counter()
        for fusion in args.fusions:
            final_dir = out / "final" / task / fusion
            run(
                [
                    *train,
                    "-m",
                    f"fusion={fusion}",
                    f"optim.lr={chosen[(task, fusion)]}",
                    f"trainer.seed={joined(args.seeds)}",
                    *data,
                    override("hydra.sweep.dir", final_dir),
                    *args.overrides,
                ]
            )
        times[f"{task}: final runs"] = time.perf_counter() - final_start
        eval_start = time.perf_counter()
        for ckpt in sorted((out / "final" / task).glob("*/*/checkpoints/best.pt")):
            evaluate_on_test(ckpt, videos / "twins.txt")
        times[f"{task}: test evaluations"] = time.perf_counter() - eval_start

    report = make_report([out / "final"], out / "report", matrix=True)
    grid_runs = load_runs([out / "grid"])
    chosen, points = choose_lrs(grid_runs)
    (report.out_dir / "lr_grid.md").write_text(grid_markdown(chosen, points) + "\n" + params_note(grid_runs))
    times["total"] = time.perf_counter() - start
    (out / "benchmark.json").write_text(json.dumps({"args": argv, "wall_s": times}, indent=2) + "\n")
    print((report.out_dir / "matrix.md").read_text())
    print((report.out_dir / "lr_grid.md").read_text())
    print("wall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
