"""Find training runs on disk and read what they recorded.

A run folder (written by `train.py`, see the README's "Run folder") holds `config.yaml` (the
resolved config), `metrics.jsonl` (train / `val_clip` / `end` records), `checkpoints/`,
optionally `model_info.json` (parameters and FLOPs per part of the model), Hydra's `.hydra/`
(the group choices, e.g. `fusion: none`) and `train.log`, and one folder per `eval.py` run under
`eval/*/` with `results.json` and `predictions.csv`. An eval folder without all its result files
(`eval_files.is_complete`: the eval failed part-way or is still running) is not read; the run
lists it in `incomplete_evals`.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from squarefuse.evaluation.eval_files import RESULTS_FILE, is_complete
from squarefuse.runtime.safe_text import csv_value

# Status of a run, from its `end` record (written by the trainer when `fit` returns or raises)
# or, for runs written before that record existed, from how far its validations got.
FINISHED, INTERRUPTED, CRASHED, UNFINISHED = "finished", "interrupted", "crashed", "unfinished"
_LOG_TIME = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+\]")


@dataclass
class EvalRun:
    """One `eval.py` output folder of a run."""

    path: Path
    results: dict[str, Any]

    @property
    def frame_order(self) -> str:
        return str(self.results.get("frame_order") or "normal")

    @property
    def predictions_path(self) -> Path:
        return self.path / "predictions.csv"


@dataclass
class Run:
    """What one training run recorded (missing pieces are None / empty, never guessed)."""

    path: Path
    config: dict[str, Any]
    choices: dict[str, str] = field(default_factory=dict)  # Hydra group choices (fusion: none...)
    status: str = UNFINISHED
    problem: str | None = None  # why the run is not finished, in words
    val_curve: list[tuple[int, float]] = field(default_factory=list)  # (epoch, clip-level val top-1)
    val_steps: list[tuple[int, float]] = field(default_factory=list)  # (optimiser step, clip-level val top-1)
    train_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, train loss), skipped windows out
    clips_per_s: float | None = None
    wall_s: float | None = None
    model_info: dict[str, Any] | None = None
    evals: list[EvalRun] = field(default_factory=list)
    incomplete_evals: list[Path] = field(default_factory=list)  # eval folders left out: not complete
    checkpoints: list[str] = field(default_factory=list)

    @property
    def seed(self) -> Any:
        return self.config.get("trainer", {}).get("seed")

    @property
    def final_top1(self) -> float | None:
        return self.val_curve[-1][1] if self.val_curve else None

    @property
    def best_top1(self) -> float | None:
        return max(top1 for _, top1 in self.val_curve) if self.val_curve else None

    def eval_for(self, frame_order: str = "normal") -> EvalRun | None:
        """The latest evaluation with this frame order (eval folders are named by time)."""
        matching = [e for e in self.evals if e.frame_order == frame_order]
        return matching[-1] if matching else None

    def split_eval(self, split: str) -> EvalRun | None:
        """The latest evaluation of `split` (results.json's `split`) with the frames in order."""
        matching = [e for e in self.evals if e.frame_order == "normal" and e.results.get("split") == split]
        return matching[-1] if matching else None


def is_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file() or (path / "metrics.jsonl").is_file() or (path / ".hydra").is_dir()


def find_run_dirs(paths: Sequence[str | Path]) -> list[Path]:
    """Every run folder at or below `paths` (a multirun folder, run folders, or a mix), sorted.

    Raises:
        FileNotFoundError: a path does not exist.
    """
    found: list[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise FileNotFoundError(f"no such run or multirun folder: {path}")
        if is_run_dir(path):
            found.append(path)
            continue
        for root, dirs, _ in os.walk(path):
            root_path = Path(root)
            if root_path != path and is_run_dir(root_path):
                found.append(root_path)
                dirs.clear()  # eval/ and checkpoints/ below a run are not runs
            else:
                dirs.sort()
    unique = {p.resolve(): p for p in found}
    return sorted(unique.values(), key=_natural_key)


def _natural_key(path: Path) -> list[Any]:
    # multirun/.../2 before multirun/.../10
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def expected_jobs(multirun_dir: Path) -> int | None:
    """How many jobs Hydra's `multirun.yaml` asked for (the product of the sweep lists), if known."""
    from hydra.core.override_parser.overrides_parser import OverridesParser  # noqa: PLC0415
    from hydra.errors import HydraException  # noqa: PLC0415

    path = multirun_dir / "multirun.yaml"
    if not path.is_file():
        return None
    task = (yaml.safe_load(path.read_text()) or {}).get("hydra", {}).get("overrides", {}).get("task", [])
    try:
        overrides = OverridesParser.create().parse_overrides(list(task))
        return math.prod(len(list(o.sweep_string_iterator())) for o in overrides if o.is_sweep_override())
    except HydraException:  # glob() sweeps need the config: the count stays unknown
        return None


def _load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from e
    return data if isinstance(data, dict) else {}


def _read_metrics(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The records of metrics.jsonl and the number of unreadable lines (a crash mid-write)."""
    records, bad = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            bad += 1
    return records, bad


def _log_span_s(path: Path) -> float | None:
    """Seconds between the first and last time-stamped line of Hydra's job log."""
    if not path.is_file():
        return None
    stamps = [m.group(1) for m in map(_LOG_TIME.match, path.read_text(errors="replace").splitlines()) if m]
    if len(stamps) < 2:
        return None
    fmt = "%Y-%m-%d %H:%M:%S"
    return (datetime.strptime(stamps[-1], fmt) - datetime.strptime(stamps[0], fmt)).total_seconds()


def _status_from_progress(config: dict[str, Any], records: list[dict[str, Any]]) -> str:
    # Runs without an `end` record: finished when the last validation reached the planned end.
    trainer = config.get("trainer", {})
    last_val = next((r for r in reversed(records) if r.get("split") == "val_clip"), None)
    if last_val is None:
        return UNFINISHED
    if trainer.get("epochs") is not None and last_val.get("epoch", -1) >= int(trainer["epochs"]):
        return FINISHED
    if trainer.get("max_steps") is not None and last_val.get("step", -1) >= int(trainer["max_steps"]):
        return FINISHED
    return UNFINISHED


def load_evals(run_dir: Path) -> tuple[list[EvalRun], list[Path]]:
    """The complete eval folders of a run (oldest first) and the incomplete ones (by name)."""
    folders = sorted(p for p in (run_dir / "eval").glob("*") if p.is_dir() and not p.name.startswith("."))
    incomplete = [p for p in folders if not is_complete(p)]
    evals = []
    for folder in sorted(set(folders) - set(incomplete), key=lambda p: (p / RESULTS_FILE).stat().st_mtime):
        results = folder / RESULTS_FILE
        try:
            data = json.loads(results.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{results} is not valid JSON: {e}") from e
        evals.append(EvalRun(folder, data))
    return evals, incomplete


def load_run(run_dir: str | Path) -> Run:
    """Read one run folder; a run that never got far is returned with its status and problem."""
    run_dir = Path(run_dir)
    if (run_dir / "config.yaml").is_file():
        config = _load_yaml(run_dir / "config.yaml")
    elif (run_dir / ".hydra" / "config.yaml").is_file():  # failed before the trainer wrote config.yaml
        config = _load_yaml(run_dir / ".hydra" / "config.yaml")
    else:
        config = {}
    hydra_cfg = _load_yaml(run_dir / ".hydra" / "hydra.yaml") if (run_dir / ".hydra" / "hydra.yaml").is_file() else {}
    choices = {str(k): str(v) for k, v in (hydra_cfg.get("hydra", {}).get("runtime", {}).get("choices") or {}).items()}
    run = Run(path=run_dir, config=config, choices=choices)
    run.checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("*.pt"))
    run.evals, run.incomplete_evals = load_evals(run_dir)
    info = run_dir / "model_info.json"
    if info.is_file():
        run.model_info = json.loads(info.read_text())

    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        run.status, run.problem = CRASHED, "no metrics.jsonl: the run stopped before training started"
        run.wall_s = _log_span_s(run_dir / "train.log")
        return run
    records, bad_lines = _read_metrics(metrics_path)
    run.val_curve = [(int(r["epoch"]), float(r["top1"])) for r in records if r.get("split") == "val_clip"]
    run.val_steps = [(int(r["step"]), float(r["top1"])) for r in records if r.get("split") == "val_clip"]
    run.train_curve = [
        (int(r["step"]), float(r["loss"])) for r in records if r.get("split") == "train" and r.get("loss") is not None
    ]
    speeds = [float(r["clips_per_s"]) for r in records if r.get("split") == "train" and "clips_per_s" in r]
    # The first window includes worker start-up and compilation: leave it out when there are more.
    run.clips_per_s = sum(speeds[1:]) / len(speeds[1:]) if len(speeds) > 1 else (speeds[0] if speeds else None)
    ends = [r for r in records if r.get("split") == "end"]
    if ends:
        last = ends[-1]
        run.status = str(last.get("status", UNFINISHED))
        if run.status == CRASHED:
            run.problem = f"crashed at step {last.get('step')}: {last.get('error', 'unknown error')}"
        elif run.status == INTERRUPTED:
            run.problem = f"interrupted at step {last.get('step')} (resumable from checkpoints/last.pt)"
        walls = [float(r["wall_s"]) for r in ends if r.get("wall_s") is not None]
        run.wall_s = sum(walls) if walls else _log_span_s(run_dir / "train.log")
    else:
        run.status = _status_from_progress(config, records)
        if run.status != FINISHED:
            last = records[-1] if records else {}
            run.problem = (
                f"no end record, last logged step {last.get('step', '-')}, epoch {last.get('epoch', '-')}: "
                "still running, or killed"
            )
        run.wall_s = _log_span_s(run_dir / "train.log")
    if bad_lines:
        run.problem = f"{run.problem + '; ' if run.problem else ''}{bad_lines} unreadable line(s) in metrics.jsonl"
    return run


def load_runs(paths: Iterable[str | Path]) -> list[Run]:
    return [load_run(p) for p in find_run_dirs(list(paths))]


class Prediction(NamedTuple):
    label: int
    label_name: str
    correct: bool


def read_predictions(path: Path) -> dict[str, Prediction]:
    """predictions.csv -> {video key: Prediction}; the key is the path, else the id, else the index.

    Raises:
        ValueError: the file lacks a needed column or names a video twice.
    """
    if not path.is_file():
        raise ValueError(f"{path} is missing (needed for the paired test)")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        for column in ("index", "label", "pred"):
            if column not in (reader.fieldnames or []):
                raise ValueError(f"{path} has no '{column}' column")
        rows: dict[str, Prediction] = {}
        for row in reader:
            key = csv_value(row.get("path") or "") or csv_value(row.get("id") or "") or f"index {row['index']}"
            if key in rows:
                raise ValueError(f"{path} lists the video {key} twice")
            label = int(row["label"])
            rows[key] = Prediction(
                label, csv_value(row.get("label_name") or "") or str(label), int(row["pred"]) == label
            )
    return rows
