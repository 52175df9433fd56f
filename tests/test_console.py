"""A `shrinkflow run` of the default params on a fresh machine prints the candidates table and the
verdict, within 120 columns, and nothing else: no traceback, none of the warnings our own use of
Prefect, torch, MLflow and pandas used to cause, none of their chatter (that goes to the log file).
Every default candidate runs (each strategy, int8, distillation, the budget allocation and the
search); only the epochs are cut, which no printed line depends on. The same run shows Prefect and
MLflow pointing at each other: a named, tagged flow run whose report links to the MLflow runs,
which carry the flow run's id and name."""

from __future__ import annotations

import json
import re
import shutil
import sqlite3

import pytest
from mlflow.tracking import MlflowClient

from shrinkflow.tasks.config import load_params
from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.slow

FORMERLY_PRINTED = (
    "Traceback",
    "database is locked",  # the temporary Prefect server's telemetry write
    "TypedStorage is deprecated",  # loading an int8 checkpoint
    "Add type hints to the `predict` method",  # the pyfunc model
    "Pandas4Warning",  # MLflow's log_table on pandas 3 strings
    "Downloading artifacts",  # MLflow's progress bars
)
CHATTER = (  # still written, to .shrinkflow/shrinkflow.log only
    "Creating initial MLflow database tables",
    "Updating database tables",
    "Validating input example",  # MLflow's pyfunc
    "Starting temporary server",  # Prefect's banner
    "prefect.io/docs",
    "_pytree",  # torch, while the int8 candidate is quantised
    "onnxscript",
)
PYTHON_WARNING = re.compile(r"\w+Warning: ")  # PYTHONWARNINGS=default would show every one
WIDTH = 120
VERDICT = ("Winner:", "Gate:", "Why this model:", "Certified by:", "Test (may only veto):")
VERDICT += ("Against the registry:", "Warning:")
TABLE_HEAD = ["name", "composition"]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The one `shrinkflow run` of every default candidate: (its output, the project)."""
    root = tmp_path_factory.mktemp("console")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    env = {
        "PREFECT_HOME": str(root / "prefect"),  # a first run: the temporary server starts afresh
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "PYTHONWARNINGS": "default",  # deprecation warnings shown too, once per place
    }
    return run_cli("run", "-s", "train.epochs=3", "-s", "shrink.epochs=1", cwd=root, env=env), root


def test_a_run_of_every_default_candidate_prints_only_the_table_and_verdict(default_run):
    done, root = default_run
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    for text in (*FORMERLY_PRINTED, *CHATTER):
        assert text not in output, f"{text!r} in:\n{output[-5000:]}"
    assert not PYTHON_WARNING.search(output), output[-5000:]
    assert done.stderr == "", "in a pipe nothing is drawn: no progress, no warning"
    too_wide = [line for line in output.splitlines() if len(line) > WIDTH]
    assert not too_wide, "\n".join(too_wide)
    lines = done.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == TABLE_HEAD)
    assert sum(line.split()[:2] == TABLE_HEAD for line in lines) == 1, "the table is printed once"
    end = header + 3 + len(load_params(root / "params.yaml").shrink.candidates)  # head, rule, baseline
    table = lines[header:end]
    assert any("l1-50-int8" in row and "prune_l1+int8" in row for row in table)
    assert any("l1-75-kd" in row and "prune_l1+distill" in row for row in table)
    assert any("ladder-10" in row and "prune_l1+lowrank+distill" in row for row in table), (
        "the ladder's rungs"
    )
    rest = [line for line in lines[end:] if line.strip()]
    assert rest[0].startswith("Winner:") and any(line.startswith("Gate:") for line in rest)
    assert all(line.startswith((*VERDICT, "  ")) for line in rest), "\n".join(rest)
    log = (root / ".shrinkflow/shrinkflow.log").read_text()
    assert "Creating initial MLflow database tables" in log and "_pytree" in log, "chatter kept in the log"


def test_the_flow_run_and_the_mlflow_runs_point_at_each_other(default_run):
    done, root = default_run
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    promotion = json.loads((root / "reports/promotion.json").read_text())
    with sqlite3.connect(root / "prefect/prefect.db") as db:
        ((flow_run, name, tags),) = db.execute("select id, name, tags from flow_run").fetchall()
        report = dict(db.execute("select key, data from artifact where flow_run_id = ?", (flow_run,)))
    assert re.fullmatch(r"shrink-basenet-digits-\d{8}-\d{6}", name)
    expected = {"shrinkflow", "data:digits", "arch:basenet", "model:shrinkflow-digits"}
    assert set(json.loads(tags)) == expected | {f"outcome:{promotion['verdict']}"}
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs(client.get_experiment_by_name("shrinkflow").experiment_id)
    parent = next(r for r in runs if r.data.tags.get("shrinkflow.stage") == "pipeline")
    linked = [r for r in runs if r.data.tags.get("shrinkflow.stage") in ("pipeline", "baseline", "shrink")]
    candidates = load_params(root / "params.yaml").shrink.candidates  # the ladder's rungs among them
    assert len(linked) == 1 + 1 + len(candidates), "the parent, the baseline's and each candidate's run"
    for run in linked:
        assert run.data.tags["prefect.flow_run_id"] == flow_run
        assert run.data.tags["prefect.flow_run_name"] == name
    markdown = json.loads(report["shrink-report"])
    version = promotion["registry"]["version"]
    assert f"MLflow parent run: [{parent.info.run_id}](" in markdown
    assert f"/#/models/shrinkflow-digits/versions/{version})" in markdown and name in markdown
