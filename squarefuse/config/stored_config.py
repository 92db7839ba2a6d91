"""A config read from a file (a checkpoint's stored config) as an OmegaConf object, with no interpolation in it.

The trainer stores its config resolved (`OmegaConf.to_container(resolve=True)`): a stored value is
the final value and holds no ``${...}``. Turned back into a `DictConfig`, a ``${...}`` would be
resolved on access: ``${oc.env:WANDB_API_KEY}`` in a checkpoint someone sent would put the
reader's key into a path, and from there into an error message. Escaping it (``\\${``) is not
enough: `hydra.utils.instantiate`, which builds the model from the stored config, resolves a config
and then its arguments again, so an escaped interpolation runs the second time. A stored config
with an interpolation is therefore refused, naming the key, before OmegaConf sees it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

__all__ = ["check_no_interpolation", "literal_config"]


def _strings(value: Any, key: str) -> Iterator[tuple[str, str]]:
    """(key, string) of every string in a nest of dicts and lists, keys included."""
    if isinstance(value, str):
        yield key, value
    elif isinstance(value, Mapping):
        for name, item in value.items():
            yield from _strings(str(name), f"{key}.{name}" if key else str(name))
            yield from _strings(item, f"{key}.{name}" if key else str(name))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _strings(item, f"{key}[{i}]")


def check_no_interpolation(stored: Mapping[str, Any], *, prefix: str = "") -> None:
    """Raise when a string of `stored` is one OmegaConf would resolve (it holds ``${``).

    The value is not shown: the key says where it is, and the file is the user's to read.

    Raises:
        ValueError: naming the key (`prefix` first, e.g. "dataset").
    """
    for key, text in _strings(stored, prefix):
        if "${" in text:
            raise ValueError(
                f"the checkpoint's config has an interpolation ('${{...}}') in {key}: a checkpoint stores its "
                "config resolved, so this one was changed after training; refusing to resolve it (it could read "
                "environment variables). Use a checkpoint written by the squarefuse trainer."
            )


def literal_config(stored: Mapping[str, Any], *, prefix: str = "") -> DictConfig:
    """A `DictConfig` of the plain container `stored`, refused when a string in it is an interpolation.

    Args:
        stored: the container read from the file.
        prefix: its key in the whole config ("dataset"), for the message.
    """
    if isinstance(stored, DictConfig):
        raise TypeError("literal_config takes the plain container read from a file, not a DictConfig")
    check_no_interpolation(stored, prefix=prefix)
    return OmegaConf.create(dict(stored))
