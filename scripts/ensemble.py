"""Ensemble several evaluations of the same videos: the weighted mean of their probabilities.

    python scripts/ensemble.py runs/a/eval/2026-01-01_10-00-00 runs/b/eval/2026-01-02_09-00-00
    python scripts/ensemble.py EVAL_DIR EVAL_DIR EVAL_DIR --weights 2 1 1 --out ensembles/abc

Each EVAL_DIR is an `eval.py` output folder (probs.pt, predictions.csv, results.json). They must
cover the same videos with the same labels and classes (the first video or class that differs is
named). Writes eval's result files (results.json, per_class.csv, predictions.csv, probs.pt,
confusion_matrix.png) to --out, by default ensembles/<date>_<time>.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("eval_dirs", nargs="+", type=Path, help="eval.py output folders")
    parser.add_argument("--weights", nargs="+", type=float, help="one weight per folder (default: equal)")
    parser.add_argument("--out", type=Path, help="output folder (default: ensembles/<date>_<time>)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from squarefuse.evaluation.ensemble import run_ensemble  # noqa: PLC0415 (keeps --help fast)

    try:
        run_ensemble(args.eval_dirs, weights=args.weights, out_dir=args.out)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)  # a mistake the user can fix, as every app (squarefuse.apps.user_errors)


if __name__ == "__main__":
    main(sys.argv[1:])
