"""Paired comparison of two classifiers on the same images: the non-inferiority gate.

Every promotion decision compares a model with a reference (the baseline, or the registry's
champion) on the *same* images, so the question is about a difference of paired proportions:
``delta = acc(model) - acc(reference)``. Only the discordant images carry information about it:
``gain`` (the model right, the reference wrong) and ``loss`` (the reverse).

The interval is Tango's score interval for the difference of paired proportions (T. Tango,
"Equivalence test and confidence interval for the difference in proportions for the
paired-sample design", Statistics in Medicine 17:891-908, 1998; Nam 1997 gives the same score
test). Unlike the Wald interval it stays sensible with few or no discordant pairs (identical
models still get a bound that reflects the sample size) and its coverage is close to nominal
at the sizes a validation split has. The normal quantiles and root finding come from scipy.

Only this module knows the statistics; stages call :func:`compare` and read the record.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import brentq
from scipy.stats import norm


@dataclass(frozen=True)
class Comparison:
    """A model against a reference on ``n`` shared images, in accuracy points (0-100)."""

    n: int
    gain: int  # images the model gets right and the reference wrong
    loss: int  # the reverse
    delta: float  # observed accuracy difference, model - reference
    lower: float  # one-sided lower confidence bound of the true difference
    upper: float  # one-sided upper confidence bound
    confidence: float
    margin: float  # the non-inferiority margin tested against (points, >= 0)
    p_value: float | None  # of H0: delta <= -margin (small: not worse by the margin); None: point rule
    passed: bool  # lower > -margin (equivalently p_value < 1 - confidence)

    def line(self, name: str, split: str = "gate") -> str:
        """``l1-75: -0.4 points (95% bound -1.3 > -2.0) on 540 gate images``."""
        sign = ">" if self.passed else "<="
        rule = f"{self.confidence:.0%} bound {self.lower:+.2f}" if self.confidence else "point rule"
        return (
            f"{name}: {self.delta:+.2f} points ({rule} {sign} {-self.margin:+.2f}) on {self.n} {split} images"
        )

    def as_dict(self) -> dict:
        return asdict(self)


def discordant(correct: np.ndarray, reference_correct: np.ndarray) -> tuple[int, int]:
    """``(gain, loss)`` from two boolean vectors of per-image correctness."""
    correct, reference_correct = np.asarray(correct, bool), np.asarray(reference_correct, bool)
    if correct.shape != reference_correct.shape:
        raise ValueError(f"paired outcomes differ in length: {correct.shape} vs {reference_correct.shape}")
    return int((correct & ~reference_correct).sum()), int((~correct & reference_correct).sum())


def score_statistic(gain: int, loss: int, n: int, delta0: float) -> float:
    """Tango's score statistic for H0: delta = ``delta0`` (a fraction in (-1, 1)).

    ``(gain - loss - n*delta0) / sqrt(n * (2*p + delta0*(1 - delta0)))``, where ``p`` is the
    maximum-likelihood probability of a ``loss`` pair under the constraint delta = delta0.
    """
    a = 2 * n
    b = -gain - loss + (2 * n - gain + loss) * delta0
    c = -loss * delta0 * (1 - delta0)
    p = (math.sqrt(max(b * b - 4 * a * c, 0.0)) - b) / (2 * a)
    variance = n * (2 * p + delta0 * (1 - delta0))
    diff = gain - loss - n * delta0
    if variance <= 0:
        return math.copysign(math.inf, diff) if diff else 0.0
    return diff / math.sqrt(variance)


def noninferiority_p(gain, loss, n, margin: float):
    """The p-value of H0: delta <= ``-margin`` points, from the score statistic of
    :func:`score_statistic`; numpy arrays of counts give an array (the simulation in
    tests/test_decide.py tests whole families at once with it)."""
    gain, loss, n = (np.asarray(v, float) for v in (gain, loss, n))
    d0 = -margin / 100
    b = -gain - loss + (2 * n - gain + loss) * d0
    p = (np.sqrt(np.maximum(b * b + 8 * n * loss * d0 * (1 - d0), 0.0)) - b) / (4 * n)
    variance, diff = n * (2 * p + d0 * (1 - d0)), gain - loss - n * d0
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(
            variance > 0, diff / np.sqrt(np.where(variance > 0, variance, 1.0)), np.sign(diff) * np.inf
        )
    return norm.sf(z)


def _bound(gain: int, loss: int, n: int, z: float) -> float:
    """The delta0 where the score statistic equals ``z`` (it falls as delta0 grows)."""
    eps = 1e-12
    f = lambda d: score_statistic(gain, loss, n, d) - z  # noqa: E731
    lo, hi = -1 + eps, 1 - eps
    if f(lo) < 0:
        return -1.0
    if f(hi) > 0:
        return 1.0
    return brentq(f, lo, hi, xtol=1e-10)


def compare(
    correct: np.ndarray, reference_correct: np.ndarray, margin: float, confidence: float | None
) -> Comparison:
    """Non-inferiority of a model to a reference by ``margin`` accuracy points, from per-image
    correctness on the same images. ``confidence=None`` turns the gate off: the point rule
    (observed difference >= -margin) decides, and the bounds equal the observed difference."""
    gain, loss = discordant(correct, reference_correct)
    return compare_counts(gain, loss, len(correct), margin, confidence)


def compare_counts(gain: int, loss: int, n: int, margin: float, confidence: float | None) -> Comparison:
    """:func:`compare` from the discordant counts alone (``gain``, ``loss`` of ``n`` images)."""
    gain, loss, n = int(gain), int(loss), int(n)
    if n == 0:
        raise ValueError("cannot compare two models on zero images")
    delta = (gain - loss) / n
    if confidence is None:
        return Comparison(
            n,
            gain,
            loss,
            _pts(delta),
            _pts(delta),
            _pts(delta),
            0.0,
            margin,
            None,
            delta * 100 >= -margin - 1e-9,
        )
    z = float(norm.ppf(confidence))
    lower, upper = _bound(gain, loss, n, z), _bound(gain, loss, n, -z)
    p_value = float(noninferiority_p(gain, loss, n, margin)) if margin < 100 else 0.0
    return Comparison(
        n,
        gain,
        loss,
        _pts(delta),
        _pts(lower),
        _pts(upper),
        confidence,
        margin,
        p_value,
        lower * 100 > -margin,
    )


def _pts(fraction: float) -> float:
    return round(fraction * 100, 4)


def min_certifiable_margin(n: int, confidence: float, disagreement: float) -> float:
    """The smallest margin (points) that ``n`` gate images certify, at ``confidence``, for a model
    exactly as accurate as its reference that disagrees with it on ``disagreement`` of the images
    (half of those in each direction): the lower bound such a model gets, negated."""
    half = round(disagreement * n / 2)
    return -_pts(_bound(half, half, n, float(norm.ppf(confidence))))


def margin_points(reference_acc: float, tolerance: float, mode: str) -> float:
    """The tolerance as accuracy points: as given (``absolute``) or a percentage of the
    reference's accuracy (``relative``)."""
    return reference_acc * tolerance / 100 if mode == "relative" else tolerance
