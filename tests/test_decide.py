"""The decision as a pure function: tables and paired predictions in, a frozen verdict out; no
MLflow, no training. Ends with the simulation of the family-wise error the procedures control."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError
from statsmodels.stats.multitest import multipletests

from shrinkflow.tasks.config import PromoteConfig
from shrinkflow.tasks.decision.decide import (
    COMPARE_ATTEMPTS,
    Champion,
    Kind,
    Race,
    Registered,
    RunFacts,
    Standing,
    certify,
    decide,
    holm,
    needs_same_champion,
    verdict_from_json,
    verdict_json,
)
from shrinkflow.tasks.decision.stats import compare_counts, noninferiority_p

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
    assert verdict.order == ("a", "b", "c", "d") and verdict.stopped_at == "b"
    outcomes = {c.name: c.outcome for c in verdict.candidates}
    assert outcomes == {"a": "certified", "b": "failed", "c": "untested", "d": "untested"}
    assert verdict.family_level == pytest.approx(0.05) and "family-wise 5%" in verdict.certified_by
    assert "not tested after the sequence stopped: c, d" in verdict.reason
    assert verdict.kind == Kind.CHAMPION and verdict.eligible == ("a", "baseline")


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
    assert verdict.order == ("y", "z") and verdict.stopped_at == "y" and verdict.winner == "baseline"
    outcomes = {c.name: c.outcome for c in verdict.candidates}
    assert outcomes["x"] == outcomes["w"] == "dominated" and outcomes["big"] == "not smaller"


def test_the_verdict_is_frozen_and_its_kind_a_closed_set():
    verdict = decide(*_inputs(FAMILY), PromoteConfig())
    with pytest.raises(dataclasses.FrozenInstanceError):
        verdict.winner = "d"
    assert {k.value for k in Kind} == {"champion", "challenger", "unchanged", "vetoed"}
    assert decide(*_inputs(FAMILY), PromoteConfig()) == verdict, "deterministic"


def test_test_vetoes_and_force_overrides():
    inputs = _inputs(FAMILY, test_wrong={"a": 60})
    assert decide(*inputs, PromoteConfig()).kind == Kind.VETOED
    forced = decide(*inputs, PromoteConfig(), Standing(force=True))
    assert forced.kind == Kind.CHAMPION and forced.forced and "test disagrees" in forced.kind_reason


def test_against_the_champion_from_its_predictions():
    table, predictions = _inputs(FAMILY)
    cfg = PromoteConfig()
    same = Champion("3", predictions["test"]["a"].to_numpy(), 800.0, "sha-a", {})
    facts = RunFacts(checkpoints={"a": "sha-a"})
    assert decide(table, predictions, cfg, Standing(same), facts).kind == Kind.UNCHANGED
    smaller = Champion("4", LABELS.copy(), 50.0, "sha-x", {})
    verdict = decide(table, predictions, cfg, Standing(smaller), facts)
    assert verdict.kind == Kind.CHALLENGER and "not better than champion v4" in verdict.kind_reason
    assert verdict.champion_comparison.n == N and verdict.champion_before.version == "4"


def test_when_the_champion_moved_the_decision_is_taken_again_and_settles_for_challenger():
    """The compare-and-set policy is decide()'s: promote calls it again with the champion it
    finds and the count of moves, and carries out what it says."""
    table, predictions = _inputs(FAMILY)
    cfg, facts = PromoteConfig(), RunFacts(checkpoints={"a": "sha-a"})
    bigger = Champion("3", LABELS.copy(), 5000.0, "sha-big", {})  # a is smaller, as accurate on test
    first = decide(table, predictions, cfg, Standing(bigger), facts)
    assert first.kind == Kind.CHAMPION and "compared again" not in first.kind_reason
    again = decide(table, predictions, cfg, Standing(bigger, race=Race(1, "v2")), facts)
    assert again.kind == Kind.CHAMPION
    assert (
        again.kind_reason == f"{first.kind_reason} (compared again: champion moved from v2 during this run)"
    )
    last = decide(table, predictions, cfg, Standing(bigger, race=Race(COMPARE_ATTEMPTS, "v4")), facts)
    assert last.kind == Kind.CHALLENGER and last.kind_reason == (
        f"champion moved {COMPARE_ATTEMPTS} times while this run compared with it; registered as challenger: "
        f"no champion replaced unseen (last: {first.kind_reason} (compared again: champion moved from v4 "
        "during this run))"
    )
    # Only @champion's move waits for the champion it was compared with, unless forced.
    assert needs_same_champion(first, cfg, force=False) and not needs_same_champion(first, cfg, force=True)
    assert not needs_same_champion(last, cfg, force=False), "the challenger moves without a comparison"
    # The champion it moved to is this very checkpoint: nothing to move, whatever the count.
    same = Champion("5", predictions["test"]["a"].to_numpy(), 800.0, "sha-a", {})
    unchanged = decide(table, predictions, cfg, Standing(same, race=Race(COMPARE_ATTEMPTS, "v4")), facts)
    assert unchanged.kind == Kind.UNCHANGED and unchanged.kind_reason == "identical to champion v5"


def test_a_champion_that_misses_its_own_record_is_a_warning():
    table, predictions = _inputs(FAMILY)
    wrong = _wrong(18)  # 96.67% on the 540 test images
    tags = {"data_fingerprint": "f1", "test_acc": "100.0"}
    champion = Champion("2", wrong, 5000.0, "sha-x", tags)
    same_data = decide(table, predictions, PromoteConfig(), Standing(champion), RunFacts(fingerprint="f1"))
    assert "champion v2 scores 96.67 on the test images it was certified on, but its record says 100.00" in (
        same_data.warning
    )
    other_data = decide(table, predictions, PromoteConfig(), Standing(champion), RunFacts(fingerprint="f2"))
    assert "record says" not in other_data.warning, "other test images: its record cannot be checked"


# promotion.json's keys, as before Verdict was typed: the file is the same, only Python names changed.
PROMOTION_JSON_KEYS = {
    "winner", "strategy", "composition", "ratio", "objective", "objective_value",
    "val_acc", "gate_acc", "test_acc", "baseline_val_acc", "baseline_gate_acc", "baseline_test_acc",
    "tolerance", "tolerance_mode", "confidence", "eligible", "reason", "multiplicity",
    "family_level", "certified_by", "order", "stopped_at", "candidates", "gate", "test", "summary",
    "warning", "vetoed", "verdict", "verdict_reason", "forced", "champion_before",
    "champion_comparison", "per_class", "registry",
}  # fmt: skip


def test_promotion_json_keeps_its_keys_and_reads_back_into_the_same_verdict():
    table, predictions = _inputs(FAMILY)
    champion = Champion("4", LABELS.copy(), 50.0, "sha-x", {})
    facts = RunFacts(checkpoints={"a": "sha-a"}, classes=tuple("0123456789"))
    decided = decide(table, predictions, PromoteConfig(), Standing(champion), facts)
    for verdict in (decided, dataclasses.replace(decided, registry=Registered("m", "7", "challenger", "r1"))):
        plain = verdict_json(verdict)
        assert set(plain) == PROMOTION_JSON_KEYS
        text = json.dumps(plain, sort_keys=True)
        assert verdict_from_json(json.loads(text)) == verdict
    assert plain["verdict"] == "challenger" and plain["registry"] == {
        "model_name": "m", "version": "7", "alias": "challenger", "run_id": "r1"
    }  # fmt: skip
    assert plain["per_class"][0] == {"class": "0", "baseline": 100.0, "model": 100.0, "difference": 0.0}
    assert plain["candidates"][0]["gate"]["n"] == N and plain["champion_before"]["loads"] is True
    # A verdict nothing was compared with, and nothing registered: its records are {} in the file.
    alone = verdict_json(decide(table, predictions, PromoteConfig()))
    assert alone["champion_before"] == alone["champion_comparison"] == alone["registry"] == {}
    with pytest.raises(ValueError, match="no strategy"):
        verdict_from_json({"winner": "a", "verdict": "champion"})


def test_when_every_candidate_failed_the_measured_baseline_stands():
    # as in a run whose candidates all failed the gate: the baseline is the winner, and registered
    table, predictions = _inputs(FAMILY)
    failed = table.assign(status=["ok", "failed", "failed", "failed", "failed"])
    verdict = decide(failed, predictions, PromoteConfig())
    assert verdict.winner == "baseline" and verdict.kind == Kind.CHAMPION
    assert "the baseline (1000 params) stands" in verdict.reason
    assert "not measured: a, b, c, d" in verdict.reason


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
    assert verdict.winner == "baseline" and verdict.eligible == ("baseline",)
    outcomes = {c.name: c.outcome for c in verdict.candidates}
    assert outcomes["mag-75"] == "not smaller"
    assert verdict.reason.startswith("nothing smaller than the baseline was certified: the baseline (1000")
    assert verdict.kind_reason.startswith("nothing smaller than the baseline was certified; ")


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
