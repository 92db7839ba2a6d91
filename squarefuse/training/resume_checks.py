"""What changed between a checkpoint's config and the config a run resumes it with.

A resumed run must train the model it started with, on the data it started with: a change to
the model, the data or the optimisation (`fusion.quantiles`, `dataset.num_frames`, `optim.lr`...)
is refused unless the user says so with `trainer.allow_config_change=true`. Keys that only say
where things are or how the job runs (paths, workers, logging, device, run length) may change
freely; they are reported in the log. A new run length (`trainer.epochs`, `trainer.max_steps`)
is not a free change for the lr schedule: the trainer rebuilds the schedule for it and says so.

The training list itself is compared too (`training_list`: the count and a digest of its
(video, label) pairs, stored in the checkpoint): a `train.txt` edited between the kill and the
resume, videos added, removed or relabelled, has the same config but other data.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

# Dotted keys (or key prefixes) that may differ on resume: where the files are, how fast and on
# what the job runs, how it logs and checkpoints, and how long it goes on. The class names the
# checkpoint stores are compared separately, so a moved copy of the data passes but other data
# with other classes does not.
HARMLESS_KEYS = (
    "logger",
    "recipe",  # the recipe's name; what it sets (backbone, optim, trainer...) is compared key by key
    "trainer.num_workers",
    "trainer.prefetch_factor",
    "trainer.cpu_threads",
    "trainer.device",
    "trainer.precision",
    "trainer.compile",
    "trainer.log_every",
    "trainer.ckpt_every",
    "trainer.val_every",
    "trainer.val_batch_size",
    "trainer.epochs",
    "trainer.max_steps",
    "trainer.nonfinite",
    "trainer.max_consecutive_skips",
    "trainer.resume",
    "trainer.allow_config_change",
    "trainer.init_from",  # start weights: the checkpoint's weights replace them on resume
    "backbone.pretrained",
    "backbone.pretrained_path",
    "backbone.grad_checkpointing",  # memory only, the same computation
    "dataset.root",
    "dataset.decoder",
    "dataset.fallback_decoder",
    "dataset.decode_timeout",
    "dataset.max_replacements",
    "dataset.max_missing_fraction",
    "dataset.test_clips",  # eval.py's views, unused in training
    "dataset.test_crops",
)
# Dataset keys ending like this name files or folders (interpolated from dataset.root).
HARMLESS_DATASET_SUFFIXES = ("_file", "_dir", "label_map")


@dataclass(frozen=True)
class Change:
    key: str
    old: Any  # MISSING when the checkpoint's config has no such key (older code)
    new: Any  # MISSING when the current config has no such key

    def __str__(self) -> str:
        return f"{self.key}: {self.old!r} (checkpoint) -> {self.new!r} (now)"


class _Missing:
    def __repr__(self) -> str:
        return "<absent>"


MISSING = _Missing()


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    if not tree and prefix:
        flat[prefix] = {}
    return flat


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[Change]:
    """Every dotted key whose value differs between two resolved config containers, sorted."""
    a, b = _flatten(old), _flatten(new)
    return [
        Change(key, a.get(key, MISSING), b.get(key, MISSING))
        for key in sorted(a.keys() | b.keys())
        if a.get(key, MISSING) != b.get(key, MISSING)
    ]


def is_harmless(change: Change) -> bool:
    """True for a change that does not alter what is trained (see HARMLESS_KEYS).

    A key only one side has comes from a code version that added or removed it, not from the
    user: its default keeps the old behaviour, so it is reported but not refused.
    """
    if change.old is MISSING or change.new is MISSING:
        return True
    key = change.key
    if any(key == k or key.startswith(k + ".") for k in HARMLESS_KEYS):
        return True
    return key.startswith("dataset.") and key.endswith(HARMLESS_DATASET_SUFFIXES)


def training_list(records: Iterable[Any]) -> dict[str, Any]:
    """The training videos as a checkpoint records them: their count and the sha256 of their
    (id, label) pairs in order. Ids, not paths: a copy of the data under another root is the same list."""
    digest, count = hashlib.sha256(), 0
    for record in records:
        digest.update(f"{record.id}\t{record.label}\n".encode())
        count += 1
    return {"videos": count, "sha256": digest.hexdigest()}
