"""Group runs by the config keys that differ between them, and find the baseline group.

Seeds, paths and logging keys never split groups: the runs of one group are the same experiment
repeated with other seeds. A config group chosen on the command line (`fusion=none`) is named by
its Hydra choice, read from the run's `.hydra/hydra.yaml`; without it, by its `_target_`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from squarefuse.config.compose_config import CONFIG_DIR
from squarefuse.report.runs import Run

DEFAULT_TASK = "direction"  # the synthetic dataset's task when a run's config names none

# Keys that say where things are or how a run logs, not what it trains.
IGNORED_KEYS = {"trainer.seed", "trainer.log_every", "trainer.ckpt_every", "trainer.resume", "trainer.num_workers"}
IGNORED_PREFIXES = ("logger", "hydra")  # the logger group and its keys; Hydra's own choices (hydra/launcher...)
_PATH_KEY = re.compile(r"(^|_)(root|path|dir|file|label_map)$")
_ABSENT = "<absent>"


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay whole (one value)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def is_ignored(key: str) -> bool:
    return key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES) or bool(_PATH_KEY.search(key.rsplit(".", 1)[-1]))


def _value_text(value: Any) -> str:
    return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else str(value)


def group_choice(run: Run, group: str) -> str | None:
    """The run's Hydra choice for a config group, else the short name of the group's `_target_`."""
    if group in run.choices:
        return run.choices[group]
    target = flatten(run.config).get(f"{group}._target_")
    return str(target).rsplit(".", 1)[-1] if target is not None else None


def fusion_option(run: Run) -> str:
    """The run's option in the temporal benchmark: the fusion's choice (`group_choice`), `pixels+<fusion>`
    for a run on the pixel backbone (`PixelFrames`, the pixel control), a model of another input: on the
    videos, or on a cache that backbone made, whose runs carry its name (`pixels`, no timm model's)."""
    fusion = str(group_choice(run, "fusion"))
    flat = flatten(run.config)
    pixels = str(flat.get("backbone._target_", "")).endswith(".PixelFrames") or flat.get("backbone.name") == "pixels"
    return f"pixels+{fusion}" if pixels else fusion


def benchmark_task(run: Run) -> str:
    """The run's synthetic task (`dataset.task`; a run without the key is the default ``direction``)."""
    return str(flatten(run.config).get("dataset.task", DEFAULT_TASK))


def benchmark_option(run: Run, heads: set[str]) -> str:
    """The temporal benchmark's column of a run: `fusion_option`, with the head's choice
    (`square/attentive`) when the runs compared use more than one of `heads`."""
    fusion = fusion_option(run)
    return f"{fusion}/{group_choice(run, 'head')}" if len(heads) > 1 else fusion


@dataclass
class Group:
    """Runs that differ only by seed (and paths)."""

    label: str
    settings: dict[str, str]  # the varying keys and this group's value of each
    runs: list[Run] = field(default_factory=list)


def _varying(runs: Sequence[Run]) -> tuple[list[str], list[str]]:
    """(config groups whose choice differs between runs, config keys that differ between runs)."""
    flats = [flatten(r.config) for r in runs]
    groups = sorted(
        {key.rsplit(".", 1)[0] for f in flats for key in f if key.endswith("._target_")}
        | {g for r in runs for g in r.choices}
    )
    varying_groups = [g for g in groups if len({group_choice(r, g) for r in runs}) > 1 and not is_ignored(g)]
    keys = sorted({key for f in flats for key in f})
    varying_keys = []
    for key in keys:
        if is_ignored(key):
            continue
        group = next((g for g in varying_groups if key.startswith(f"{g}.")), None)
        if group is None:
            if len({_value_text(f.get(key, _ABSENT)) for f in flats}) > 1:
                varying_keys.append(key)
            continue
        # Under a group whose choice differs: the key counts only if it differs between runs
        # of the same choice (fusion.K=4,8 for fusion=square), not because `none` lacks it.
        by_choice: dict[str | None, set[str]] = {}
        for run, f in zip(runs, flats, strict=True):
            by_choice.setdefault(group_choice(run, group), set()).add(_value_text(f.get(key, _ABSENT)))
        if any(len(values) > 1 for values in by_choice.values()):
            varying_keys.append(key)
    return varying_groups, varying_keys


def group_runs(runs: Sequence[Run]) -> list[Group]:
    """Groups in the order their first run was found; a run's label lists its varying settings."""
    varying_groups, varying_keys = _varying(runs)
    groups: dict[tuple[tuple[str, str], ...], Group] = {}
    for run in runs:
        flat = flatten(run.config)
        settings = {g: str(group_choice(run, g)) for g in varying_groups}
        settings.update({k: _value_text(flat[k]) for k in varying_keys if k in flat})
        key = tuple(settings.items())
        if key not in groups:
            label = " ".join(f"{k}={v}" for k, v in settings.items()) or "all runs"
            groups[key] = Group(label=label, settings=settings)
        groups[key].runs.append(run)
    return list(groups.values())


def parse_terms(terms: Sequence[str]) -> list[tuple[str, str]]:
    """["fusion=none", "head=cls"] -> [("fusion", "none"), ("head", "cls")].

    Raises:
        ValueError: a term is not KEY=VALUE.
    """
    parsed = []
    for term in terms:
        key, sep, value = term.partition("=")
        if not sep or not key:
            raise ValueError(f"--baseline expects KEY=VALUE terms (e.g. fusion=none), got {term!r}")
        parsed.append((key.strip(), value.strip()))
    return parsed


def _group_config_matches(run: Run, group: str, name: str) -> bool:
    # Without Hydra's record of the choice: the option's config file in configs/<group>/ must
    # agree with the run's stored values on its `_target_` and every key it sets.
    option = CONFIG_DIR / group / f"{name}.yaml"
    if not option.is_file():
        return False
    stored = flatten(run.config.get(group) or {})
    for key, value in flatten(yaml.safe_load(option.read_text()) or {}).items():
        if key != "defaults" and _value_text(stored.get(key, _ABSENT)) != _value_text(value):
            return False
    return True


def run_matches(run: Run, key: str, value: str) -> bool:
    """Whether a run has `key=value`: a config group choice (`fusion=none`, by its Hydra choice,
    its `_target_` or the option's config file) or a plain key (`fusion.K=8`)."""
    if key in run.choices:
        return run.choices[key] == value
    node = run.config.get(key)
    if isinstance(node, dict) and "_target_" in node:
        target = str(node["_target_"])
        short = target.rsplit(".", 1)[-1]
        return value in (target, short) or _group_config_matches(run, key, value)
    flat = flatten(run.config)
    if key not in flat:
        return False
    try:
        wanted = yaml.safe_load(value)
    except yaml.YAMLError:
        wanted = value
    return _value_text(flat[key]) == _value_text(wanted)


def find_baseline(groups: Sequence[Group], terms: Sequence[tuple[str, str]]) -> list[Group]:
    """The groups all of whose runs match every `key=value` term."""
    return [g for g in groups if g.runs and all(run_matches(r, k, v) for r in g.runs for k, v in terms)]


def baseline_for(group: Group, baselines: Sequence[Group], terms: Sequence[tuple[str, str]]) -> Group | None:
    """The baseline group to compare `group` with: the only one, or the one that agrees with
    `group` on every varying setting outside the baseline's own keys (e.g. the same head)."""
    if group in baselines:
        return None
    if len(baselines) == 1:
        return baselines[0]
    own = {k for k, _ in terms}

    def outside(settings: dict[str, str]) -> dict[str, str]:
        return {k: v for k, v in settings.items() if k.split(".", 1)[0] not in own and k not in own}

    matching = [b for b in baselines if outside(b.settings) == outside(group.settings)]
    return matching[0] if len(matching) == 1 else None
