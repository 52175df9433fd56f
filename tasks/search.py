"""Search a strategy's ratio for the largest reduction whose validation accuracy stays within
the promotion tolerance, under a budget of trials (the seed's "iterate the adjustment")."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tasks.config import SearchConfig


@dataclass(frozen=True)
class Trial:
    index: int
    ratio: float
    val_acc: float
    passed: bool  # val_acc >= the floor


def search_ratio(
    cfg: SearchConfig,
    val_acc_at: Callable[[float], float],
    floor: float,
    on_trial: Callable[[Trial], None] | None = None,
) -> list[Trial]:
    """Run trials (``val_acc_at(ratio)`` shrinks, fine-tunes and measures) until the search ends
    or ``cfg.trials`` are spent. ``step`` walks up from ``low`` and stops at the first failure;
    ``bisect`` tries ``low``, then ``high``, then halves the gap between the largest pass and the
    smallest fail. Returns the trials in the order run."""
    trials: list[Trial] = []

    def passes(ratio: float) -> bool:
        acc = val_acc_at(ratio)
        trials.append(Trial(len(trials), ratio, acc, acc >= floor))
        if on_trial is not None:
            on_trial(trials[-1])
        return trials[-1].passed

    if cfg.mode == "step":
        ratio = cfg.low
        while len(trials) < cfg.trials and ratio <= cfg.high + 1e-9 and passes(round(ratio, 6)):
            ratio += cfg.step
        return trials
    if not passes(cfg.low) or len(trials) == cfg.trials or passes(cfg.high):
        return trials
    good, bad = cfg.low, cfg.high
    while len(trials) < cfg.trials:
        mid = round((good + bad) / 2, 6)
        good, bad = (mid, bad) if passes(mid) else (good, mid)
    return trials


def best_trial(trials: list[Trial]) -> Trial:
    """The largest ratio that passed; if none did, the smallest tried (the closest to passing)."""
    passed = [t for t in trials if t.passed]
    if passed:
        return max(passed, key=lambda t: t.ratio)
    return min(trials, key=lambda t: t.ratio)
