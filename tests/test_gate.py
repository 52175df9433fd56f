"""The non-inferiority gate on its own: the paired interval, its error rates in simulation, the
veto, the champion rule, the per-class guard and the ratio search, independent of training (the
decision as a whole: tests/test_decide.py)."""

from __future__ import annotations

import math
import types

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import minimize_scalar
from scipy.stats import norm

from shrinkflow.tasks.config import SearchConfig, parse_params
from shrinkflow.tasks.decision.decide import Champion, decide, judge, vetoed_by_test
from shrinkflow.tasks.decision.gate import certifiable
from shrinkflow.tasks.decision.stats import compare, min_certifiable_margin, score_statistic
from shrinkflow.tasks.measurement.evaluate import COLUMNS, compare_with_baseline
from shrinkflow.tasks.training.search import best_trial, search_ratio
from tests.conftest import small_raw


def _pairs(gain: int, loss: int, both_right: int, both_wrong: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-image correctness of a model and its reference with the given discordant counts."""
    model = np.array([True] * gain + [False] * loss + [True] * both_right + [False] * both_wrong)
    reference = np.array([False] * gain + [True] * loss + [True] * both_right + [False] * both_wrong)
    return model, reference


CASES = [(5, 10, 540, -0.02), (3, 20, 300, -0.05), (20, 3, 300, 0.01), (0, 7, 200, -0.03)]


@pytest.mark.parametrize(("gain", "loss", "n", "delta0"), CASES)
def test_score_statistic_uses_the_constrained_maximum_likelihood(gain, loss, n, delta0):
    """The closed form of the restricted MLE (a quadratic) against a numerical maximisation."""
    rest = n - gain - loss

    def nll(p):
        return -(gain * math.log(p + delta0) + loss * math.log(p) + rest * math.log(1 - 2 * p - delta0))

    p = minimize_scalar(
        nll,
        bounds=(max(0, -delta0) + 1e-12, (1 - delta0) / 2 - 1e-12),
        method="bounded",
        options={"xatol": 1e-13},
    ).x
    expected = (gain - loss - n * delta0) / math.sqrt(n * (2 * p + delta0 * (1 - delta0)))
    assert score_statistic(gain, loss, n, delta0) == pytest.approx(expected, rel=1e-6)


def test_identical_models_get_a_bound_that_reflects_only_the_sample_size():
    model, reference = _pairs(0, 0, 500, 40)
    c = compare(model, reference, margin=2.0, confidence=0.95)
    z2 = norm.ppf(0.95) ** 2
    assert c.delta == 0 and c.lower == pytest.approx(-100 * z2 / (540 + z2), abs=1e-3)
    assert c.upper == pytest.approx(-c.lower, abs=1e-3) and c.passed and c.p_value < 0.05


def test_interval_is_antisymmetric_and_p_value_agrees_with_the_bound():
    model, reference = _pairs(6, 14, 500, 20)
    forward, backward = compare(model, reference, 2.0, 0.95), compare(reference, model, 2.0, 0.95)
    assert forward.delta == pytest.approx(-8 / 540 * 100, abs=1e-3)
    assert forward.lower == pytest.approx(-backward.upper, abs=1e-6)
    assert forward.lower < forward.delta < forward.upper
    for margin in (0.5, 1.0, 2.5, 3.0, 4.0):  # the test rejects exactly when the bound clears -margin
        c = compare(model, reference, margin, 0.95)
        assert c.passed == (c.p_value < 0.05) == (c.lower > -margin)


def test_point_rule_when_the_gate_is_off():
    model, reference = _pairs(0, 10, 530)
    off = compare(model, reference, 2.0, None)
    assert off.lower == off.delta == off.upper == pytest.approx(-1.8519, abs=1e-4)
    assert off.passed and off.p_value is None and "point rule" in off.line("m")


def _admission_rate(rng, draws, n, p_gain, p_loss, margin, confidence):
    admitted = point = 0
    for _ in range(draws):
        gain, loss, same = rng.multinomial(n, [p_gain, p_loss, 1 - p_gain - p_loss])
        model, reference = _pairs(gain, loss, same)
        admitted += compare(model, reference, margin, confidence).passed
        point += compare(model, reference, margin, None).passed
    return admitted / draws, point / draws


def test_simulation_error_rates_of_the_gate():
    """Synthetic paired outcomes with known true accuracies, 600 draws each, 540 gate images
    (the default digits gate) unless stated."""
    rng, draws, n, tolerance, confidence = np.random.default_rng(12), 600, 540, 2.0, 0.95
    # True drop of twice the tolerance: 5% of images lost, 1% gained.
    bad, bad_point = _admission_rate(rng, draws, n, 0.01, 0.05, tolerance, confidence)
    # True drop of exactly the tolerance: the boundary, where the error rate is largest.
    edge, edge_point = _admission_rate(rng, draws, n, 0.01, 0.03, tolerance, confidence)
    # As accurate as the baseline, disagreeing on 4% of images: the power grows with the gate.
    equal, _ = _admission_rate(rng, draws, 1000, 0.02, 0.02, tolerance, confidence)
    equal_540, _ = _admission_rate(rng, draws, n, 0.02, 0.02, tolerance, confidence)
    print(f"\nadmitted, drop 2x tolerance: gate {bad:.3f}, point rule {bad_point:.3f}")
    print(f"admitted, drop = tolerance: gate {edge:.3f}, point rule {edge_point:.3f}")
    print(f"admitted, equal accuracy: gate {equal:.3f} on 1000 images, {equal_540:.3f} on 540")
    assert bad <= (1 - confidence) + 0.02
    assert edge <= (1 - confidence) + 0.02, "the level holds at the boundary too"
    assert edge_point > 0.3, "the point rule admits a model at the boundary about half the time"
    assert equal >= 0.8 and equal_540 >= 0.6


def test_min_certifiable_margin_and_the_message():
    assert min_certifiable_margin(540, 0.95, 0.05) == pytest.approx(1.68, abs=0.01)
    assert min_certifiable_margin(270, 0.95, 0.05) > min_certifiable_margin(540, 0.95, 0.05)
    cfg = parse_params(small_raw()).promote
    assert certifiable(cfg.model_copy(update={"tolerance": 2.0}), 540) is None
    line = certifiable(cfg.model_copy(update={"tolerance": 1.0}), 270)
    assert "promote.tolerance 1" in line and "2.47 points" in line and "270 gate images" in line
    assert "data.gate_fraction" in line and "\n" not in line
    assert certifiable(cfg.model_copy(update={"tolerance": 0.1, "confidence": None}), 270) is None


def test_test_vetoes_only_when_the_whole_interval_is_beyond_the_tolerance():
    model, reference = _pairs(1, 40, 319)  # 11 points worse on 360 test images
    assert vetoed_by_test(compare(model, reference, 2.0, 0.95))
    model, reference = _pairs(2, 12, 346)  # 2.8 points worse, but the interval reaches -2
    assert not vetoed_by_test(compare(model, reference, 2.0, 0.95))


def test_champion_rule_is_paired():
    cfg = parse_params(small_raw()).promote
    ours = types.SimpleNamespace(winner="a", objective_value=300.0)  # a verdict's two fields judge reads
    champion = Champion("3", np.zeros(1), size=1000, sha256="x", tags={})
    similar = compare(*_pairs(2, 4, 354), cfg.champion_tolerance, cfg.confidence)  # -0.56 points
    alias, why = judge(ours, champion, similar, cfg)
    assert alias == "champion" and "smaller than champion v3" in why and "bound" in why
    worse = compare(*_pairs(2, 30, 328), cfg.champion_tolerance, cfg.confidence)  # -7.8 points
    alias, why = judge(ours, champion, worse, cfg)
    assert alias == "challenger" and "not better than champion v3" in why
    bigger = Champion("3", np.zeros(1), size=100, sha256="x", tags={})
    better = compare(*_pairs(30, 2, 328), cfg.champion_tolerance, cfg.confidence)
    assert judge(ours, bigger, better, cfg)[0] == "challenger", "3x the size is not comparable"
    level = Champion("3", np.zeros(1), size=290, sha256="x", tags={})
    assert judge(ours, level, better, cfg)[0] == "champion", "more accurate at comparable size"
    assert judge(ours, level, similar, cfg)[0] == "challenger", "not shown to be more accurate"


class _Noisy:
    """A ratio -> accuracy curve that is not monotonic: 0.7 fails between passes at 0.6 and 0.8."""

    def __init__(self):
        self.calls = []

    def __call__(self, ratio):
        self.calls.append(ratio)
        passed = ratio in (0.5, 0.6, 0.8) or ratio < 0.5
        c = compare(*_pairs(0, 2 if passed else 40, 498), 2.0, 0.95)
        return 99.0 if passed else 90.0, c


def test_search_keeps_the_largest_passing_trial_on_a_noisy_curve():
    judge_ = _Noisy()
    trials = search_ratio(SearchConfig(mode="bisect", low=0.4, high=0.9, trials=5), judge_)
    assert [t.ratio for t in trials][:2] == [0.4, 0.9]
    assert best_trial(trials).ratio == max(t.ratio for t in trials if t.passed)
    assert all(t.lower is not None and t.p_value is not None for t in trials)
    # Bisection always splits the gap between the largest pass and the smallest failure above it.
    for trial in trials[2:]:
        passed_before = [t.ratio for t in trials[: trial.index] if t.passed]
        failed_above = [
            t.ratio for t in trials[: trial.index] if not t.passed and t.ratio > max(passed_before)
        ]
        assert trial.ratio == pytest.approx((max(passed_before) + min(failed_above)) / 2)
    step = search_ratio(SearchConfig(mode="step", low=0.5, high=0.9, step=0.1, trials=5), _Noisy())
    assert [t.passed for t in step] == [True, True, False] and best_trial(step).ratio == 0.6


def test_the_per_class_guard_refuses_a_model_that_gives_up_a_class():
    """``m`` is better than the baseline overall but gets every image of class '3' wrong."""
    rng = np.random.default_rng(0)
    labels = {split: np.repeat(np.arange(10), 60) for split in ("gate", "test")}
    base = {s: np.where(rng.random(600) < 0.8, y, (y + 1) % 10) for s, y in labels.items()}
    model = {s: np.where(y == 3, 4, y) for s, y in labels.items()}  # perfect except class 3
    classes = [str(c) for c in range(10)]
    cfg = parse_params(small_raw()).promote

    def judged(**update):
        table = pd.DataFrame(
            {
                "name": ["baseline", "m"],
                "strategy": ["baseline", "width"],
                "ratio": [0.0, 0.5],
                "status": ["ok", "ok"],
                "val_acc": [90.0, 90.0],
                "gate_acc": [90.0, 90.0],
                "test_acc": [90.0, 90.0],
                "params": [100, 10],
                "flops": [1, 1],
                "size_bytes": [1, 1],
                "latency_ms": [1.0, 1.0],
            }
        ).reindex(columns=COLUMNS)
        compare_with_baseline(
            table, {"baseline": base, "m": model}, labels, cfg.model_copy(update=update), classes
        )
        predictions = {
            s: pd.DataFrame({"label": y, "baseline": base[s], "m": model[s]}) for s, y in labels.items()
        }
        return table, decide(table, predictions, cfg.model_copy(update=update))

    table, free = judged(max_class_drop=None)
    assert table.loc[1, "worst_class"] == "3" and table.loc[1, "worst_class_drop"] > 80
    assert free.winner == "m", "without the guard the better, smaller model wins"
    table, guarded = judged(max_class_drop=10.0)
    assert guarded.winner == "baseline" and guarded.eligible == ("baseline",)
    assert "m (loses" in guarded.reason and "on class '3' > 10" in guarded.reason
