"""The bring-your-own-model example does what docs/byo.md says it does: on a fresh copy,
``python train.py && shrinkflow run``, exactly as written, ends with a smaller model certified on
images the network never saw and registered as the champion."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml
from mlflow import MlflowClient

from shrinkflow.tasks.measurement.evaluate import load_table
from tests.conftest import BIN, REPO, run_cli

EXAMPLE = REPO / "examples" / "byo"


def _fresh_copy(dst):
    """The example as a clone holds it: the files git tracks there (none of a local run's)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "."],
        cwd=EXAMPLE,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in listed:
        if (EXAMPLE / name).is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            (dst / name).write_bytes((EXAMPLE / name).read_bytes())
    return dst


@pytest.mark.slow
@pytest.mark.scenario
def test_the_example_ends_with_a_smaller_certified_champion(tmp_path):
    example = _fresh_copy(tmp_path / "byo")
    assert not (example / "weights.pt").exists() and not (example / "images").exists()
    store = f"sqlite:///{example / 'mlflow.db'}"  # the example's own store, as a user's first run has
    trained = subprocess.run(
        [str(BIN / "python"), "train.py"], cwd=example, capture_output=True, text=True, timeout=600
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    done = run_cli("run", cwd=example, env={"MLFLOW_TRACKING_URI": store})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    params = yaml.safe_load((example / "params.yaml").read_text())
    promotion = json.loads((example / "reports/promotion.json").read_text())
    winner = promotion["winner"]
    assert winner != "baseline" and promotion["verdict"] == "champion", done.stdout[-3000:]
    gate = next(c["gate"] for c in promotion["candidates"] if c["name"] == winner)
    assert gate["passed"] and gate["lower"] > -params["promote"]["tolerance"]
    table = load_table(example / "reports/candidates.csv").set_index("name")
    assert table.loc[winner, "params"] < 0.5 * table.loc["baseline", "params"]
    assert table.loc[winner, "test_acc"] > 90, "certified on images the network never saw, and still right"
    manifest = json.loads((example / "data/prepared/manifest.json").read_text())
    assert manifest["heldout"] == "images/test/" and gate["n"] == manifest["sizes"]["gate"]
    champion = MlflowClient(tracking_uri=store).get_model_version_by_alias("byo-tinynet", "champion")
    assert str(champion.version) == promotion["registry"]["version"]
