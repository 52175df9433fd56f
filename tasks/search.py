"""Search a strategy's ratio for the largest reduction that passes the promotion gate on the
validation split, under a budget of trials (the seed's "iterate the adjustment").

Accuracy is not monotonic in the ratio once noise is involved (a larger ratio can pass where a
smaller one failed), so the search never trusts a bracket: it keeps the largest ratio that
passed among all the trials it ran.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from shrinkflow.tasks.config import SearchConfig
from shrinkflow.tasks.stats import Comparison


@dataclass(frozen=True)
class Trial:
    index: int
    ratio: float
    val_acc: float
    delta: float  # val accuracy minus the baseline's, points
    lower: float  # the gate's one-sided lower confidence bound of delta
    p_value: float
    passed: bool  # lower > -tolerance: the trial passes the same gate promotion applies


def search_ratio(
    cfg: SearchConfig,
    judge: Callable[[float], tuple[float, Comparison]],
    on_trial: Callable[[Trial], None] | None = None,
) -> list[Trial]:
    """Run trials until the search ends or ``cfg.trials`` are spent; ``judge(ratio)`` shrinks,
    fine-tunes and returns the trial's val accuracy and its gate comparison with the baseline.
    ``step`` walks up from ``low`` and stops at the first failure; ``bisect`` tries ``low``, then
    ``high``, then halves the gap between the largest pass and the smallest failure above it.
    Returns the trials in the order run."""
    trials: list[Trial] = []

    def passes(ratio: float) -> bool:
        acc, gate = judge(ratio)
        trials.append(Trial(len(trials), ratio, acc, gate.delta, gate.lower, gate.p_value, gate.passed))
        if on_trial is not None:
            on_trial(trials[-1])
        return gate.passed

    if cfg.mode == "step":
        ratio = cfg.low
        while len(trials) < cfg.trials and ratio <= cfg.high + 1e-9 and passes(round(ratio, 6)):
            ratio += cfg.step
        return trials
    if not passes(cfg.low) or len(trials) == cfg.trials or passes(cfg.high):
        return trials
    while len(trials) < cfg.trials:
        good = max(t.ratio for t in trials if t.passed)
        bad = min(t.ratio for t in trials if not t.passed and t.ratio > good)
        passes(round((good + bad) / 2, 6))
    return trials


def best_trial(trials: list[Trial]) -> Trial:
    """The largest ratio that passed; if none did, the smallest tried (the closest to passing)."""
    passed = [t for t in trials if t.passed]
    if passed:
        return max(passed, key=lambda t: t.ratio)
    return min(trials, key=lambda t: t.ratio)
