"""Run records on rank 0: metrics.jsonl, the resolved config, the git commit, and wandb.

Every other rank gets a logger whose methods do nothing, so call sites need no rank checks.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from squarefuse.runtime.atomic_file import atomic_write

log = logging.getLogger("squarefuse")


def git_commit(repo_dir: Path | None = None) -> str | None:
    """The commit of the code that runs (with a `-dirty` suffix for uncommitted changes), if known."""
    repo_dir = repo_dir or Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo_dir, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo_dir,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha + ("-dirty" if dirty else "")


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def truncate_metrics(path: Path, *, step: int, val_step: int) -> int:
    """Keep the records of `path` that a checkpoint at `step` covers; return how many were dropped.

    A run killed after its last checkpoint logged steps it will log again once resumed: train
    records past `step` and validation records past `val_step` (the checkpoint's last validation)
    go, and so does a line cut short by the kill; the `end` record of each session stays. The file
    is replaced atomically, so a kill during the rewrite leaves the old file.
    """
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
            split = record.get("split", "train")
            # `end` records close a session (how it ended), not a step: they are history, kept.
            limit = step if split == "train" else math.inf if split == "end" else val_step
            keep = int(record["step"]) <= limit and line.endswith("\n")
        except (json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):  # not a whole record
            keep = False
        if keep:
            kept.append(line)
    dropped = len(lines) - len(kept)
    if dropped:
        with atomic_write(path) as f:
            f.writelines(kept)
        log.info("%s: dropped %d records past the resumed checkpoint (step %d)", path, dropped, step)
    return dropped


def _write_config(path: Path, text: str, resume_step: int | None) -> None:
    """Write the resolved config; on resume, keep a differing earlier one as config.until_step_N.yaml."""
    if path.is_file() and resume_step is not None and path.read_text() != text:
        kept = path.with_name(f"config.until_step_{resume_step}.yaml")
        path.replace(kept)
        log.warning("the config changed on resume: %s now holds the new one, the previous one is in %s", path, kept)
    path.write_text(text)


class MetricsLogger:
    """Appends one JSON object per logged step/eval to RUN/metrics.jsonl and mirrors it to wandb."""

    def __init__(
        self,
        run_dir: Path,
        cfg: DictConfig,
        *,
        enabled: bool,
        resume: bool = False,
        resume_step: int | None = None,
        resume_val_step: int | None = None,
    ):
        """With `resume_step` (the resumed checkpoint's step and last validation step), records
        the checkpoint does not cover are dropped first (see `truncate_metrics`)."""
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._wandb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            truncate_metrics(
                self.run_dir / "metrics.jsonl",
                step=resume_step,
                val_step=resume_step if resume_val_step is None else resume_val_step,
            )
        _write_config(self.run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True), resume_step)
        (self.run_dir / "run_info.json").write_text(
            json.dumps({"git_commit": git_commit(), "argv": sys.argv, "resumed": resume}, indent=2)
        )
        self._file = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        if cfg.logger.name == "wandb":
            self._wandb = _start_wandb(cfg, self.run_dir)
        elif cfg.logger.name != "none":
            raise ValueError(f"logger must be none or wandb, got {cfg.logger.name!r}")

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {k: _plain(v) for k, v in record.items()}
        self._file.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            split = record.get("split", "train")
            self._wandb.log(
                {
                    f"{split}/{k}": v
                    for k, v in record.items()
                    if k not in ("step", "split") and isinstance(v, (int, float))
                },
                step=record.get("step"),
            )

    def summary(self, values: dict[str, Any]) -> None:
        if self._wandb is not None:
            self._wandb.summary.update({k: _plain(v) for k, v in values.items()})

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _start_wandb(cfg: DictConfig, run_dir: Path):
    import wandb  # noqa: PLC0415 - slow import, only with logger=wandb

    lcfg = cfg.logger
    if lcfg.mode not in ("online", "offline", "disabled"):
        raise ValueError(f"logger.mode must be online, offline or disabled, got {lcfg.mode!r}")
    # The run id is fixed by the folder, so a resumed job continues the same wandb run.
    run_id_file = run_dir / "wandb_run_id.txt"
    if run_id_file.exists():
        run_id = run_id_file.read_text().strip()
    else:
        run_id = secrets.token_hex(6)  # wandb run ids: lowercase letters and digits
        run_id_file.write_text(run_id)
    return wandb.init(
        project=lcfg.project,
        entity=lcfg.entity,
        group=lcfg.group,
        tags=list(lcfg.tags),
        name=lcfg.run_name or run_dir.name,
        mode=lcfg.mode,
        dir=str(run_dir),
        id=run_id,
        resume="allow",
        config=OmegaConf.to_container(cfg, resolve=True),
    )
