"""The registry is verified, not trusted (issue #21): checkpoints checked against their recorded
sha256 wherever they load, alias moves that cannot skip a comparison, registrations completed
rather than duplicated, and interruptions that leave no decision the registry contradicts.
Real MLflow stores (sqlite, and a real `mlflow server` for the races), real processes, real signals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from shrinkflow.flows.cli import app
from shrinkflow.tasks.pipeline.stages import Context, run_promote
from shrinkflow.tasks.promotion.promote import PromotionError
from shrinkflow.tasks.store.tracking import Tracker, tracking_uri
from tests.conftest import (
    REPO,
    aliases,
    copy_project,
    gate_refuses_all,
    mlflow_server_at,
    promote_copy,
    run_cli,
    stored_checkpoint,
)

RACER = REPO / "tests" / "promote_racer.py"
SMALL_WINS = ("promote.tolerance=50", "promote.champion_tolerance=100")  # a small candidate wins


# 1. verify the bytes --------------------------------------------------------------------------


@pytest.mark.parametrize("checksum_too", [False, True], ids=["checkpoint", "checkpoint-and-its-sha256-file"])
def test_a_swapped_champion_is_refused_when_served_and_replaced_by_the_next_run(
    evaluated, tmp_path, model_name, checksum_too
):
    first = promote_copy(evaluated, tmp_path / "1", model_name)
    stored = stored_checkpoint(model_name, "1")
    other = next(
        p for p in (tmp_path / "1/artifacts").rglob("model.pt") if p.read_bytes() != stored.read_bytes()
    )
    shutil.copyfile(other, stored)  # another valid checkpoint of the same task
    if checksum_too:  # whoever swapped it also rewrote the file beside it: the registry's tag still knows
        from shrinkflow.models.checkpoint import sha256_file

        stored.with_name("model.pt.sha256").write_text(sha256_file(stored) + "\n")
    else:
        with pytest.raises(Exception, match=r"sha256 .* expected") as refused:
            mlflow.pyfunc.load_model(f"models:/{model_name}@champion")
        assert len(str(refused.value).strip().splitlines()) == 1
    again = promote_copy(evaluated, tmp_path / "2", model_name)  # the very same winner as v1 claims to be
    assert again.winner == first.winner and again.kind == "champion", again.kind_reason
    assert "sha256" in again.kind_reason and "registry recorded" in again.kind_reason
    assert aliases(model_name) == {"champion": 2}
    assert not again.champion_before.loads and "sha256" in again.champion_before.error


def test_a_champion_that_does_not_score_its_record_is_reported(evaluated, tmp_path, model_name):
    first = promote_copy(evaluated, tmp_path / "1", model_name)
    MlflowClient().set_model_version_tag(model_name, "1", "test_acc", "12.5")  # its record, edited
    again = promote_copy(evaluated, tmp_path / "2", model_name)
    assert again.kind == "unchanged"
    measured = f"champion v1 scores {first.test_acc:.2f} on the test images it was certified on"
    assert f"{measured}, but its record says 12.50" in again.warning
    assert "record says 12.50" in (tmp_path / "2/reports/report.md").read_text()


def test_served_pixels_beyond_the_data_scale_are_refused(evaluated, tmp_path, model_name):
    promote_copy(evaluated, tmp_path / "1", model_name)
    model = mlflow.pyfunc.load_model(f"models:/{model_name}@champion")
    images = np.full((2, 1, 8, 8), 16, dtype=np.uint8)  # digits are 0-16
    assert len(model.predict(images)) == 2
    images[0, 0, 0, 0] = 255
    with pytest.raises(mlflow.exceptions.MlflowException, match=r"pixel values must lie in \[0, 16\].* 255"):
        model.predict(images)


# 2. alias moves that cannot lose a comparison ------------------------------------------------


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    with mlflow_server_at(tmp_path_factory.mktemp("race-server"), workers=2) as url:
        yield url


def _racer(root: Path, env: dict, *args: str) -> subprocess.Popen:
    """``shrinkflow stage promote`` in ``root`` that pauses after registering until ``root/go``."""
    return subprocess.Popen(
        [sys.executable, str(RACER), "-p", str(root / "params.yaml"), *args],
        cwd=root,
        env={**os.environ, **env, "RACER_READY": str(root / "ready"), "RACER_GO": str(root / "go")},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path: Path, proc: subprocess.Popen) -> None:
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.1)


def _finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]


def _decision(root: Path) -> dict:
    return json.loads((root / "reports/promotion.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("paused", ["small", "big"])
def test_two_processes_promoting_into_one_server_never_skip_a_comparison(
    evaluated, tmp_path, mlflow_server, paused
):
    """The small model (certified against the big one, it deserves @champion whatever the order)
    and the big baseline promote at once: one waits between its comparison and its alias move
    while the other completes. The late one must compare again with the champion it finds."""
    name = f"race-{paused}-{uuid.uuid4().hex[:6]}"
    env = {"MLFLOW_TRACKING_URI": mlflow_server}
    small, big = tmp_path / "small", tmp_path / "big"
    copy_project(evaluated, small, f"promote.model_name={name}", *SMALL_WINS)
    _, layout = copy_project(evaluated, big, f"promote.model_name={name}")
    gate_refuses_all(layout)
    late, early = (small, big) if paused == "small" else (big, small)
    (early / "go").touch()
    waiting = _racer(late, env)
    _wait_for(late / "ready", waiting)  # registered, compared with "no champion yet", paused
    _finish(_racer(early, env))
    assert _decision(early)["verdict"] == "champion"
    (late / "go").touch()
    _finish(waiting)
    client = MlflowClient(mlflow_server, mlflow_server)
    small_v, big_v = (int(_decision(root)["registry"]["version"]) for root in (small, big))
    late_decision = _decision(late)
    assert "compared again" in late_decision["verdict_reason"], late_decision["verdict_reason"]
    assert late_decision["champion_before"]["version"] == _decision(early)["registry"]["version"]
    if paused == "small":  # the big one was champion for a moment; the small one replaced it, compared
        assert (
            late_decision["verdict"] == "champion"
            and "smaller than champion" in late_decision["verdict_reason"]
        )
        assert aliases(name, client) == {"champion": small_v}
    else:  # the small champion was never replaced by the big one that had not compared with it
        assert late_decision["verdict"] == "challenger"
        assert aliases(name, client) == {"champion": small_v, "challenger": big_v}
    holds = {version: alias for alias, version in aliases(name, client).items()}
    for version in client.search_model_versions(f"name='{name}'"):
        assert version.tags["registration"] == "complete"
        # The verdict tag follows the aliases: a champion replaced in the race reads retired.
        assert version.tags["verdict"] == holds.get(int(version.version), "retired")
    assert not client.search_registered_models(f"name='{name}.alias-lock'"), "the lock is released"


# 3. idempotent registration -------------------------------------------------------------------


def test_a_rerun_completes_the_version_a_killed_run_registered(evaluated, tmp_path, model_name):
    params, layout = copy_project(evaluated, tmp_path / "1", f"promote.model_name={model_name}")
    killed = _racer(layout.root, {})
    _wait_for(layout.root / "ready", killed)  # v1 registered, its alias not yet moved
    killed.kill()
    killed.wait()
    (orphan,) = MlflowClient().search_model_versions(f"name='{model_name}'")
    assert orphan.tags["registration"] == "pending" and orphan.tags["verdict"] == "champion"
    assert not layout.promotion_json.exists()
    again = run_promote(
        Context(params, layout, Tracker(tracking_uri(layout.root), params.tracking.experiment))
    )
    assert again.kind == "champion" and again.registry.version == "1"
    (completed,) = MlflowClient().search_model_versions(f"name='{model_name}'")
    assert completed.tags["registration"] == "complete" and aliases(model_name) == {"champion": 1}


# 4. interruption and a failing disk ------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_promotion_ends_killed_and_leaves_no_stale_decision(
    evaluated, tmp_path, model_name, sig
):
    experiment = f"interrupted-{uuid.uuid4().hex[:6]}"
    _, layout = copy_project(
        evaluated, tmp_path, f"promote.model_name={model_name}", f"tracking.experiment={experiment}"
    )
    layout.promotion_json.write_text('{"winner": "an earlier run"}')  # an earlier decision
    layout.report_md.write_text("# an earlier run\n")
    proc = _racer(layout.root, {})
    try:
        _wait_for(layout.root / "ready", proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and "Traceback" not in err, err[-3000:]
    assert not layout.promotion_json.exists() and not layout.report_md.exists()
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert [run.info.status for run in runs] == ["KILLED"]
    assert not client.get_registered_model(model_name).aliases, "no alias moved"


def test_a_decision_that_cannot_be_written_undoes_the_alias_move(evaluated, tmp_path, model_name):
    promote_copy(evaluated, tmp_path / "1", model_name, tamper=gate_refuses_all)  # v1: the baseline

    def unwritable_report(layout):  # report.md cannot be replaced: a real OSError from the OS
        (layout.report_md / "x").mkdir(parents=True)

    with pytest.raises(PromotionError) as failed:
        promote_copy(evaluated, tmp_path / "2", model_name, *SMALL_WINS, tamper=unwritable_report)
    message = str(failed.value)
    assert len(message.splitlines()) == 1
    assert "could not write the decision" in message and "@champion is v1 again" in message, message
    assert f"Is a directory: '{tmp_path / '2/reports/report.md'}'" in message, "the file, not a temporary"
    assert aliases(model_name) == {"champion": 1}
    assert not (tmp_path / "2/reports/promotion.json").exists()
    (promote_run,) = mlflow.search_runs(
        search_all_experiments=True,
        filter_string="tags.`shrinkflow.stage` = 'promote'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="list",
    )
    assert (
        promote_run.info.status == "FAILED" and "could not write" in promote_run.data.tags["shrinkflow.error"]
    )
    assert MlflowClient().get_model_version(model_name, "2").tags["registration"] == "pending"
    # Once the disk is fixed the next run completes v2 instead of registering a v3.
    shutil.rmtree(tmp_path / "2")
    done = promote_copy(evaluated, tmp_path / "2", model_name, *SMALL_WINS)
    assert done.kind == "champion" and done.registry.version == "2"
    assert aliases(model_name) == {"champion": 2}


# 7. untrusted registry contents ----------------------------------------------------------------


def test_an_untagged_foreign_champion_is_refused_with_the_fix_and_force_replaces_it(
    evaluated, tmp_path, model_name
):
    donor = f"{model_name}-donor"
    promote_copy(evaluated, tmp_path / "0", donor)
    client = MlflowClient()
    client.create_registered_model(model_name)
    source = client.get_model_version(donor, "1").source
    client.create_model_version(model_name, source=source)  # by hand: no shrinkflow tags
    client.set_registered_model_alias(model_name, "champion", "1")
    with pytest.raises(PromotionError, match=r"v1 carries no task tags.*--force"):
        promote_copy(evaluated, tmp_path / "1", model_name)
    forced = promote_copy(evaluated, tmp_path / "2", model_name, force=True)
    assert forced.kind == "champion" and forced.forced, forced.kind_reason
    assert "is for another task (v1 carries no task tags" in forced.kind_reason
    assert aliases(model_name) == {"champion": 2}


# 8. the project is where the params file is ----------------------------------------------------


def test_commands_default_to_the_params_files_directory(evaluated, tmp_path, monkeypatch):
    copy_project(evaluated, tmp_path / "project")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = run_cli("report", "-p", str(tmp_path / "project/params.yaml"), cwd=elsewhere)
    assert done.returncode == 0, done.stderr
    assert "baseline" in done.stdout and not list(elsewhere.iterdir())
    # A stage too: its outputs, lock and log go beside the params file, not into the cwd.
    monkeypatch.chdir(elsewhere)
    (tmp_path / "project/data/prepared/manifest.json").unlink()
    result = CliRunner().invoke(app, ["stage", "prepare", "-p", "../project/params.yaml"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "project/data/prepared/manifest.json").exists() and not list(elsewhere.iterdir())


BROKEN_DECISIONS = [
    ("cut short", '{"winner": "w50", "strat', "cannot be read"),
    ("not an object", "[1, 2]", "is not a decision (a JSON list)"),
    ("an unknown verdict", '{"winner": "w50", "verdict": "crowned"}', "is not a complete decision"),
]


@pytest.mark.parametrize(("case", "text", "says"), BROKEN_DECISIONS, ids=[c[0] for c in BROKEN_DECISIONS])
def test_a_broken_decision_file_is_one_line_under_report(evaluated, tmp_path, case, text, says):
    _, layout = copy_project(evaluated, tmp_path)
    layout.promotion_json.write_text(text)
    result = CliRunner().invoke(app, ["report", "-p", str(tmp_path / "params.yaml")])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert result.stderr.startswith(f"error: {layout.promotion_json} {says}"), result.stderr
    assert "shrinkflow stage promote" in result.stderr and len(result.stderr.strip().splitlines()) == 1
