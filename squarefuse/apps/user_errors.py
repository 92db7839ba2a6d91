"""`user_errors(run_dir)`: how every entry point reports a mistake the user can fix.

A bad value (`fusion.K=0`, `frame_order=backwards`), a missing file or a missing optional package
is printed as one line, `error: <reason>`, on stderr, and the process exits with code 2; the
traceback goes to the run's log file. `hydra_errors()` does the same for the mistakes Hydra finds
itself before the app runs (a mistyped key or option, an override it cannot parse), which Hydra
reports with exit code 1, the code of a crash. A run that never started leaves no folder behind: Hydra made
the run folder (its `.hydra/`, the log file, the launch's owner file) before the app ran, and when
that is all the folder holds, rank 0 removes it, log file included. A folder that holds anything
else (a resumed run's checkpoints, an eval's results) is never removed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from hydra.errors import CompactHydraException

from squarefuse.config.command_line import exit_on_unreadable_overrides
from squarefuse.config.resolvers import OWNER_FILE
from squarefuse.runtime.launch_env import env_dist_info
from squarefuse.runtime.memory_limit import explain_memory_limit

USER_ERRORS = (ValueError, FileNotFoundError, ImportError)
EXIT_CODE = 2
# What Hydra (and `launch_dir`) put into a run folder before the app runs.
_HYDRA_ONLY = re.compile(rf"^(\.hydra|{re.escape(OWNER_FILE)}|[^/]+\.log)$")
# `launch_dir`'s date folder (runs/<date>/<time>), removed with its last run.
_DATE_FOLDER = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def _log_files_in(folder: Path) -> list[logging.FileHandler]:
    return [
        h
        for h in logging.getLogger().handlers
        if isinstance(h, logging.FileHandler) and folder in Path(h.baseFilename).resolve().parents
    ]


def holds_only_hydra_files(folder: Path) -> bool:
    """Whether `folder` holds nothing but what Hydra makes at start-up (`.hydra/`, `*.log`, `.launch`)."""
    return folder.is_dir() and all(_HYDRA_ONLY.match(entry.name) for entry in folder.iterdir())


def remove_unstarted_run_dir(folder: str | Path) -> bool:
    """Remove `folder` (and an emptied date folder above it) if it holds only Hydra's start-up files."""
    folder = Path(folder).resolve()
    if not holds_only_hydra_files(folder):
        return False
    for handler in _log_files_in(folder):
        logging.getLogger().removeHandler(handler)
        handler.close()
    shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):  # not empty: other runs of that day
        if _DATE_FOLDER.match(folder.parent.name):
            folder.parent.rmdir()
    return not folder.exists()


@contextlib.contextmanager
def user_errors(run_dir: str | Path, also: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Report `USER_ERRORS` (and `also`) raised in the block as one line and exit 2 (see the module's docstring)."""
    try:
        yield
    except USER_ERRORS + also as e:
        if env_dist_info().is_main and not remove_unstarted_run_dir(run_dir):
            for handler in _log_files_in(Path(run_dir).resolve()):
                handler.handle(
                    logging.LogRecord("squarefuse", logging.ERROR, __file__, 0, "error", None, sys.exc_info())
                )
        print(f"error: {explain_memory_limit(str(e))}", file=sys.stderr)
        sys.exit(EXIT_CODE)


@contextlib.contextmanager
def hydra_errors() -> Iterator[None]:
    """Around a `@hydra.main` function: the command-line mistakes Hydra finds while composing the
    config print as `error: <Hydra's message>` and exit 2, as the app's own do. First, an override
    whose value Hydra's grammar cannot read (a path with '=' or ',') exits 2 saying how to quote it
    (`config.command_line`), in place of Hydra's "mismatched input".

    Hydra prints them itself and exits 1 unless HYDRA_FULL_ERROR is set; with it set, the exception
    comes out of the call, and is reported here. Other exceptions pass on as they are (with the
    full traceback, which HYDRA_FULL_ERROR asks for). A HYDRA_FULL_ERROR the user set is left alone.
    """
    exit_on_unreadable_overrides(sys.argv[1:])
    if os.environ.get("HYDRA_FULL_ERROR"):
        yield
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    except CompactHydraException as e:
        cause = f"\n{e.__cause__}" if e.__cause__ is not None and str(e.__cause__) not in str(e) else ""
        print(f"error: {e}{cause}", file=sys.stderr)
        sys.exit(EXIT_CODE)
    finally:
        os.environ.pop("HYDRA_FULL_ERROR", None)
