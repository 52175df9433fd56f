"""Failures under `shrinkflow run` and `shrinkflow stage`: one `error:` line (details in the log
file and MLflow), no MLflow run left RUNNING, tracking and Prefect-home faults in seconds, no stale
decision after a failed promotion, and artefacts that follow a copied project."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from mlflow import MlflowClient
from PIL import Image
from typer.testing import CliRunner

from shrinkflow.flows import reaper
from shrinkflow.flows.cli import app
from shrinkflow.tasks.measurement.evaluate import load_table
from shrinkflow.tasks.pipeline.stages import Context, run_promote
from shrinkflow.tasks.promotion.promote import PromotionError
from shrinkflow.tasks.store.tracking import Tracker, tracking_uri
from tests.conftest import BIN, copy_project, mlflow_server_process, run_cli, small_raw, stop, write_params


def _one_class_project(root: Path, *overrides: str) -> Path:
    """A project whose data (a single class) prepare refuses."""
    rng = np.random.default_rng(0)
    (root / "raw/cat").mkdir(parents=True)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(root / f"raw/cat/{i}.png")
    raw = small_raw("data.source=imagefolder", f"data.root={root / 'raw'}", *overrides)
    write_params(root, raw=raw)
    return root


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error") or "Traceback" in line]


def _runs(experiment: str) -> list:
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


def test_failed_stage_is_one_line_and_ends_its_mlflow_run_failed(tmp_path):
    root = _one_class_project(tmp_path, "tracking.experiment=failed-stage")
    done = run_cli("stage", "prepare", cwd=root)
    assert done.returncode == 1
    assert _error_lines(done.stderr) == [done.stderr.strip().splitlines()[-1]]
    assert "has one class" in done.stderr
    (run,) = _runs("failed-stage")
    assert run.info.status == "FAILED" and "has one class" in run.data.tags["shrinkflow.error"]
    assert "Traceback" in (root / ".shrinkflow/shrinkflow.log").read_text(), "details in the log file"


@pytest.mark.slow
def test_failed_run_is_one_line_and_leaves_no_mlflow_run_running(tmp_path):
    root = _one_class_project(tmp_path, "tracking.experiment=failed-run")
    # The temporary server's telemetry (offline here) is console noise of its own, issue #16's.
    env = {"PREFECT_HOME": str(tmp_path / "prefect"), "CI": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    done = run_cli("run", cwd=root, env=env)
    assert done.returncode == 1
    assert _error_lines(done.stderr) == [done.stderr.strip().splitlines()[-1]], done.stderr[-3000:]
    assert "Task run failed" not in done.stderr and "has one class" in done.stderr
    statuses = sorted(run.info.status for run in _runs("failed-run"))
    assert statuses == ["FAILED", "FAILED"], "the pipeline's parent run and its prepare run"
    log = (root / ".shrinkflow/shrinkflow.log").read_text()
    assert "shrinkflow run in" in log and "Task run failed with exception" in log and "Traceback" in log


def test_read_only_tracking_store_is_one_line_within_seconds(tmp_path):
    write_params(tmp_path)
    db = tmp_path / "store.db"
    Tracker(f"sqlite:///{db}", "shrinkflow")  # a real store, then opened read-only
    started = time.monotonic()
    done = run_cli(
        "stage", "prepare", cwd=tmp_path, env={"MLFLOW_TRACKING_URI": f"sqlite:///file:{db}?mode=ro&uri=true"}
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.strip() and " INFO " not in line]
    assert len(lines) == 1, done.stderr[-3000:]
    assert (
        lines[0].startswith("error: MLflow tracking at sqlite:///file:") and "readonly database" in lines[0]
    )
    assert elapsed < 60, f"took {elapsed:.0f} s"
    assert not (tmp_path / "data").exists()


def test_tracking_store_in_a_missing_directory_is_one_line(tmp_path):
    write_params(tmp_path)
    done = run_cli("stage", "prepare", cwd=tmp_path, env={"MLFLOW_TRACKING_URI": "sqlite:////nowhere/x/m.db"})
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "error: MLflow tracking store /nowhere/x/m.db cannot be written: its directory /nowhere/x does not "
        "exist; fix the permissions or point MLFLOW_TRACKING_URI elsewhere"
    ]


def test_unwritable_prefect_home_is_one_line_within_seconds(tmp_path):
    write_params(tmp_path)
    (tmp_path / "a-file").write_text("not a directory")
    started = time.monotonic()
    done = run_cli("run", cwd=tmp_path, env={"PREFECT_HOME": str(tmp_path / "a-file/prefect")})
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"error: PREFECT_HOME {tmp_path / 'a-file/prefect'} is not a writable directory (Not a directory); "
        "point PREFECT_HOME at one"
    ]
    assert time.monotonic() - started < 60
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "params.yaml"]


def test_failed_promotion_removes_the_previous_decision(evaluated, tmp_path):
    params, layout = copy_project(evaluated, tmp_path, "promote.model_name=stale-decision")
    layout.promotion_json.write_text('{"winner": "w50", "verdict": "champion"}\n')  # an earlier run's
    layout.report_md.write_text("# earlier report\n")
    table = load_table(layout.candidates_csv)
    table["status"] = "failed"  # failed candidates alone leave the baseline standing; no baseline refuses
    table.to_csv(layout.candidates_csv, index=False)
    ctx = Context(params, layout, Tracker(tracking_uri(tmp_path), params.tracking.experiment))
    with pytest.raises(PromotionError, match="baseline has no measurements"):
        run_promote(ctx)
    assert not layout.promotion_json.exists() and not layout.report_md.exists()
    assert layout.candidates_csv.exists(), "only the promote stage's own outputs go"


def test_copied_project_writes_artefacts_into_its_own_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # each project's own mlflow.db
    original, copy = tmp_path / "original", tmp_path / "copy"
    original.mkdir()
    first = Tracker.for_project(original, "follow")
    first.end_run(first.start_run("before the copy"))
    shutil.copytree(original, copy)
    tracker = Tracker.for_project(copy, "follow")
    run = tracker.start_run("after the copy")
    (tmp_path / "note.txt").write_text("hello")
    tracker.log_artifact(run, tmp_path / "note.txt")
    tracker.end_run(run)
    assert list((copy / "mlartifacts").rglob("note.txt")), "the copy's artefacts stay in the copy"
    assert not (original / "mlartifacts").exists() or not list((original / "mlartifacts").rglob("note.txt"))
    assert (
        Tracker.for_project(original, "follow").experiment().artifact_location
        == (original / "mlartifacts").as_uri()
    ), "the original is untouched"


def _start_run(root: Path, output: int, **popen) -> subprocess.Popen:
    """`shrinkflow run` in ``root`` as a background job, with its own Prefect home."""
    env = {**os.environ, "PREFECT_HOME": str(root / "prefect"), "CI": "1"}
    return subprocess.Popen(
        [str(BIN / "shrinkflow"), "run"], cwd=root, env=env, stdout=output, stderr=output, **popen
    )


@pytest.mark.slow
def test_sigkill_of_a_run_stops_its_temporary_prefect_server(tmp_path):
    write_params(tmp_path, "train.epochs=100000")  # only the kill ends it
    run = _start_run(tmp_path, subprocess.DEVNULL, start_new_session=True)
    servers: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 120
        while not servers and run.poll() is None and time.monotonic() < deadline:
            servers = reaper.servers_of(run.pid)
            time.sleep(0.2)
        assert servers, "the run started a temporary Prefect server"
        time.sleep(1.5)  # the watcher polls every 0.5 s
        run.send_signal(signal.SIGKILL)  # the run alone, as the OOM killer would
        run.wait(timeout=30)
        deadline = time.monotonic() + 30
        alive = lambda: [pid for pid, cmd in servers.items() if reaper.still_running(pid, cmd)]  # noqa: E731
        while alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive(), "the server died with its run"
    finally:
        if run.poll() is None:
            run.kill()
        for pid, cmd in servers.items():
            if reaper.still_running(pid, cmd):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_a_training_stage_ends_its_mlflow_run_killed(trained, tmp_path, sig):
    experiment = f"signalled-{sig.name}-{os.getpid()}"
    # Never done on its own, however slow the test is to see the run: only the signal ends it.
    copy_project(trained, tmp_path, "train.epochs=100000", f"tracking.experiment={experiment}")
    # As a terminal's Ctrl-C would: Python's own SIGINT handler even if this test runs in the background.
    restore = "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    main = "from shrinkflow.flows.cli import main; sys.argv = ['shrinkflow', 'stage', 'baseline']; main()"
    proc = subprocess.Popen(
        [str(BIN / "python"), "-c", restore + main], cwd=tmp_path, stderr=subprocess.PIPE, text=True
    )
    try:
        while not [run for run in _runs(experiment) if run.info.run_name == "baseline"]:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and "Traceback" not in err, err[-3000:]
    (run,) = _runs(experiment)
    # KeyboardInterrupt where the signal landed, or Stopped at the next batch where Python dropped it
    assert run.info.status == "KILLED" and f"signal {sig.name}" in run.data.tags["shrinkflow.error"]


def test_a_project_that_cannot_be_written_is_one_line(tmp_path):
    write_params(tmp_path)
    (tmp_path / ".shrinkflow").write_text("a file where the bookkeeping folder belongs")
    done = run_cli("stage", "prepare", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [done.stderr.strip()], done.stderr[-2000:]
    assert done.stderr.startswith(f"error: project {tmp_path} cannot be written: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".shrinkflow", "params.yaml"]


def test_a_tracking_server_that_dies_mid_stage_is_one_line(trained, tmp_path):
    copy_project(trained, tmp_path / "project", "train.epochs=30", "tracking.experiment=dies")
    (tmp_path / "server").mkdir()
    with mlflow_server_process(tmp_path / "server") as (url, server):
        env = {**os.environ, "MLFLOW_TRACKING_URI": url, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "CI": "1"}
        stage = subprocess.Popen(
            [str(BIN / "shrinkflow"), "stage", "baseline"],
            cwd=tmp_path / "project",
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            client = MlflowClient(url)
            while not (found := client.get_experiment_by_name("dies")) or not client.search_runs(
                [found.experiment_id]
            ):
                assert stage.poll() is None, stage.communicate()[1][-3000:]
                time.sleep(0.2)
            stop(server, grace=0)  # dies while the baseline trains; its results are logged at the end
            out, err = stage.communicate(timeout=300)
        finally:
            if stage.poll() is None:
                stage.kill()
    assert stage.returncode == 1, err[-3000:]
    assert _error_lines(err) == [err.strip().splitlines()[-1]], err[-3000:]
    assert err.strip().splitlines()[-1].startswith(f"error: MLflow tracking at {url} stopped answering (")
    assert "Connection refused" in err and out == "", out
    assert (tmp_path / "project/artifacts/baseline/model.pt").exists(), "the trained model stays"


@pytest.mark.scenario
def test_sigterm_during_the_fan_out_stops_every_candidate_promptly(trained, tmp_path):
    """A scheduler stopping `shrinkflow run` (SIGTERM) while candidates train in worker threads:
    they stop at their next batch, every MLflow run ends KILLED, no decision is written, one line."""
    experiment = f"terminated-{os.getpid()}"
    copy_project(trained, tmp_path, "shrink.epochs=100000", f"tracking.experiment={experiment}")
    run = _start_run(tmp_path, subprocess.PIPE)
    try:
        while not [r for r in _runs(experiment) if r.data.tags.get("shrinkflow.stage") == "shrink"]:
            assert run.poll() is None, run.communicate()[1][-3000:]
            time.sleep(0.5)
        time.sleep(2)  # in their epochs
        run.send_signal(signal.SIGTERM)
        out, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
    err = err.decode()
    assert run.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert _error_lines(err) == ["error: " + err.split("error: ", 1)[1].strip()], err[-3000:]
    assert "interrupted by SIGTERM" in err
    status = {r.info.run_name: r.info.status for r in _runs(experiment)}
    shrunk = {name: s for name, s in status.items() if name not in ("prepare", "baseline", "pipeline")}
    assert shrunk and set(shrunk.values()) == {"KILLED"}, status
    assert status["pipeline"] == "KILLED", status
    assert not (tmp_path / "reports/promotion.json").exists()


def _cut(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


DAMAGED = [  # (case, stage, what is done to the project, what the one line must say)
    (
        "prepared pixels cut short",
        ["baseline"],
        lambda root: _cut(root / "data/prepared/train-images.npy", 300),
        ["train-images.npy is damaged", "shrinkflow stage prepare"],
    ),
    (
        "manifest cut short",
        ["baseline"],
        lambda root: _cut(root / "data/prepared/manifest.json", 20),
        ["manifest.json is not valid JSON", "re-run the stage that writes it"],
    ),
    (
        "empty record",
        ["evaluate"],
        lambda root: (root / "artifacts/baseline/record.json").write_text(""),
        ["baseline/record.json is not valid JSON"],
    ),
    (
        "diverging baseline",
        ["baseline", "-s", "train.lr=1e6"],
        lambda root: None,
        ["training diverged in epoch 1 at lr 1e+06", "lower the lr"],
    ),
]


@pytest.mark.parametrize(("case", "stage", "damage", "says"), DAMAGED, ids=[c[0] for c in DAMAGED])
def test_damaged_project_files_are_one_line_naming_the_file(trained, tmp_path, case, stage, damage, says):
    copy_project(trained, tmp_path, "tracking.experiment=damaged")
    damage(tmp_path)
    result = CliRunner().invoke(app, ["stage", *stage, "-p", str(tmp_path / "params.yaml")])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error") or "Traceback" in line]
    assert len(errors) == 1 and all(part in errors[0] for part in says), result.stderr[-3000:]


@pytest.mark.scenario
def test_a_temporary_prefect_server_that_never_answers_is_one_line_and_left_running_nowhere(tmp_path):
    write_params(tmp_path)
    home = tmp_path / "prefect"
    env = {"PREFECT_HOME": str(home), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "1", "CI": "1"}
    done = run_cli("run", cwd=tmp_path, env=env)
    assert done.returncode == 1, done.stderr[-3000:]
    assert _error_lines(done.stderr) == [done.stderr.strip()], done.stderr[-3000:]
    assert "temporary API server did not answer within 1 s, 2 times" in done.stderr
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in done.stderr

    def ours(proc: psutil.Process) -> bool:
        try:
            return proc.environ().get("PREFECT_HOME") == str(home)
        except psutil.Error:
            return False

    # The run's watcher (flows/reaper.py) outlives it by a second or more by design, longer on a
    # loaded machine; it and the server it stops must both be gone soon after, not at once.
    _, alive = psutil.wait_procs([p for p in psutil.process_iter() if ours(p)], timeout=20)
    assert not [p.cmdline() for p in alive], "a server too slow to answer is stopped, and its watcher ends"
