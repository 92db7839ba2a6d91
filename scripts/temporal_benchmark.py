#!/usr/bin/env python
"""The temporal benchmark: every fusion option with the same learning-rate grid and schedule on each
synthetic task family, the rate chosen on val, seeds at that rate reported on the held-out test split.

    python scripts/temporal_benchmark.py OUT_DIR [--quick] [-- train.py overrides ...]
    python scripts/temporal_benchmark.py multirun/micro --tasks path_shape --fusions none square \\
        --lrs 1e-3 2e-3 4e-3 --seeds 0 1 2 -- trainer.epochs=1 dataset.generate.train_per_class=4

Per task (data under data/synthetic for `direction`, data/synthetic_<task> for the others, generated
on first use):
  1. grid: `train.py -m fusion=<all> optim.lr=<grid> trainer.seed=<grid seeds>` -> OUT/grid/<task>
  2. per fusion, the lr with the best mean final clip-level val top-1 (ties: the smaller lr)
  3. final: that lr, seeds --seeds -> OUT/final/<task>/<fusion>; each best.pt evaluated with
     `eval.py split=test twin_pairs=<root>/twins.txt` (best.pt is chosen on val; test is never read before)
  4. `scripts/report.py OUT/final --matrix --out OUT/report` and OUT/report/lr_grid.md (every grid
     point, the chosen rates, the fusion parameters)
`--train` / `--eval` are the command prefixes (default: this Python with train.py / eval.py), so the
same protocol can run on other data, e.g. cached tokens of a frozen backbone. Wall times of each
phase go to OUT/benchmark.json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

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


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the benchmark folder (must not exist)")
    parser.add_argument("--quick", action="store_true", help=f"tasks {' '.join(QUICK_TASKS)}, seeds 0 1")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, help="default: all (--quick: two)")
    parser.add_argument("--fusions", nargs="+", default=list(FUSIONS), help="fusion options (configs/fusion/)")
    parser.add_argument("--lrs", nargs="+", type=float, default=[1e-3, 2e-3, 4e-3], help="the lr grid")
    parser.add_argument("--grid-seeds", nargs="+", type=int, default=[0], help="seeds of every grid point")
    parser.add_argument("--seeds", nargs="+", type=int, help="seeds at the chosen lr (default 0 1 2; --quick 0 1)")
    parser.add_argument("--train", default=f"{shlex.quote(sys.executable)} train.py", help="training command prefix")
    parser.add_argument("--eval", default=f"{shlex.quote(sys.executable)} eval.py", help="eval command prefix")
    # train.py overrides for every run come after "--"
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.overrides = argv[split + 1 :]
    args.tasks = args.tasks or list(QUICK_TASKS if args.quick else TASKS)
    args.seeds = args.seeds or ([0, 1] if args.quick else [0, 1, 2])
    if args.out.exists():
        parser.error(f"{args.out} exists; give a new benchmark folder (runs are never overwritten)")
    return args


def data_root(task: str) -> str:
    return "data/synthetic" if task == "direction" else f"data/synthetic_{task}"


def run(command: list[str]) -> None:
    print("+", shlex.join(command), flush=True)
    subprocess.run(command, cwd=REPO, check=True)


def joined(values: list) -> str:
    return ",".join(str(v) for v in values)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    out = args.out.resolve()
    train, evaluate = shlex.split(args.train), shlex.split(args.eval)
    times: dict[str, float] = {}
    start = time.perf_counter()
    for task in args.tasks:
        task_start = time.perf_counter()
        data = [f"dataset.task={task}", f"dataset.root={data_root(task)}"]
        grid_dir = out / "grid" / task
        sweep = [
            f"fusion={joined(args.fusions)}",
            f"optim.lr={joined(args.lrs)}",
            f"trainer.seed={joined(args.grid_seeds)}",
        ]
        run([*train, "-m", *sweep, *data, f"hydra.sweep.dir={grid_dir}", *args.overrides])
        chosen, _ = choose_lrs(load_runs([grid_dir]))
        times[f"{task}: grid"] = time.perf_counter() - task_start

        final_start = time.perf_counter()
        for fusion in args.fusions:
            final_dir = out / "final" / task / fusion
            lr = chosen[(task, fusion)]
            seeds = f"trainer.seed={joined(args.seeds)}"
            run(
                [
                    *train,
                    "-m",
                    f"fusion={fusion}",
                    f"optim.lr={lr}",
                    seeds,
                    *data,
                    f"hydra.sweep.dir={final_dir}",
                    *args.overrides,
                ]
            )
        times[f"{task}: final runs"] = time.perf_counter() - final_start
        eval_start = time.perf_counter()
        for ckpt in sorted((out / "final" / task).glob("*/*/checkpoints/best.pt")):
            run([*evaluate, f"ckpt={ckpt}", "split=test", f"twin_pairs={data_root(task)}/twins.txt", "progress=false"])
        times[f"{task}: test evaluations"] = time.perf_counter() - eval_start

    report = make_report([out / "final"], out / "report", matrix=True)
    grid_runs = load_runs([out / "grid"])
    chosen, points = choose_lrs(grid_runs)
    (report.out_dir / "lr_grid.md").write_text(grid_markdown(chosen, points) + "\n" + params_note(grid_runs))
    times["total"] = time.perf_counter() - start
    (out / "benchmark.json").write_text(json.dumps({"args": sys.argv[1:], "wall_s": times}, indent=2) + "\n")
    print((report.out_dir / "matrix.md").read_text())
    print((report.out_dir / "lr_grid.md").read_text())
    print("wall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
