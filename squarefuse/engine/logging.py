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


class MetricsLogger:
    """Appends one JSON object per logged step/eval to RUN/metrics.jsonl and mirrors it to wandb."""

    def __init__(self, run_dir: Path, cfg: DictConfig, *, enabled: bool, resume: bool = False):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._wandb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
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
