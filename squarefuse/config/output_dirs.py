"""Where the apps that read a checkpoint write: `<run>/<app>/<stamp>` next to the checkpoint's run.

`eval.py` writes to `<run>/eval/<stamp>`, `scripts/predict.py`, `extract.py` and `export.py` to
`<run>/predict/...`, `<run>/extract/...`, `<run>/export/...` (their configs' `hydra.run.dir`,
through `squarefuse.apps.checkpoint_dir`).
"""

from __future__ import annotations

from pathlib import Path

from squarefuse.config.resolvers import launch_dir


def default_eval_dir(ckpt: str, subdir: str = "eval") -> str:
    """Where `eval.py` writes by default: `<run>/eval/<stamp>` next to the checkpoint's run
    (`<run>/<subdir>/<stamp>` for the other apps that read a checkpoint: predict, extract, export).

    `<run>` is the folder above `checkpoints/` (the trainer's layout), else the checkpoint's own
    folder; `<stamp>` the launch time (`2026-12-02_09-31-05`), the same on every rank of a torchrun
    job, with `_2`, `_3`... for jobs started in the same second (`resolvers.launch_dir`: the
    folder is created here, owned by this launch).

    Raises:
        FileNotFoundError: the checkpoint does not exist (checked here, before any folder is
            created, so a typo leaves no stray folders).
    """
    path = Path(ckpt)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: ckpt={ckpt}")
    run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return launch_dir(str(run / subdir), sep="_")
