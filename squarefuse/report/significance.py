"""Significance on the same eval videos: the exact McNemar test (report.py's groups) and, for the
temporal benchmark's matrix, seed-level comparisons with bootstrap intervals and Holm's correction.

Among the videos where exactly one of two models is right, b = the baseline is right only,
c = the other model is right only; p = the two-sided binomial test of min(b, c) out of b + c at
0.5 (`scipy.stats.binomtest`). Videos both models get right (or wrong) say nothing about which
is better, so they do not enter the test.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest, ttest_ind

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


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given: the smallest of m is multiplied by m,
    the next by m - 1, ..., kept monotone and at most 1 (Holm 1979; a few lines, no statsmodels)."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [1.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def correctness(evaluations: Sequence[Mapping[str, Prediction]], *, what: str = "") -> tuple[list[str], np.ndarray]:
    """The videos (sorted) and a [seeds, videos] 0/1 array of which each seed's model got right.

    Raises:
        PairingError: the seeds were evaluated on different videos or labels.
    """
    videos = sorted(evaluations[0])
    for n, other in enumerate(evaluations[1:], 1):
        discordant_counts(evaluations[0], other, what=f"{what}seed evaluation {n} and 0: ")
    return videos, np.array([[e[v].correct for v in videos] for e in evaluations], dtype=float)


@dataclass
class SeedComparison:
    """`other` against `reference` with the seeds as the unit, in top-1 points (other minus reference).

    `ci` is a 95 % percentile bootstrap that resamples the seeds of each side and, shared by both
    sides, the test videos; `p_value` is Welch's t-test on the per-seed top-1 (None below two seeds a
    side); `p_holm` its Holm-adjusted value within the family of comparisons it was made in.
    """

    difference: float
    ci: tuple[float, float]
    p_value: float | None
    seeds: tuple[int, int]
    p_holm: float | None = None

    def verdict(self, alpha: float, margin: float) -> str:
        """`better` / `worse` (the other side significantly, after Holm), `tie` (the CI of the difference
        inside +-`margin` points), else `inconclusive`: a large p alone never makes a tie."""
        if self.ci[0] > -margin and self.ci[1] < margin:
            return "tie"
        if self.p_holm is not None and self.p_holm < alpha:
            return "better" if self.difference > 0 else "worse"
        return "inconclusive"


def compare_over_seeds(
    reference: Sequence[Mapping[str, Prediction]],
    other: Sequence[Mapping[str, Prediction]],
    *,
    draws: int = 2000,
    seed: int = 0,
) -> SeedComparison:
    """Compare two groups of runs (one evaluation per seed each) on the same test videos.

    Raises:
        PairingError: the evaluations were made on different videos or labels.
    """
    videos, ref = correctness(reference, what="reference: ")
    _, oth = correctness(other, what="other: ")
    discordant_counts(reference[0], other[0], what="reference and other: ")
    ref_top1, oth_top1 = 100 * ref.mean(axis=1), 100 * oth.mean(axis=1)
    difference = float(oth_top1.mean() - ref_top1.mean())
    rng = np.random.default_rng(seed)
    boot = np.empty(draws)
    for i in range(draws):
        v = rng.integers(len(videos), size=len(videos))
        boot[i] = 100 * (
            oth[rng.integers(len(oth), size=len(oth))][:, v].mean()
            - ref[rng.integers(len(ref), size=len(ref))][:, v].mean()
        )
    low, high = np.percentile(boot, [2.5, 97.5])
    return SeedComparison(
        difference=difference,
        ci=(float(low), float(high)),
        p_value=_welch_p(oth_top1, ref_top1),
        seeds=(len(ref), len(oth)),
    )


def _welch_p(a: np.ndarray, b: np.ndarray) -> float | None:
    """Welch's two-sided t-test p of two seed samples; without spread on either side, 1 or 0."""
    if len(a) < 2 or len(b) < 2:
        return None
    if a.std() == 0 and b.std() == 0:  # the t statistic is undefined: equal means or a sure difference
        return 1.0 if a.mean() == b.mean() else 0.0
    return float(ttest_ind(a, b, equal_var=False).pvalue)
