"""Renamed: `python scripts/benchmark_step.py` times a training step (the same flags)."""

import sys

if __name__ == "__main__":
    print(
        "error: scripts/benchmark.py is now scripts/benchmark_step.py (it times a training step; same flags)",
        file=sys.stderr,
    )
    sys.exit(2)
