"""Promotion against the registry's champion: real MLflow registry (sqlite), real models."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd
import pytest
from mlflow import MlflowClient

from shrinkflow.tasks.measurement.evaluate import load_table
from shrinkflow.tasks.pipeline.stages import Context, run_promote
from shrinkflow.tasks.promotion.promote import PromotionError
from shrinkflow.tasks.store.registry import _tracking, version_record
from shrinkflow.tasks.store.tracking import Tracker, tracking_uri
from tests.conftest import (
    BIN,
    aliases,
    copy_project,
    free_port,
    gate_refuses_all,
    promote_copy,
    run_cli,
    stop,
    wait_http,
)


def test_first_winner_becomes_champion_with_reviewer_tags(evaluated, tmp_path, model_name):
    params, layout = copy_project(evaluated, tmp_path / "1", f"promote.model_name={model_name}")
    tracker = Tracker(tracking_uri(tmp_path), params.tracking.experiment)
    parent = tracker.start_run("pipeline")  # as a whole run nests its stages
    decision = run_promote(Context(params, layout, tracker, parent))
    assert tracker.run(parent).info.run_name == f"{model_name} v1 @champion: {decision.winner}"
    experiment = tracker.experiment()
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development", "not MLflow's GenAI view"
    assert decision.kind == "champion" and "no champion yet" in decision.kind_reason
    version = MlflowClient().get_model_version_by_alias(model_name, "champion")
    keys = "candidate composition params size_bytes test_acc test_acc_change_pts gate_bound_pts verdict"
    for key in [*keys.split(), "task_classes", "data_fingerprint", "code_version", "checkpoint_sha256"]:
        assert version.tags[key], key
    assert len(version.tags) <= 22, sorted(version.tags)  # the few a reviewer filters on
    change = float(version.tags["test_acc_change_pts"])  # positive: better than the baseline
    assert change == pytest.approx(decision.test_acc - decision.baseline_test_acc, abs=1e-3)
    record = version_record(MlflowClient(), model_name, version.version)  # every other figure
    for key in [
        "strategy",
        "ratio",
        "flops",
        "latency_ms",
        "val_acc",
        "gate_acc",
        "baseline_test_acc",
        "certified_by",
    ]:
        assert record[key], key
    assert "acc_drop" not in record
    step = {"w50": "width", "l1-50": "prune_l1", "baseline": "baseline"}[decision.winner]
    assert version.tags["composition"] == step
    assert "**Verdict: `champion`**" in version.description and decision.winner in version.description
    assert "| FLOPs |" in version.description and "[Pareto plot](#/experiments/" in version.description
    registered = MlflowClient().get_registered_model(model_name)
    assert "How versions are chosen" in registered.description and registered.tags["task_source"]
    report = (tmp_path / "1/reports/report.md").read_text()
    assert "val_f1" in report and "test_f1" in report, "macro-F1 on validation and test"
    assert f"## Per class on test: `{decision.winner}` against the baseline" in report
    assert len(decision.per_class) == 10 and decision.per_class[0].name == "0"


def test_rules_worse_becomes_challenger_better_becomes_champion(evaluated, tmp_path, model_name):
    first = promote_copy(evaluated, tmp_path / "1", model_name, "promote.tolerance=50")  # a small candidate
    assert first.winner != "baseline" and aliases(model_name) == {"champion": 1}
    # With every candidate failing the gate the (bigger) baseline is this run's winner: bigger and
    # not at comparable size, so it must not displace the champion.
    second = promote_copy(evaluated, tmp_path / "2", model_name, tamper=gate_refuses_all)
    assert second.winner == "baseline" and second.kind == "challenger"
    assert aliases(model_name) == {"champion": 1, "challenger": 2}
    assert "not better than champion v1" in MlflowClient().get_model_version(model_name, "2").description
    # A forced promotion overrides the rules and says so.
    third = promote_copy(evaluated, tmp_path / "3", model_name, tamper=gate_refuses_all, force=True)
    assert third.forced and third.kind == "champion"
    assert aliases(model_name) == {"champion": 3, "challenger": 2}
    assert MlflowClient().get_model_version(model_name, "3").tags["forced"] == "true"
    verdicts = {v: MlflowClient().get_model_version(model_name, v).tags["verdict"] for v in "123"}
    assert verdicts == {"1": "retired", "2": "challenger", "3": "champion"}, "the verdict follows @champion"
    # The smaller model is better by the rules than the forced baseline: champion again.
    fourth = promote_copy(
        evaluated, tmp_path / "4", model_name, "promote.tolerance=50", "promote.champion_tolerance=100"
    )
    assert fourth.winner == first.winner and fourth.kind == "champion"
    assert aliases(model_name)["champion"] == 4
    # Previous champions stay retrievable by version.
    assert MlflowClient().get_model_version(model_name, "1").tags["candidate"] == first.winner


def test_identical_winner_registers_nothing_new(evaluated, tmp_path, model_name):
    promote_copy(evaluated, tmp_path / "1", model_name)
    again = promote_copy(evaluated, tmp_path / "2", model_name)
    assert again.kind == "unchanged"
    assert len(MlflowClient().search_model_versions(f"name='{model_name}'")) == 1


def test_version_that_fails_validation_moves_no_alias(evaluated, tmp_path, model_name):
    promote_copy(evaluated, tmp_path / "1", model_name, tamper=gate_refuses_all)  # baseline is champion

    def misreport(layout):  # the table claims an accuracy the registered model does not have
        table = load_table(layout.candidates_csv)
        table.loc[table["name"] != "baseline", "test_acc"] += 0.5
        table.to_csv(layout.candidates_csv, index=False)

    with pytest.raises(PromotionError, match="no alias moved"):
        promote_copy(evaluated, tmp_path / "2", model_name, "promote.tolerance=50", tamper=misreport)
    assert aliases(model_name) == {"champion": 1}
    assert not (tmp_path / "2/reports/promotion.json").exists(), (
        "no decision is written for a failed promotion"
    )


def test_all_candidates_failed_the_measured_baseline_stands(evaluated, tmp_path, model_name):
    def fail_all(layout):
        table = load_table(layout.candidates_csv)
        table.loc[table["name"] != "baseline", "status"] = "failed"
        table.to_csv(layout.candidates_csv, index=False)

    # as when every candidate fails the gate: the baseline wins and is registered
    decision = promote_copy(evaluated, tmp_path / "1", model_name, tamper=fail_all)
    assert decision.winner == "baseline" and decision.kind == "champion"
    assert "not measured: l1-50, w50" in decision.reason
    assert aliases(model_name) == {"champion": 1}


def test_every_candidate_failing_prints_why_each_did(evaluated, tmp_path, model_name):
    """The console names each failed candidate's reason, one line each (its first line, control
    characters gone, cut to the terminal table's 120 columns); the measured baseline stands."""
    params, layout = copy_project(evaluated, tmp_path, f"promote.model_name={model_name}")
    table = load_table(layout.candidates_csv).astype({"error": object})  # all blank: read as floats
    errors = {
        "w50": "RuntimeError: the graph has no prunable group\n  File 'x.py', line 1",
        "l1-50": "ValueError: \x1b[31m" + "wide " * 100,
    }
    for name, error in errors.items():
        table.loc[table["name"] == name, ["status", "error"]] = ["failed", error]
    table.to_csv(layout.candidates_csv, index=False)
    done = run_cli("stage", "promote", "-p", str(tmp_path / "params.yaml"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-2:] == [
        "candidate 'w50' failed: RuntimeError: the graph has no prunable group",
        ("candidate 'l1-50' failed: ValueError: [31m" + "wide " * 100)[:119] + "…",  # the table's width
    ]
    assert aliases(model_name) == {"champion": 1}  # the baseline, as when both fail the gate


def _predictions_wrong_on_test(layout, name_filter=lambda n: n != "baseline"):
    """Every candidate misclassifies every test image (the gate, on other images, still passes)."""
    frame = pd.read_csv(layout.predictions_csv)
    test = frame["split"] == "test"
    for column in [c for c in frame.columns if c not in ("split", "index", "label") and name_filter(c)]:
        frame.loc[test, column] = (frame.loc[test, "label"] + 1) % 10
    frame.to_csv(layout.predictions_csv, index=False)


def test_test_vetoes_a_winner_it_disagrees_with(evaluated, tmp_path, model_name):
    decision = promote_copy(
        evaluated, tmp_path / "1", model_name, "promote.tolerance=50", tamper=_predictions_wrong_on_test
    )
    assert decision.winner != "baseline" and decision.kind == "vetoed"
    assert decision.kind_reason.startswith("test disagrees") and decision.registry is None
    assert aliases(model_name) == {} and not MlflowClient().search_model_versions(f"name='{model_name}'")
    written = json.loads((tmp_path / "1/reports/promotion.json").read_text())
    assert written["verdict"] == "vetoed" and written["test"]["upper"] < -written["test"]["margin"]
    forced = promote_copy(
        evaluated,
        tmp_path / "2",
        model_name,
        "promote.tolerance=50",
        tamper=_predictions_wrong_on_test,
        force=True,
    )
    assert forced.forced and forced.kind == "champion" and "test disagrees" in forced.kind_reason


def test_a_champion_whose_files_are_gone_is_replaced_not_kept(evaluated, tmp_path, model_name):
    first = promote_copy(evaluated, tmp_path / "1", model_name)
    version = MlflowClient().get_model_version(model_name, "1")
    logged = MlflowClient().get_logged_model(version.source.removeprefix("models:/"))
    files = Path(urlparse(logged.artifact_location).path)
    shutil.rmtree(files)  # the champion's artefacts are deleted from the store
    again = promote_copy(evaluated, tmp_path / "2", model_name)  # the very same winner (same sha256)
    assert again.winner == first.winner and again.kind == "champion"
    assert "no longer loads" in again.kind_reason and aliases(model_name) == {"champion": 2}


@pytest.mark.slow
def test_a_registry_blip_fails_the_run_and_moves_nothing(evaluated, tmp_path, model_name, monkeypatch):
    """The champion's artefacts sit behind a real artefact server that then goes down."""
    port = free_port()
    server = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "server",
            "--artifacts-only",
            "--artifacts-destination",
            str(tmp_path / "art"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", server)
        experiment = f"remote-{model_name}"
        MlflowClient().create_experiment(
            experiment, artifact_location=f"http://127.0.0.1:{port}/api/2.0/mlflow-artifacts/artifacts/x"
        )
        params, layout = copy_project(evaluated, tmp_path / "1", f"promote.model_name={model_name}")
        run_promote(Context(params, layout, Tracker(tracking_uri(tmp_path), experiment)))
    finally:
        stop(server)
    assert aliases(model_name) == {"champion": 1}
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    params, layout = copy_project(
        evaluated, tmp_path / "2", f"promote.model_name={model_name}", "promote.tolerance=50"
    )
    ctx = Context(params, layout, Tracker(tracking_uri(tmp_path), experiment))
    with pytest.raises(PromotionError, match=r"could not load .*@champion v1.*no alias moved"):
        run_promote(ctx)
    assert aliases(model_name) == {"champion": 1}
    assert len(MlflowClient().search_model_versions(f"name='{model_name}'")) == 1
    assert not layout.promotion_json.exists()
    failed = ctx.tracker.search_runs("tags.`shrinkflow.stage` = 'promote'")
    assert sorted(run.info.status for run in failed) == ["FAILED", "FINISHED"]


def test_a_winner_for_another_task_is_refused(evaluated, tmp_path, model_name):
    promote_copy(evaluated, tmp_path / "1", model_name)

    def three_classes(layout):  # the same files, but the manifest now describes another task
        manifest = json.loads(layout.manifest.read_text())
        layout.manifest.write_text(json.dumps({**manifest, "classes": ["cat", "dog", "fox"]}))

    with pytest.raises(PromotionError, match=r"task differs .*classes .* vs .*set promote.model_name, e.g. "):
        promote_copy(evaluated, tmp_path / "2", model_name, "promote.tolerance=50", tamper=three_classes)
    assert aliases(model_name) == {"champion": 1}
    tags = MlflowClient().get_model_version(model_name, "1").tags
    assert (
        json.loads(tags["task_classes"]) == [str(d) for d in range(10)]
        and tags["task_input_shape"] == "1x8x8"
    )


def test_pointing_mlflow_at_a_store_for_a_block_leaves_the_process_as_it_was(tmp_path, monkeypatch):
    """MLflow's URI setters write the environment too: after registering into one store, a later
    store's models must still be found, in this process and in the processes it starts."""
    import mlflow

    first, second = (f"sqlite:///{tmp_path / name}.db" for name in ("first", "second"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", first)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    with _tracking(f"sqlite:///{tmp_path / 'elsewhere.db'}"):
        assert mlflow.get_registry_uri().endswith("elsewhere.db")
    assert "MLFLOW_REGISTRY_URI" not in os.environ and os.environ["MLFLOW_TRACKING_URI"] == first
    monkeypatch.setenv("MLFLOW_TRACKING_URI", second)  # the next project's store
    assert mlflow.get_tracking_uri() == second and mlflow.get_registry_uri() == second
