"""End to end: the Prefect flow on real digits data, real MLflow registry (`dvc repro` end to end
is in test_repro.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from shrinkflow.tasks.measurement.evaluate import load_table
from shrinkflow.tasks.store.registry import version_record
from tests.conftest import write_params

pytestmark = pytest.mark.slow


def _artifact_keys(flow_run_id: str) -> set[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {artifact.key for artifact in found}


def _accuracy_in_fresh_process(uri: str, root) -> float:
    """Load the model the way a reviewer would, in a new interpreter, and score the test split."""
    code = f"""
import mlflow, torch
from shrinkflow.tasks.config import load_params
from shrinkflow.tasks.training.engine import accuracy
from shrinkflow.tasks.layout import Layout
from shrinkflow.tasks.data.prepare import load_raw_split
from shrinkflow.tasks.records import load_manifest

layout = Layout.from_params(load_params("params.yaml"), ".")
x, y = load_raw_split(layout, "test")  # raw uint8 pixels, as a user has them
labels = mlflow.pyfunc.load_model({uri!r}).predict(x.numpy())["label"]
classes = load_manifest(layout).classes
print(accuracy(torch.tensor([classes.index(label) for label in labels]), y))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    return float(out.stdout.strip().splitlines()[-1])


def test_flow_registers_the_smallest_model_within_tolerance(tmp_path, prefect_server):
    """Includes a candidate whose loss diverges: it is marked failed and the flow finishes."""
    from shrinkflow.flows.pipeline import run

    name = "flow-e2e"
    params_file = write_params(
        tmp_path,
        f"promote.model_name={name}",
        # "nan" diverges, and is also a name pandas reads as missing unless told otherwise
        "shrink.candidates.nan={strategy: width, ratio: 0.5, lr: 1e6}",
    )
    decision = run(params_file, root=tmp_path)

    promotion = json.loads((tmp_path / "reports/promotion.json").read_text())
    assert promotion["winner"] == decision["winner"]
    client = MlflowClient()
    version = client.get_model_version_by_alias(name, "champion")
    assert str(version.version) == promotion["registry"]["version"]
    record = version_record(client, name, version.version)  # the few tags and every other figure
    assert record["strategy"] == promotion["strategy"]
    assert float(version.tags["test_acc"]) == promotion["test_acc"]
    assert float(record["baseline_val_acc"]) == promotion["baseline_val_acc"]
    manifest = json.loads((tmp_path / "data/prepared/manifest.json").read_text())
    assert version.tags["data_fingerprint"] == manifest["fingerprint"]
    assert _artifact_keys(version.tags["prefect_flow_run_id"]) == {"shrink-report", "candidates"}
    assert (tmp_path / "reports/pareto.png").stat().st_size > 10_000

    table = load_table(tmp_path / "reports/candidates.csv")
    row = table[table["name"] == promotion["winner"]].iloc[0]
    assert int(version.tags["params"]) == row["params"] and int(record["flops"]) == row["flops"]
    certified = table[table["name"].isin(promotion["eligible"])]
    assert row["params"] == certified["params"].min(), "the winner is the smallest certified model"
    assert record["certified_by"] == promotion["certified_by"] and promotion["multiplicity"]

    # One parent run, with a nested run per stage and per candidate.
    parent = client.get_run(promotion["registry"]["run_id"]).data.tags["mlflow.parentRunId"]
    children = client.search_runs(
        [client.get_run(parent).info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'"
    )
    assert sorted(r.info.run_name for r in children) == sorted(
        ["prepare", "baseline", "w50", "l1-50", "nan", "evaluate", "promote"]
    )
    status = {r.info.run_name: r.info.status for r in children}
    assert status.pop("nan") == "FAILED" and set(status.values()) == {"FINISHED"}
    failed = next(r for r in children if r.info.run_name == "nan")
    assert "TrainingDiverged" in failed.data.tags["shrinkflow.error"]
    assert table.set_index("name").loc["nan", "status"] == "failed"
    assert "TrainingDiverged" in table.set_index("name").loc["nan", "error"]
    w50 = next(r for r in children if r.info.run_name == "w50")
    assert len(client.get_metric_history(w50.info.run_id, "epoch/val_acc")) == 4  # one point per epoch
    trained_in = json.loads((tmp_path / "artifacts/candidates/w50/record.json").read_text())["precision"]
    assert w50.data.params["precision"] == trained_in and trained_in.endswith("+cl")
    assert "test_acc" in w50.data.metrics

    assert _accuracy_in_fresh_process(f"models:/{name}@champion", tmp_path) == promotion["test_acc"]
