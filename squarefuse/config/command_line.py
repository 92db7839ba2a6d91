"""Command-line overrides Hydra's grammar cannot read: say how to quote them, before Hydra does.

A path whose folder names hold '=', ',', quotes, brackets or spaces (a sweep folder of an older
version, `0_fusion=none,trainer.seed=0`, or a user's own folder) ends Hydra's parse of
`ckpt=<path>` with `mismatched input '=' expecting <EOF>`. The entry points call
`exit_on_unreadable_overrides(sys.argv[1:])` first: such an override exits with code 2 and the
same override quoted as the shell and Hydra read it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException

from squarefuse.config.compose_config import shell_override

# What Hydra reads as grammar inside an unquoted value: it ends or splits the value.
_GRAMMAR_CHARS = "=,'\"[]{}() \t"
EXIT_CODE = 2  # as squarefuse.apps.user_errors: a mistake the user can fix
# Keys that moved to another config group: Hydra would only say that the old key is not in the config.
MOVED_KEYS = {
    "optim.warmup_epochs": "schedule.warmup_epochs",
    "optim.warmup_lr": "schedule.warmup_lr",
    "optim.min_lr": "schedule.min_lr",
}


def moved_key_message(arg: str) -> str | None:
    """The error for an override of a key that moved (`MOVED_KEYS`), naming the new key; else None."""
    key = arg.split("=", 1)[0].lstrip("+~")
    if key not in MOVED_KEYS:
        return None
    return f"{key} is now {MOVED_KEYS[key]} (the lr schedule is its own group, schedule=cosine|step|constant)"


def unreadable_override_message(arg: str) -> str | None:
    """The error for `key=value` if Hydra cannot parse it because its value holds grammar
    characters, else None (Hydra's own message serves the other mistakes)."""
    if arg.startswith("-") or "=" not in arg:
        return None
    try:
        OverridesParser.create().parse_overrides([arg])
        return None
    except HydraException:
        pass
    key, value = arg.split("=", 1)
    found = sorted({c for c in value if c in _GRAMMAR_CHARS})
    if not found or not key.lstrip("+~").replace(".", "").replace("/", "").replace("_", "").isalnum():
        return None
    shown = " ".join(repr(c) for c in found)
    return (
        f"the value of {key.lstrip('+~')!r} holds characters of Hydra's override grammar ({shown}): "
        f"quote it, e.g. {shell_override(key, value)}"
    )


def exit_on_unreadable_overrides(argv: Sequence[str]) -> None:
    """Exit with code 2 and `unreadable_override_message` for the first override Hydra cannot read
    (or `moved_key_message` for one that names a moved key)."""
    for arg in argv:
        message = moved_key_message(arg) or unreadable_override_message(arg)
        if message:
            print(f"error: {message}", file=sys.stderr)
            sys.exit(EXIT_CODE)
