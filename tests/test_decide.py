"""The decision as a pure function: tables and paired predictions in, a frozen verdict out; no
MLflow, no training. Ends with the simulation of the family-wise error the procedures control."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError
from statsmodels.stats.multitest import multipletests

from shrinkflow.tasks.config import PromoteConfig
from shrinkflow.tasks.decide import Champion, Kind, certify, decide, holm
from shrinkflow.tasks.stats import compare_counts, noninferiority_p

N = 540  # the default digits gate
LABELS = np.arange(N) % 10


def _wrong(n_wrong: int, shift: int = 0) -> np.ndarray:
    """Predictions that miss ``n_wrong`` images the baseline gets right (from ``shift`` on)."""
    predicted = LABELS.copy()
    miss = (np.arange(n_wrong) + shift) % N
    predicted[miss] = (LABELS[miss] + 1) % 10
    return predicted


def _inputs(models: dict[str, tuple[int, float, int]], test_wrong: dict[str, int] | None = None):
    """A table and predictions from ``name: (params, val_acc, gate images lost)``; the baseline
    has 1,000 params and gets every image right."""
    rows = [("baseline", 1000, 99.0, 0), *((n, *m) for n, m in models.items())]
    table = pd.DataFrame(
        {
            "name": [r[0] for r in rows],
            "strategy": ["baseline", *["prune_l1"] * len(models)],
            "ratio": 0.5,
            "status": "ok",
            "params": [r[1] for r in rows],
            "val_acc": [r[2] for r in rows],
            "gate_acc": [100 * (1 - r[3] / N) for r in rows],
            "test_acc": 100.0,
            "latency_ms": 1.0,
            "worst_class_drop": 0.0,
        }
    )
    gate = pd.DataFrame({"label": LABELS, **{r[0]: _wrong(r[3]) for r in rows}})
    test = pd.DataFrame({"label": LABELS, **{r[0]: _wrong((test_wrong or {}).get(r[0], 0)) for r in rows}})
    return table, {"gate": gate, "test": test}


# Largest first: a (lost 2 of 540), b (fails: lost 25), c (lost 3), d (lost 60)
FAMILY = {"a": (800, 98.5, 2), "b": (400, 98.0, 25), "c": (200, 97.5, 3), "d": (100, 97.0, 60)}


def test_fixed_sequence_stops_at_the_first_failure():
    verdict = decide(*_inputs(FAMILY), PromoteConfig())
    assert verdict.winner == "a" and verdict.multiplicity == "fixed_sequence"
    assert verdict.order == ["a", "b", "c", "d"] and verdict.stopped_at == "b"
    outcomes = {c["name"]: c["outcome"] for c in verdict.candidates}
    assert outcomes == {"a": "certified", "b": "failed", "c": "untested", "d": "untested"}
    assert verdict.family_level == pytest.approx(0.05) and "family-wise 5%" in verdict.certified_by
    assert "not tested after the sequence stopped: c, d" in verdict.reason
    assert verdict.verdict == Kind.CHAMPION and verdict.eligible == ["a", "baseline"]


def test_holm_and_none_test_past_a_failure():
    holm = decide(*_inputs(FAMILY), PromoteConfig(multiplicity="holm"))
    assert holm.winner == "c" and holm.stopped_at is None and "Holm" in holm.certified_by
    none = decide(*_inputs(FAMILY), PromoteConfig(multiplicity="none"))
    assert none.winner == "c" and none.family_level is None and "no family-wise" in none.certified_by


def test_the_order_comes_from_validation_alone():
    models = {
        "big": (1000, 99.5, 0),  # not smaller than the baseline
        "w": (700, 97.5, 40),  # no better on validation than the smaller x: not tested
        "x": (500, 97.5, 0),
        "y": (500, 98.0, 40),  # better than x on validation: stands for size 500
        "z": (100, 90.0, 80),
    }
    verdict = decide(*_inputs(models), PromoteConfig())
    # y fails the gate and the sequence stops: x, as good on the gate, is never tested (the gate
    # does not choose the order).
    assert verdict.order == ["y", "z"] and verdict.stopped_at == "y" and verdict.winner == "baseline"
    outcomes = {c["name"]: c["outcome"] for c in verdict.candidates}
    assert outcomes["x"] == outcomes["w"] == "dominated" and outcomes["big"] == "not smaller"


def test_the_verdict_is_frozen_and_its_kind_a_closed_set():
    verdict = decide(*_inputs(FAMILY), PromoteConfig())
    with pytest.raises(dataclasses.FrozenInstanceError):
        verdict.winner = "d"
    assert {k.value for k in Kind} == {"champion", "challenger", "unchanged", "vetoed"}
    assert decide(*_inputs(FAMILY), PromoteConfig()) == verdict, "deterministic"


def test_test_vetoes_and_force_overrides():
    inputs = _inputs(FAMILY, test_wrong={"a": 60})
    assert decide(*inputs, PromoteConfig()).verdict == Kind.VETOED
    forced = decide(*inputs, PromoteConfig(), force=True)
    assert forced.verdict == Kind.CHAMPION and forced.forced and "test disagrees" in forced.verdict_reason


def test_against_the_champion_from_its_predictions():
    table, predictions = _inputs(FAMILY)
    cfg = PromoteConfig()
    same = Champion("3", predictions["test"]["a"].to_numpy(), 800.0, "sha-a", {})
    assert decide(table, predictions, cfg, same, {"a": "sha-a"}).verdict == Kind.UNCHANGED
    smaller = Champion("4", LABELS.copy(), 50.0, "sha-x", {})
    verdict = decide(table, predictions, cfg, smaller, {"a": "sha-a"})
    assert verdict.verdict == Kind.CHALLENGER and "not better than champion v4" in verdict.verdict_reason
    assert verdict.champion_comparison["n"] == N and verdict.champion_before["version"] == "4"


def test_when_every_candidate_failed_the_measured_baseline_stands():
    # as in a run whose candidates all failed the gate: the baseline is the winner, and registered
    table, predictions = _inputs(FAMILY)
    failed = table.assign(status=["ok", "failed", "failed", "failed", "failed"])
    verdict = decide(failed, predictions, PromoteConfig())
    assert verdict.winner == "baseline" and verdict.verdict == Kind.CHAMPION
    assert (
        "the baseline (1000 params) stands" in verdict.reason and "not measured: a, b, c, d" in verdict.reason
    )


def test_bad_input_is_one_clear_line():
    table, predictions = _inputs(FAMILY)
    with pytest.raises(ValidationError, match="holm adjusts p-values"):
        PromoteConfig(multiplicity="holm", confidence=None)
    with pytest.raises(ValidationError, match="fixed_sequence"):
        PromoteConfig(multiplicity="bonferroni")


# --- pitfalls of a default-sized run (issue #25) ----------------------------------------------
def _costed(models: dict[str, tuple[int, float, int]], **columns: dict[str, float]):
    """:func:`_inputs` with per-model cost columns (``size_bytes={"a": 10}``); unnamed models get
    the baseline's, a float twin's latency is blank for a float model."""
    table, predictions = _inputs(models)
    table["size_bytes"] = 4000
    table["float_latency_ms"] = np.nan
    for column, values in columns.items():
        for name, value in values.items():
            table.loc[table["name"] == name, column] = value
    return table, predictions


@pytest.mark.parametrize("multiplicity", ["fixed_sequence", "holm", "none"])
def test_a_tie_on_the_objective_goes_to_the_smaller_then_the_faster(multiplicity):
    cfg = PromoteConfig(multiplicity=multiplicity)
    # Same params, same validation and gate: the fewer bytes win, not the name.
    tied = {"a-big": (500, 98.0, 2), "b-small": (500, 98.0, 2)}
    bytes_ = decide(*_costed(tied, size_bytes={"a-big": 2000, "b-small": 1000}), cfg)
    assert bytes_.winner == "b-small"
    # Same params and bytes: the faster wins.
    speed = decide(*_costed(tied, latency_ms={"a-big": 0.9, "b-small": 0.5}), cfg)
    assert speed.winner == "b-small"
    # Latencies within measurement noise of each other tie: validation, then the gate decide.
    noise = _costed({"a-big": (500, 98.5, 1), "b-small": (500, 98.0, 2)}, latency_ms={"a-big": 1.2})
    assert decide(*noise, cfg).winner == "a-big"


@pytest.mark.parametrize("multiplicity", ["fixed_sequence", "holm", "none"])
def test_a_slower_int8_never_beats_its_float_twin_on_a_tie(multiplicity):
    # As in the default run: int8 has the float model's params (counted on its dense twin), a
    # quarter of its bytes, better validation and gate scores by noise, and runs 6x slower.
    models = {"l1-50": (500, 98.0, 2), "l1-50-int8": (500, 98.5, 1)}
    costs = {
        "size_bytes": {"l1-50": 2000, "l1-50-int8": 500},
        "latency_ms": {"l1-50": 0.15, "l1-50-int8": 0.9},
        "float_latency_ms": {"l1-50-int8": 0.15},
    }
    verdict = decide(*_costed(models, **costs), PromoteConfig(multiplicity=multiplicity))
    assert verdict.winner == "l1-50"
    # Where its kernels are faster than float, the int8 model's fewer bytes do win the tie.
    costs["latency_ms"]["l1-50-int8"] = 0.1
    assert decide(*_costed(models, **costs), PromoteConfig(multiplicity=multiplicity)).winner == "l1-50-int8"


@pytest.mark.parametrize("multiplicity", ["fixed_sequence", "holm", "none"])
def test_only_a_strictly_smaller_model_wins(multiplicity):
    # Magnitude pruning keeps every parameter (zeros count): the baseline's size, better on gate.
    same_size = {"mag-75": (1000, 99.5, 0), "too-lossy": (300, 97.0, 60)}
    table, predictions = _inputs(same_size)
    table.loc[table["name"] == "baseline", "gate_acc"] = 99.5  # mag-75 is better on gate
    verdict = decide(table, predictions, PromoteConfig(multiplicity=multiplicity))
    assert verdict.winner == "baseline" and verdict.eligible == ["baseline"]
    outcomes = {c["name"]: c["outcome"] for c in verdict.candidates}
    assert outcomes["mag-75"] == "not smaller"
    assert verdict.reason.startswith("nothing smaller than the baseline was certified: the baseline (1000")
    assert verdict.verdict_reason.startswith("nothing smaller than the baseline was certified; ")


def test_the_per_class_guard_is_on_by_default():
    assert PromoteConfig().max_class_drop == 10.0
    table, predictions = _inputs({"a": (800, 98.5, 2), "c": (200, 97.5, 3)})
    table["worst_class"] = "3"
    table.loc[table["name"] == "c", "worst_class_drop"] = 12.5  # 7 of ~54 gate images of one class
    verdict = decide(table, predictions, PromoteConfig())
    assert verdict.winner == "a"
    assert "c (loses 12.5 points on class '3' > 10)" in verdict.reason
    off = decide(table, predictions, PromoteConfig(max_class_drop=None))
    assert off.winner == "c"


# --- simulation -------------------------------------------------------------------------------
# Ten candidates, largest first, with true gate-accuracy drops shaped like a default digits run
# (smaller is worse, not monotonically: the real run's gate deltas go -0.2, -0.4, -0.4, -0.7,
# -0.9, then -1.9 and -7): six within the 2-point tolerance, four just beyond it.
TRUE_DROP = np.array([0.0, 0.2, 0.4, 0.3, 0.7, 0.9, 2.2, 2.4, 2.6, 3.0])
TOLERANCE, CONFIDENCE, REPLICATIONS = 2.0, 0.95, 1500
GAIN = 0.01  # share of gate images a candidate gets right and the baseline wrong


def simulate(rng: np.random.Generator) -> dict[str, dict[str, float]]:
    """For each procedure, how often the promoted model is truly worse than the tolerance and how
    often it is the truly smallest acceptable one, from the gate's own test and ``certify``."""
    loss = GAIN + TRUE_DROP / 100
    counts = rng.multinomial(N, np.stack([np.full(10, GAIN), loss, 1 - GAIN - loss], 1), (REPLICATIONS, 10))
    # The gate's own test, on every candidate of every family at once (it rejects exactly when
    # the lower bound clears -tolerance, see test_gate.py).
    p_values = noninferiority_p(counts[..., 0], counts[..., 1], N, TOLERANCE)
    passed = p_values < 1 - CONFIDENCE
    acceptable = np.flatnonzero(TRUE_DROP <= TOLERANCE).max()
    table = {}
    for procedure in ("fixed_sequence", "holm", "none"):
        certified = certify(passed, p_values, procedure, 1 - CONFIDENCE)
        # The smallest certified candidate wins (the last in the order); none: the baseline.
        won = np.where(certified.any(1), 9 - np.argmax(certified[:, ::-1], 1), -1)
        worse = np.where(won >= 0, TRUE_DROP[won] > TOLERANCE, False)
        table[procedure] = {
            "worse": worse.mean(),
            "power": (won == acceptable).mean(),
            "smaller": ((won >= 0) & ~worse).mean(),  # some acceptable candidate, not the baseline
        }
    return table


