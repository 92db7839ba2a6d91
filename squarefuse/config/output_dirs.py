"""Where the apps that read a checkpoint write: `<run>/<app>/<stamp>` next to the checkpoint's run.

`eval.py` writes to `<run>/eval/<stamp>`, `scripts/predict.py`, `extract.py` and `export.py` to
`<run>/predict/...`, `<run>/extract/...`, `<run>/export/...` (their configs' `hydra.run.dir`,
through `squarefuse.apps.checkpoint_dir`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from squarefuse.config.resolvers import launch_dir

_UNSAFE = re.compile(r"[^A-Za-z0-9.-]+")
_MAX_PART = 24


def _part(value: Any) -> str:
    """`value` as a short, file-system-safe piece of a folder name."""
    return _UNSAFE.sub("-", str(value)).strip("-")[:_MAX_PART] or "x"


def eval_suffix(
    split: str,
    frame_order: str,
    frame_order_seed: Any,
    use_ema: bool,
    test_clips: Any,
    test_crops: Any,
    num_frames: Any,
) -> str:
    """The non-default choices of an evaluation, for its folder's name: `_test_reversed_5x3`...

    Empty for `python eval.py ckpt=...` as is (split val, frames in order, EMA, the stored views), so
    evaluations of one checkpoint that differ in what they measured never look alike. Views and
    frames appear only when given on the command line (null keeps the checkpoint's own).
    """
    parts = []
    if split != "val":
        parts.append(_part(split))
    if frame_order != "normal":
        seeded = frame_order == "shuffled" and frame_order_seed not in (None, 0)
        parts.append(_part(frame_order) + (f"-seed{_part(frame_order_seed)}" if seeded else ""))
    if test_clips is not None and test_crops is not None:
        parts.append(f"{_part(test_clips)}x{_part(test_crops)}")
    elif test_clips is not None:
        parts.append(f"{_part(test_clips)}clips")
    elif test_crops is not None:
        parts.append(f"{_part(test_crops)}crops")
    if num_frames is not None:
        parts.append(f"{_part(num_frames)}f")
    if not use_ema:
        parts.append("noema")
    return "".join(f"_{p}" for p in parts)


def default_eval_dir(ckpt: str, subdir: str = "eval", suffix: str = "") -> str:
    """Where `eval.py` writes by default: `<run>/eval/<stamp>` next to the checkpoint's run
    (`<run>/<subdir>/<stamp>` for the other apps that read a checkpoint: predict, extract, export).

    `<run>` is the folder above `checkpoints/` (the trainer's layout), else the checkpoint's own
    folder; `<stamp>` the launch time (`2026-12-02_09-31-05`) then `suffix` (`eval_suffix`), the
    same on every rank of a torchrun job, with `_2`, `_3`... for jobs started in the same second
    (`resolvers.launch_dir`: the folder is created here, owned by this launch).

    Raises:
        FileNotFoundError: the checkpoint does not exist (checked here, before any folder is
            created, so a typo leaves no stray folders).
    """
    path = Path(ckpt)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: ckpt={ckpt}")
    run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return launch_dir(str(run / subdir), sep="_", suffix=suffix)
