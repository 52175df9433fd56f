"""The selection rules every stage shares: what "within tolerance of the baseline" means.

A model passes when it is *non-inferior* to its reference on paired images: the one-sided lower
confidence bound of ``acc(model) - acc(reference)`` lies above ``-tolerance``
(:func:`shrinkflow.tasks.decision.stats.compare`). The ratio search applies it on the validation
split, promotion on the gate split, the test veto and the champion rule on the test split; only
the data differs.
"""

from __future__ import annotations

import logging

import numpy as np

from shrinkflow.tasks.config import PromoteConfig
from shrinkflow.tasks.decision.stats import Comparison, compare, margin_points, min_certifiable_margin

log = logging.getLogger(__name__)


def versus_baseline(
    predictions: np.ndarray, baseline_predictions: np.ndarray, labels: np.ndarray, cfg: PromoteConfig
) -> Comparison:
    """A model against the baseline on one split, at the configured tolerance and confidence."""
    correct, reference = predictions == labels, baseline_predictions == labels
    margin = margin_points(100.0 * reference.mean(), cfg.tolerance, cfg.tolerance_mode)
    return compare(correct, reference, margin, cfg.confidence)


def class_accuracies(predictions: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Accuracy in percent within each class (NaN for a class with no image in the split)."""
    right = np.bincount(labels[predictions == labels], minlength=n_classes)
    total = np.bincount(labels, minlength=n_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.round(100.0 * right / total, 4)


def worst_class(
    predictions: np.ndarray, baseline_predictions: np.ndarray, labels: np.ndarray, n_classes: int
) -> tuple[int, float]:
    """The class a model loses most on against the baseline, and by how many points (>= 0)."""
    drop = class_accuracies(baseline_predictions, labels, n_classes) - class_accuracies(
        predictions, labels, n_classes
    )
    worst = int(np.nanargmax(drop))
    return worst, max(float(drop[worst]), 0.0)


def certifiable(cfg: PromoteConfig, n_gate: int) -> str | None:
    """``None`` when ``n_gate`` images can certify ``cfg.tolerance`` for a model as good as the
    baseline (see :func:`shrinkflow.tasks.decision.stats.min_certifiable_margin`); otherwise the
    one line that says so and what to change."""
    if cfg.confidence is None:
        return None
    floor = min_certifiable_margin(n_gate, cfg.confidence, cfg.planning_disagreement)
    # A relative tolerance is at most that many points (of a baseline at 100%).
    if cfg.tolerance > floor:
        return None
    return (
        f"promote.tolerance {cfg.tolerance:g} ({cfg.tolerance_mode}) is below the {floor:.2f} points that "
        f"{n_gate} gate images can certify at {cfg.confidence:.0%} confidence for a model as accurate "
        f"as the baseline that disagrees with it on {cfg.planning_disagreement:.0%} of images, so such "
        "a model will rarely pass: raise data.gate_fraction, use more data, widen promote.tolerance, or "
        "set promote.confidence: null for the point rule"
    )
