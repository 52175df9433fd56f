"""Promotion against the registry's champion: real MLflow registry (sqlite), real models."""

from __future__ import annotations

import uuid

import pytest
from mlflow import MlflowClient

from tasks.evaluate import load_table
from tasks.promote import PromotionError
from tasks.stages import Context, run_promote
from tasks.tracking import Tracker, tracking_uri
from tests.conftest import copy_project


def _promote(evaluated, tmp_path, name, *overrides, force=False, tamper=None):
    params, layout = copy_project(evaluated, tmp_path, f"promote.model_name={name}", *overrides)
    if tamper:
        tamper(layout)
    ctx = Context(params, layout, Tracker(tracking_uri(tmp_path), params.tracking.experiment))
    return run_promote(ctx, force=force)


def _aliases(name):
    client = MlflowClient()
    if not client.search_registered_models(f"name='{name}'"):
        return {}
    return {alias: int(version) for alias, version in client.get_registered_model(name).aliases.items()}


@pytest.fixture
def model_name():
    return f"rules-{uuid.uuid4().hex[:8]}"


def test_first_winner_becomes_champion_with_reviewer_tags(evaluated, tmp_path, model_name):
    decision = _promote(evaluated, tmp_path / "1", model_name)
    assert decision.verdict == "champion" and "no champion yet" in decision.verdict_reason
    version = MlflowClient().get_model_version_by_alias(model_name, "champion")
    keys = "strategy ratio params flops latency_ms size_bytes val_acc test_acc baseline_test_acc acc_drop"
    for key in [*keys.split(), "tolerance", "data_fingerprint", "code_version"]:
        assert version.tags[key], key
    assert "Registered as `champion`" in version.description and decision.winner in version.description


def test_rules_worse_becomes_challenger_better_becomes_champion(evaluated, tmp_path, model_name):
    first = _promote(evaluated, tmp_path / "1", model_name, "promote.tolerance=50")  # a small candidate
    assert first.winner != "baseline" and _aliases(model_name) == {"champion": 1}
    # Tolerance 0 makes the (bigger) baseline this run's winner: bigger and not clearly more
    # accurate at comparable size, so it must not displace the champion.
    second = _promote(evaluated, tmp_path / "2", model_name, "promote.tolerance=0")
    assert second.winner == "baseline" and second.verdict == "challenger"
    assert _aliases(model_name) == {"champion": 1, "challenger": 2}
    assert "not better than champion v1" in MlflowClient().get_model_version(model_name, "2").description
    # A forced promotion overrides the rules and says so.
    third = _promote(evaluated, tmp_path / "3", model_name, "promote.tolerance=0", force=True)
    assert third.forced and third.verdict == "champion"
    assert _aliases(model_name) == {"champion": 3, "challenger": 2}
    assert MlflowClient().get_model_version(model_name, "3").tags["forced"] == "true"
    # The smaller model is better by the rules than the forced baseline: champion again.
    fourth = _promote(
        evaluated, tmp_path / "4", model_name, "promote.tolerance=50", "promote.champion_tolerance=100"
    )
    assert fourth.winner == first.winner and fourth.verdict == "champion"
    assert _aliases(model_name)["champion"] == 4
    # Previous champions stay retrievable by version.
    assert MlflowClient().get_model_version(model_name, "1").tags["candidate"] == first.winner


def test_identical_winner_registers_nothing_new(evaluated, tmp_path, model_name):
    _promote(evaluated, tmp_path / "1", model_name)
    again = _promote(evaluated, tmp_path / "2", model_name)
    assert again.verdict == "unchanged"
    assert len(MlflowClient().search_model_versions(f"name='{model_name}'")) == 1


def test_version_that_fails_validation_moves_no_alias(evaluated, tmp_path, model_name):
    _promote(evaluated, tmp_path / "1", model_name, "promote.tolerance=0")  # baseline is champion

    def misreport(layout):  # the table claims an accuracy the registered model does not have
        table = load_table(layout.candidates_csv)
        table.loc[table["name"] != "baseline", "test_acc"] += 0.5
        table.to_csv(layout.candidates_csv, index=False)

    with pytest.raises(PromotionError, match="no alias moved"):
        _promote(evaluated, tmp_path / "2", model_name, "promote.tolerance=50", tamper=misreport)
    assert _aliases(model_name) == {"champion": 1}
    assert not (tmp_path / "2/reports/promotion.json").exists(), (
        "no decision is written for a failed promotion"
    )


def test_all_candidates_failed_promotes_nothing(evaluated, tmp_path, model_name):
    def fail_all(layout):
        table = load_table(layout.candidates_csv)
        table.loc[table["name"] != "baseline", "status"] = "failed"
        table.to_csv(layout.candidates_csv, index=False)

    with pytest.raises(PromotionError, match="all 2 candidates failed"):
        _promote(evaluated, tmp_path / "1", model_name, tamper=fail_all)
    assert _aliases(model_name) == {}
