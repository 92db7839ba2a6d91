"""The files of an eval folder and when it is complete; free of torch, so the report can use it.

`results.write_results` writes every file atomically and results.json last (after removing the
results.json of an earlier evaluation into the same folder), so a folder without it is an
evaluation that failed part-way or is still running.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["RESULTS_FILE", "RESULT_FILES", "is_complete"]

RESULTS_FILE = "results.json"  # written last: its presence means the other files are whole
RESULT_FILES = ("per_class.csv", "predictions.csv", "probs.pt", "confusion_matrix.png")


def is_complete(folder: str | Path) -> bool:
    """Whether an eval folder holds every result file.

    Older versions wrote results.json first: their folders count as complete only when they got
    as far as the last file (confusion_matrix.png).
    """
    folder = Path(folder)
    return all((folder / name).is_file() for name in (RESULTS_FILE, *RESULT_FILES))
