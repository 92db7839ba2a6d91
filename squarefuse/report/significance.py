"""Paired significance on the same eval videos: the exact McNemar test.

Among the videos where exactly one of two models is right, b = the baseline is right only,
c = the other model is right only; p = the two-sided binomial test of min(b, c) out of b + c at
0.5 (`scipy.stats.binomtest`). Videos both models get right (or wrong) say nothing about which
is better, so they do not enter the test.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from scipy.stats import binomtest

from squarefuse.report.runs import Prediction


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value; 1.0 when no video separates the two models (b + c == 0)."""
    if b < 0 or c < 0:
        raise ValueError(f"b and c are counts, got b={b}, c={c}")
    if b + c == 0:
        return 1.0
    return float(binomtest(min(b, c), b + c, 0.5, alternative="two-sided").pvalue)


class PairingError(ValueError):
    """Two evaluations cannot be paired (e.g. they were made on different videos)."""


def discordant_counts(
    baseline: Mapping[str, Prediction], other: Mapping[str, Prediction], *, what: str = ""
) -> tuple[int, int]:
    """(b, c) over the videos of two evaluations of the same video set.

    Raises:
        PairingError: the two evaluations did not see the same videos, or disagree on a label.
    """
    if baseline.keys() != other.keys():
        only_base = sorted(baseline.keys() - other.keys())
        only_other = sorted(other.keys() - baseline.keys())
        examples = ", ".join((only_base + only_other)[:3])
        raise PairingError(
            f"{what}evaluated on different video sets ({len(baseline)} vs {len(other)} videos; "
            f"{len(only_base)} only in the baseline's, {len(only_other)} only in the other's, e.g. {examples}): "
            "evaluate both on the same split and dataset.root to pair them"
        )
    for key, pred in baseline.items():
        if pred.label != other[key].label:
            raise PairingError(
                f"{what}the video {key} has label {pred.label} in one evaluation, {other[key].label} in the other"
            )
    b = sum(1 for key, pred in baseline.items() if pred.correct and not other[key].correct)
    c = sum(1 for key, pred in baseline.items() if other[key].correct and not pred.correct)
    return b, c


@dataclass
class PairedTest:
    """McNemar over the seeds both groups evaluated (b and c summed over the seed pairs)."""

    b: int
    c: int
    p_value: float
    seeds: list[object]


def paired_test(pairs: Sequence[tuple[object, Mapping[str, Prediction], Mapping[str, Prediction]]]) -> PairedTest:
    """Pool (seed, baseline predictions, other predictions) pairs into one exact McNemar test.

    Raises:
        PairingError: no pairs, or a pair evaluated on different videos (the message names the seed).
    """
    if not pairs:
        raise PairingError("no seed has an evaluation in both groups")
    b = c = 0
    for seed, base, other in pairs:
        pb, pc = discordant_counts(base, other, what=f"seed {seed}: ")
        b, c = b + pb, c + pc
    return PairedTest(b=b, c=c, p_value=mcnemar_exact(b, c), seeds=[seed for seed, _, _ in pairs])
