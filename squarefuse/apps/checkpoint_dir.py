"""`${checkpoint_dir:CKPT,SUBDIR}`: the output folder of the apps that read a checkpoint.

eval.py, scripts/predict.py, extract.py and export.py register it before `@hydra.main` composes
their config; their `hydra.run.dir` is `${checkpoint_dir:${ckpt},eval}` (or predict, extract,
export): `<run>/SUBDIR/<stamp>` next to the checkpoint's run (`config.output_dirs.default_eval_dir`).

Here, not in `squarefuse.config`, because it checks the checkpoint file (`squarefuse.checkpoint`),
which the config package does not import.
"""

from __future__ import annotations

import sys

from omegaconf import OmegaConf

from squarefuse.apps.user_errors import EXIT_CODE
from squarefuse.checkpoint import check_checkpoint_file
from squarefuse.config.output_dirs import default_eval_dir, eval_suffix


def register_checkpoint_dir_resolver(usage: str) -> None:
    """Register `${checkpoint_dir:CKPT,SUBDIR}` for an app's `hydra.run.dir`: `<run>/SUBDIR/<stamp>`
    next to the checkpoint's run (`output_dirs.default_eval_dir`).

    Hydra resolves it before the app runs, where an exception would come wrapped in a page of
    interpolation traceback: a missing or absent `ckpt` exits with the message (and `usage`).
    """

    def fail(message: str) -> None:
        print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_CODE)  # the code of every user mistake (apps.user_errors), not sys.exit(message)'s 1

    def resolve(ckpt: str | None, subdir: str, suffix: str = "") -> str:
        if ckpt is None:
            fail(f"ckpt is required: {usage}")
        try:
            check_checkpoint_file(ckpt)  # before Hydra makes a folder next to a file that is no checkpoint
            return default_eval_dir(str(ckpt), str(subdir), str(suffix))
        except (FileNotFoundError, ValueError) as e:
            fail(str(e))

    # Cached: the stamp is read once, so every use of hydra.run.dir names the same folder.
    OmegaConf.register_new_resolver("checkpoint_dir", resolve, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("eval_suffix", eval_suffix, replace=True)
