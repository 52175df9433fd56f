"""End to end: the Prefect flow and `dvc repro` on real digits data, real MLflow registry."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import BIN, REPO, small_raw

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _write_params(root, *overrides):
    (root / "params.yaml").write_text(yaml.safe_dump(small_raw(*overrides), sort_keys=False))
    return root / "params.yaml"


def _accuracy_in_fresh_process(uri: str, root) -> float:
    """Load the model the way a reviewer would, in a new interpreter, and score the test split."""
    code = f"""
import mlflow, torch
from tasks.engine import accuracy
model = mlflow.pyfunc.load_model({uri!r})
test = torch.load({str(root / "data/prepared/test.pt")!r}, weights_only=True)
print(accuracy(torch.from_numpy(model.predict(test["x"].numpy()).argmax(1)), test["y"]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    return float(out.stdout.strip().splitlines()[-1])


def test_flow_registers_the_smallest_model_within_tolerance(tmp_path, prefect_server):
    from flows.pipeline import run

    name = "flow-e2e"
    params_file = _write_params(tmp_path, f"promote.model_name={name}")
    decision = run(params_file, root=tmp_path)

    promotion = json.loads((tmp_path / "reports/promotion.json").read_text())
    assert promotion["winner"] == decision["winner"]
    client = MlflowClient()
    version = client.get_model_version_by_alias(name, "champion")
    assert str(version.version) == promotion["registry"]["version"]
    assert version.tags["strategy"] == promotion["strategy"]
    assert float(version.tags["test_acc"]) == promotion["test_acc"]
    assert float(version.tags["baseline_val_acc"]) == promotion["baseline_val_acc"]
    manifest = json.loads((tmp_path / "data/prepared/manifest.json").read_text())
    assert version.tags["data_fingerprint"] == manifest["fingerprint"]
    assert version.tags["prefect_flow_run_id"]

    table = __import__("pandas").read_csv(tmp_path / "reports/candidates.csv")
    row = table[table["name"] == promotion["winner"]].iloc[0]
    assert int(version.tags["params"]) == row["params"] and int(version.tags["flops"]) == row["flops"]
    eligible = table[table["val_acc"] >= promotion["min_val_acc"]]
    assert row["params"] == eligible["params"].min(), "the winner is the smallest eligible model"

    # One parent run, with a nested run per stage and per candidate.
    parent = client.get_run(promotion["registry"]["run_id"]).data.tags["mlflow.parentRunId"]
    children = client.search_runs(
        [client.get_run(parent).info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'"
    )
    assert sorted(r.info.run_name for r in children) == sorted(
        ["prepare", "baseline", "w50", "l1-50", "evaluate", "promote"]
    )
    assert all(r.info.status == "FINISHED" for r in children)
    w50 = next(r for r in children if r.info.run_name == "w50")
    assert len(client.get_metric_history(w50.info.run_id, "epoch/val_acc")) == 4  # one point per epoch
    assert "test_acc" in w50.data.metrics

    assert _accuracy_in_fresh_process(f"models:/{name}@champion", tmp_path) == promotion["test_acc"]


def test_dvc_repro_runs_the_same_pipeline_and_then_does_nothing(tmp_path):
    for item in ("dvc.yaml", "pyproject.toml", ".dvc", ".dvcignore", "tasks", "models", "flows"):
        src = REPO / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / item)
    shutil.rmtree(tmp_path / ".dvc/tmp", ignore_errors=True)
    shutil.rmtree(tmp_path / ".dvc/cache", ignore_errors=True)
    _write_params(tmp_path, "promote.model_name=dvc-e2e")
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    git = ["git", "-c", "user.email=ci@example.com", "-c", "user.name=ci"]
    subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*git, "add", "-A"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "init"], cwd=tmp_path, check=True)

    first = subprocess.run([str(BIN / "dvc"), "repro"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stdout + first.stderr
    ran = [line for line in first.stdout.splitlines() if line.startswith("Running stage")]
    assert len(ran) == 6, ran  # prepare, baseline, 2 candidates, evaluate, promote
    promotion = json.loads((tmp_path / "reports/promotion.json").read_text())
    champion = MlflowClient().get_model_version_by_alias("dvc-e2e", "champion")
    assert str(champion.version) == promotion["registry"]["version"]
    assert (tmp_path / "dvc.lock").exists()

    second = subprocess.run([str(BIN / "dvc"), "repro"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert second.returncode == 0
    assert "Running stage" not in second.stdout
    assert "Data and pipelines are up to date" in second.stdout