def test_holm_agrees_with_statsmodels():
    rng = np.random.default_rng(5)
    # Few families: statsmodels runs gc.collect() on every call, a second each in a big process.
    families = np.concatenate([rng.random((6, 10)) * 0.1, rng.random((6, 10))])
    families[:3, 3:6] = 0.004  # ties
    ours = holm(families, 0.05)
    for family, rejected in zip(families, ours, strict=True):
        assert (multipletests(family, alpha=0.05, method="holm")[0] == rejected).all()


def test_the_vectorised_p_value_is_the_gates():
    for gain, loss in [(5, 10), (0, 0), (3, 25), (12, 4)]:
        c = compare_counts(gain, loss, N, TOLERANCE, CONFIDENCE)
        assert noninferiority_p(gain, loss, N, TOLERANCE) == pytest.approx(c.p_value, abs=1e-12)
        assert c.passed == (c.p_value < 1 - CONFIDENCE)


def test_simulation_family_wise_error_and_power():
    table = simulate(np.random.default_rng(22))
    mc = 2 * np.sqrt(0.05 * 0.95 / REPLICATIONS)  # two Monte Carlo standard errors at 5%
    for procedure, row in table.items():
        print(f"\n{procedure}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()))
    assert table["fixed_sequence"]["worse"] <= 1 - CONFIDENCE + mc
    assert table["holm"]["worse"] <= 1 - CONFIDENCE + mc
    assert table["none"]["worse"] > 1 - CONFIDENCE + mc, "per candidate, the decision is not certified"
    # The price: fewer of the smallest acceptable candidates get through, but a smaller model
    # within tolerance is still promoted most of the time.
    assert table["fixed_sequence"]["power"] <= table["none"]["power"]
    assert table["fixed_sequence"]["smaller"] >= 0.8 and table["holm"]["smaller"] >= 0.8
