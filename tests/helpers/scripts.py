"""Run a command-line script of the repository (train.py, eval.py, scripts/*.py) in this process.

`run_script("eval.py", "ckpt=...", cwd=tmp_path)` does what `python eval.py ckpt=...` run in
`cwd` does, and returns a `subprocess.CompletedProcess` with its exit code, stdout and stderr.
A child interpreter spends ~7 s importing torch, torchvision and timm on 2 cores; the tests that
check what a command prints, the code it exits with and what it leaves on disk run the script's
`__main__` here instead (Hydra's command-line parsing, logging set-up and run folder included).
What needs a process boundary stays in subprocess tests: signals, kills, torchrun, and one launch
of each entry point in a fresh interpreter.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import runpy
import signal
import subprocess
import sys
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Handlers the scripts install (trainer: stop on a signal); restored so no test inherits them.
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


def torchrun(script: str | Path, *args: str) -> list[str]:
    """The command `torchrun --standalone --nproc_per_node=2 SCRIPT ARGS`, with this Python."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return [*launcher, str(REPO / script), *args]


def run_script(
    script: str | Path, *args: str, cwd: str | Path, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS` in `cwd`, with `env` set on top of this process's environment."""
    path = REPO / script
    out, err = io.StringIO(), io.StringIO()
    with _process_state_restored(path, args, cwd, env or {}):
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = _run_main(path)
    return subprocess.CompletedProcess([sys.executable, str(path), *args], code, out.getvalue(), err.getvalue())


def _run_main(path: Path) -> int:
    """The exit code of `path` run as `__main__`, as the interpreter would report it."""
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or 0
        print(stop.code, file=sys.stderr)
        return 1
    except Exception:  # noqa: BLE001 - any uncaught exception: a traceback and exit 1, as the interpreter does
        traceback.print_exc()
        return 1
    return 0


@contextlib.contextmanager
def _process_state_restored(
    path: Path, args: tuple[str, ...], cwd: str | Path, env: Mapping[str, str]
) -> Iterator[None]:
    """sys.argv, sys.path, cwd, environment, logging, signal handlers and torch's thread count as they were."""
    import torch  # noqa: PLC0415 - not at the top: conftest imports the helpers in xdist's controller
    from hydra.core.global_hydra import GlobalHydra  # noqa: PLC0415
    from hydra.core.hydra_config import HydraConfig  # noqa: PLC0415

    saved_argv, saved_path, saved_cwd, saved_env = sys.argv[:], sys.path[:], os.getcwd(), dict(os.environ)
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    saved_loggers = {
        name: (logger.disabled, logger.level, logger.handlers[:], logger.propagate)
        for name, logger in logging.root.manager.loggerDict.items()
        if isinstance(logger, logging.Logger)
    }
    saved_signals = {s: signal.getsignal(s) for s in _SIGNALS}
    saved_threads = torch.get_num_threads()
    sys.argv = [str(path), *args]
    sys.path.insert(0, str(path.parent))  # as `python path/to/script.py` does
    os.chdir(cwd)
    os.environ.update(env)
    if "OMP_NUM_THREADS" in env:  # read by torch when a process starts: here, set as it would be
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    try:
        yield
    finally:
        os.chdir(saved_cwd)
        sys.argv, sys.path[:] = saved_argv, saved_path
        os.environ.clear()
        os.environ.update(saved_env)
        for handler in root.handlers:
            if handler not in saved_handlers:
                handler.close()  # the run's log file
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        for name, (disabled, level, handlers, propagate) in saved_loggers.items():
            logger = logging.getLogger(name)
            logger.disabled, logger.level, logger.handlers[:], logger.propagate = disabled, level, handlers, propagate
        for number, handler in saved_signals.items():
            signal.signal(number, handler)
        torch.set_num_threads(saved_threads)
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None
