"""Faults and bad input: clear one-line errors, nothing half-written, no bad promotion."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient
from typer.testing import CliRunner

from shrinkflow.flows.cli import app
from shrinkflow.tasks.io import atomic_path, sweep_temporaries, write_json
from tests.conftest import BIN, copy_project, small_raw, write_params


def _run_count() -> int:
    return len(mlflow.search_runs(search_all_experiments=True, output_format="list"))


def _versions() -> int:
    return len(MlflowClient().search_model_versions())


BAD_PARAMS = [
    ("unknown key", {"colour": "red"}, "colour"),
    ("unknown nested key", {"train": {"epoch": 3}}, "train.epoch"),
    ("wrong type", {"train": {"batch_size": "lots"}}, "'lots'"),
    ("negative tolerance", {"promote": {"tolerance": -1}}, "-1"),
    ("ratio of one", {"shrink": {"candidates": {"w": {"strategy": "width", "ratio": 1.0}}}}, "1.0"),
    ("negative ratio", {"shrink": {"candidates": {"w": {"strategy": "width", "ratio": -0.5}}}}, "-0.5"),
    ("empty strategy list", {"shrink": {"candidates": {}}}, "shrink.candidates"),
    ("unknown strategy", {"shrink": {"candidates": {"w": {"strategy": "zap", "ratio": 0.5}}}}, "zap"),
    ("unknown architecture", {"model": {"arch": "vgg99"}}, "vgg99"),
    ("unknown data source", {"data": {"source": "imagenet"}}, "imagenet"),
    ("zero epochs", {"train": {"epochs": 0}}, "train.epochs"),
    ("string seed", {"seed": "forty"}, "'forty'"),
    ("unknown objective", {"promote": {"objective": "vibes"}}, "vibes"),
    ("same aliases", {"promote": {"alias": "x", "challenger_alias": "x"}}, "challenger_alias"),
    (
        "dotted candidate name",
        {"shrink": {"candidates": {"a.b": {"strategy": "width", "ratio": 0.5}}}},
        "a.b",
    ),
    ("section is not a mapping", {"train": [1, 2]}, "train"),
    ("infinite lr", {"train": {"lr": float("inf")}}, "train.lr"),
    ("nan lr", {"train": {"lr": float("nan")}}, "train.lr"),
    ("absurd image size", {"data": {"image_size": 3_000_000}}, "data.image_size"),
]


def _merge(base: dict, patch: dict) -> dict:
    out = dict(base)
    for key, value in patch.items():
        out[key] = _merge(base[key], value) if isinstance(value, dict) and value and key in base else value
    return out


def _assert_refused(tmp_path: Path, params_text: str, named: str) -> None:
    (tmp_path / "params.yaml").write_text(params_text)
    runs, versions = _run_count(), _versions()
    result = CliRunner().invoke(app, ["run", "-p", str(tmp_path / "params.yaml"), "--root", str(tmp_path)])
    assert result.exit_code != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert named in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"], "no outputs written"
    assert (_run_count(), _versions()) == (runs, versions), "no MLflow runs or versions created"


@pytest.mark.parametrize(("case", "patch", "named"), BAD_PARAMS, ids=[c[0] for c in BAD_PARAMS])
def test_bad_params_file_is_refused_cleanly(tmp_path, case, patch, named):
    _assert_refused(tmp_path, yaml.safe_dump(_merge(small_raw(), patch)), named)


def test_yaml_syntax_error_is_refused_cleanly(tmp_path):
    _assert_refused(tmp_path, "seed: 0\ntrain: {epochs: 3\n", "YAML syntax error at line")


BOMB = "&a [x, x, x, x, x, x, x, x, x, x]" + "".join(
    f", &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]" for i in range(8)
)  # nine levels of ten aliases each: 10^9 values once expanded


def test_deep_or_exploding_yaml_is_refused_in_one_short_line(tmp_path):
    _assert_refused(tmp_path, "seed: " + "[" * 5000 + "]" * 5000 + "\n", "nested deeper than 32 levels")
    _assert_refused(tmp_path, f"seed: [{BOMB}]\n", "more than 100000 values once aliases are expanded")


def test_an_alias_bomb_in_an_override_is_one_short_line(tmp_path):
    write_params(tmp_path)
    result = CliRunner().invoke(app, ["run", "-p", str(tmp_path / "params.yaml"), "-s", f"seed=[{BOMB}]"])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and len(lines[0]) < 400, result.stderr[:1000]
    assert "once aliases are expanded" in lines[0] and "... (" in lines[0], "a short quoted prefix"


def test_bad_override_is_refused_cleanly(tmp_path):
    write_params(tmp_path)
    result = CliRunner().invoke(app, ["run", "-p", str(tmp_path / "params.yaml"), "-s", "train.lr=-1"])
    assert result.exit_code != 0 and "train.lr" in result.stderr and "-1" in result.stderr


def test_unreachable_mlflow_fails_fast_and_clearly(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once the socket closes
    write_params(tmp_path)
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
    }
    out = subprocess.run(
        [str(BIN / "shrinkflow"), "stage", "prepare"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 1
    assert f"error: MLflow tracking at http://127.0.0.1:{port} is unreachable" in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [".shrinkflow", "params.yaml"]  # the log
    assert [p.name for p in (tmp_path / ".shrinkflow").iterdir()] == ["shrinkflow.log"]


def test_all_candidates_failing_leaves_the_measured_baseline_standing(tmp_path, prefect_server):
    from shrinkflow.flows.pipeline import run

    raw = small_raw(
        "promote.model_name=all-fail", "shrink.candidates.w50.lr=1e6", "shrink.candidates.l1-50.lr=1e6"
    )
    write_params(tmp_path, raw=raw)
    decision = run(tmp_path / "params.yaml", root=tmp_path)  # as when every candidate fails the gate
    assert decision["winner"] == "baseline" and decision["verdict"] == "champion"
    assert "not measured: l1-50, w50" in decision["reason"]
    version = MlflowClient().get_model_version_by_alias("all-fail", "champion")
    assert version.tags["candidate"] == "baseline"
    assert json.loads((tmp_path / "reports/promotion.json").read_text())["winner"] == "baseline"


def test_concurrent_promotions_leave_aliases_on_validated_versions(evaluated, tmp_path):
    procs = []
    for i, tolerance in enumerate((50, 0)):  # two different winners, promoted at the same moment
        root = tmp_path / str(i)
        root.mkdir()
        copy_project(evaluated, root, "promote.model_name=concurrent", f"promote.tolerance={tolerance}")
        procs.append(
            subprocess.Popen(
                [str(BIN / "shrinkflow"), "stage", "promote"],
                cwd=root,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outcomes = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    assert [code for _, _, code in outcomes] == [0, 0], [err[-2000:] for _, err, _ in outcomes]
    client = MlflowClient()
    versions = {v.version: v for v in client.search_model_versions("name='concurrent'")}
    assert len(versions) == 2
    for alias, version in client.get_registered_model("concurrent").aliases.items():
        tags = versions[version].tags
        assert tags["verdict"] in ("champion", "challenger"), (alias, tags)
        loaded = mlflow.pyfunc.load_model(f"models:/concurrent@{alias}")  # every alias loads
        assert loaded.metadata.signature is not None


def test_atomic_write_keeps_the_old_file_when_the_writer_dies(tmp_path):
    target = tmp_path / "out" / "metrics.json"
    write_json(target, {"v": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text('{"v": 2, "trunc')
        raise RuntimeError("killed mid-write")
    assert target.read_text() == '{\n  "v": 1\n}\n'
    assert [p.name for p in target.parent.iterdir()] == ["metrics.json"]


def test_sweep_removes_only_what_a_killed_writer_left(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"finished")
    (tmp_path / ".model.pt.abc123.tmp").write_bytes(b"half")
    removed = sweep_temporaries(tmp_path)
    assert [p.name for p in removed] == [".model.pt.abc123.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


@pytest.mark.slow
@pytest.mark.scenario
def test_run_killed_during_shrink_resumes_without_redoing_finished_work(tmp_path):
    """SIGKILL the flow once one candidate has finished and another is training; the second run
    reuses the baseline and the finished candidate, trains the rest, and registers once."""
    raw = small_raw(
        "promote.model_name=resumed",
        "shrink.workers=1",  # candidates run in declaration order: quick, then slow
        "shrink.candidates={quick: {strategy: width, ratio: 0.5},"
        " slow: {strategy: prune_l1, ratio: 0.5, epochs: 200}}",
    )
    write_params(tmp_path, raw=raw)
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / ".prefect"), "CI": "1"}
    cmd = [str(BIN / "shrinkflow"), "run"]
    first = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    quick_done = tmp_path / "artifacts/candidates/quick/record.json"
    deadline = time.monotonic() + 300
    while not quick_done.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # "slow" is now training
    os.killpg(first.pid, signal.SIGKILL)  # the whole run, its Prefect server included, as in a crash
    first.wait()
    assert quick_done.exists() and not (tmp_path / "artifacts/candidates/slow/model.pt").exists()
    # What a kill during a write leaves behind; the restart must clear it.
    (tmp_path / "artifacts/candidates/slow").mkdir(parents=True, exist_ok=True)
    orphan = tmp_path / "artifacts/candidates/slow/.model.pt.x1y2z3.tmp"
    orphan.write_bytes(b"half a checkpoint")
    quick_sha = json.loads(quick_done.read_text())["sha256"]

    # "slow" has to be trained again either way; a short budget keeps the test short and shows
    # that a changed candidate leaves the others' cache entries alone.
    again = [*cmd, "-s", "shrink.candidates.slow.epochs=2"]
    second = subprocess.run(again, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    # The run's log (Prefect's task and flow records included) is kept in the project.
    log = (tmp_path / ".shrinkflow/shrinkflow.log").read_text().split("shrinkflow run in ")[-1]
    assert "baseline reused from cache" in log
    assert "quick reused from cache" in log
    assert "slow reused from cache" not in log
    assert json.loads(quick_done.read_text())["sha256"] == quick_sha
    assert not orphan.exists() and not list(tmp_path.rglob("*.tmp"))
    assert len(MlflowClient().search_model_versions("name='resumed'")) == 1
