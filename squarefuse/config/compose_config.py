"""Compose one of the repository's app configs (`configs/<name>.yaml`) from inside another app.

`scripts/cache_tokens.py train_config=[...]` needs the config `python train.py ...` would run with. Inside
a Hydra app the global Hydra is initialised with the same `configs/` folder; from a plain call
(a test, a notebook) it is initialised here for the duration of the call.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

__all__ = ["CONFIG_DIR", "compose_app_config", "override", "shell_override"]

# Values Hydra's override grammar and the shell both read as they are.
_PLAIN_VALUE = re.compile(r"[\w./~:+@%-]+")

# The configs/ folder next to the package: apps run from a checkout (or an editable install) of the repository.
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def compose_app_config(config_name: str, overrides: Sequence[str]) -> DictConfig:
    """`configs/<config_name>.yaml` with command-line style overrides (`group=option`, `key=value`).

    Raises:
        ValueError: an override names no key or option (Hydra's message, which names it).
    """
    from hydra.errors import ConfigCompositionException, OverrideParseException  # noqa: PLC0415

    overrides = [str(o) for o in overrides]
    try:
        if GlobalHydra.instance().is_initialized():
            return compose(config_name=config_name, overrides=overrides)
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return compose(config_name=config_name, overrides=overrides)
    except (ConfigCompositionException, OverrideParseException) as e:
        raise ValueError(f"{config_name} config with overrides {overrides}: {e}") from e


def override(key: str, value: str | Path) -> str:
    """`key=value` that Hydra reads back as `value`, quoted when `value` holds characters of its
    grammar: a user's folder may have '=', ',', quotes or spaces in its name (`runs/lr=0.01,bs=8`)."""
    text = str(value)
    if _PLAIN_VALUE.fullmatch(text):
        return f"{key}={text}"
    # In a quoted value Hydra reads a backslash as an escape only before a quote or at the end.
    text = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", text)
    text = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, text)
    return f"{key}='{text}'"


def _ansi_c_quoted(word: str) -> str:
    """`word` as bash's `$'...'`, in which a newline or another character that does not print is an
    escape (`\\n`, `\\x1b`, `\\u2028`): the command stays on one line and still names the path."""
    named = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "\\": "\\\\", "'": "\\'"}
    parts = []
    for c in word:
        if c in named:
            parts.append(named[c])
        elif c.isprintable():
            parts.append(c)
        elif ord(c) < 0x80:
            parts.append(f"\\x{ord(c):02x}")
        else:  # a code point, not a byte: bash writes it in UTF-8
            parts.append(f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}")
    return "$'" + "".join(parts) + "'"


def shell_override(key: str, value: str | Path) -> str:
    """`override(key, value)` as one shell word, for the commands a log line suggests (bash's `$'...'`
    when the value holds a newline or another character that does not print)."""
    word = override(key, value)
    if not word.isprintable():
        return _ansi_c_quoted(word)
    if word == f"{key}={value}" or re.search(r"[\"$`\\!]", word):
        return shlex.quote(word)
    return f'"{word}"'  # easier to read than shlex's '"'"' for the single quotes inside
