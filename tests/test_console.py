"""A `shrinkflow run` of the default params on a fresh machine prints no traceback and none of the
warnings our own use of Prefect, torch, MLflow and pandas used to cause, and the table once. Every
default candidate runs (each strategy, int8, distillation, the budget allocation and the search);
only the epochs are cut, which no printed line depends on."""

from __future__ import annotations

import shutil

import pytest

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


def test_a_run_of_every_default_candidate_prints_a_clean_console(tmp_path):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    env = {
        "PREFECT_HOME": str(tmp_path / "prefect"),  # a first run: the temporary server starts afresh
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "PYTHONWARNINGS": "default",  # deprecation warnings shown too, once per place
    }
    done = run_cli("run", "-s", "train.epochs=3", "-s", "shrink.epochs=1", cwd=tmp_path, env=env)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    for text in FORMERLY_PRINTED:
        assert text not in output, f"{text!r} in:\n{output[-5000:]}"
    header = next(line for line in done.stdout.splitlines() if "| name " in line)
    assert output.count(header) == 1, "the candidates table is printed once"
    assert "l1-50-int8" in output and "Winner:" in done.stdout and "Gate:" in done.stdout
