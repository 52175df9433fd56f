"""Reproducibility with real DVC and real Prefect on digits: forced reproductions agree byte for
byte, a change to one candidate re-runs only what depends on it, metrics/plots/experiments work,
an experiment becomes a registered version from a clean commit, a second clone pulls from a DVC
remote instead of retraining, a registered version is rebuilt bit for bit from its tags, and a
flow re-run reuses its cached baseline.

The DVC tests share one repository (a git copy of the project in a temporary directory); each
leaves it reproduced, so they hold in any order."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import subprocess

import pytest
import yaml
from mlflow import MlflowClient

from shrinkflow.tasks.measurement.evaluate import MACHINE_COLUMNS
from shrinkflow.tasks.store.registry import version_record
from tests.conftest import BIN, REPO, run_cli, write_params

pytestmark = pytest.mark.slow

PROJECT_FILES = ("dvc.yaml", "pyproject.toml", ".dvc", ".dvcignore", ".gitignore", "tasks", "models", "flows")
SMALL = ("train.epochs=3", "shrink.epochs=2", "promote.model_name=repro-e2e")


def _dvc(root, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    done = subprocess.run([str(BIN / "dvc"), *args], cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"dvc {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done


def _ran(done: subprocess.CompletedProcess) -> list[str]:
    return [line.split("'")[1] for line in done.stdout.splitlines() if line.startswith("Running stage")]


def _write_params(root, *overrides: str) -> None:
    write_params(root, *SMALL, *overrides)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A git + DVC copy of the project with small params, reproduced once up to evaluate."""
    root = tmp_path_factory.mktemp("repro")
    for item in PROJECT_FILES:
        src = REPO / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, root / item)
    (root / "data/raw").mkdir(parents=True)
    shutil.copy(REPO / "data/raw/README.md", root / "data/raw/README.md")
    shutil.rmtree(root / ".dvc/tmp", ignore_errors=True)
    shutil.rmtree(root / ".dvc/cache", ignore_errors=True)
    _write_params(root)
    git = ["git", "-c", "user.email=ci@example.com", "-c", "user.name=ci"]
    subprocess.run([*git, "init", "-q"], cwd=root, check=True)
    subprocess.run([*git, "add", "-A"], cwd=root, check=True)
    subprocess.run([*git, "commit", "-qm", "init"], cwd=root, check=True)
    assert _ran(_dvc(root, "repro", "evaluate")) == [
        "prepare",
        "baseline",
        "sensitivity",
        "shrink@w50",
        "shrink@l1-50",
        "evaluate",
    ]
    return root


def _deterministic_outputs(root) -> dict[str, bytes]:
    """Every file that must be identical across runs; candidates.csv without its machine columns."""
    rows = list(csv.reader(io.StringIO((root / "reports/candidates.csv").read_text())))
    keep = [i for i, column in enumerate(rows[0]) if column not in MACHINE_COLUMNS]
    table = "\n".join(",".join(row[i] for i in keep) for row in rows)
    files = {
        "candidates.csv (latency aside)": table.encode(),
        "metrics.json": (root / "reports/metrics.json").read_bytes(),
    }
    for path in sorted((root / "reports/curves").glob("*.csv")):
        files[f"curves/{path.name}"] = path.read_bytes()
    for path in sorted((root / "data/prepared").iterdir()):
        files[f"prepared/{path.name}"] = path.read_bytes()
    for path in sorted((root / "artifacts").rglob("model.pt")):
        files[str(path.relative_to(root))] = path.read_bytes()
    return files


@pytest.mark.scenario
def test_forced_reproductions_are_byte_identical(repo):
    before = _deterministic_outputs(repo)
    assert _ran(_dvc(repo, "repro", "--force", "evaluate")) == [
        "prepare",
        "baseline",
        "sensitivity",
        "shrink@w50",
        "shrink@l1-50",
        "evaluate",
    ]
    after = _deterministic_outputs(repo)
    assert sorted(after) == sorted(before) and len(after) >= 10
    differing = [name for name in before if before[name] != after[name]]
    assert not differing, f"not reproduced bit for bit: {differing}"


@pytest.mark.scenario
def test_changing_one_candidate_reruns_only_it_evaluate_and_promote(repo):
    _dvc(repo, "repro", "evaluate")  # up to date whatever ran before
    _write_params(repo, "shrink.candidates.w50.ratio=0.625")
    stale = set(json.loads(_dvc(repo, "status", "--json").stdout))
    assert {"shrink@w50", "evaluate", "promote"} <= stale
    assert not stale & {"prepare", "baseline", "shrink@l1-50"}, stale
    # The sensitivity stage reads every candidate, keeps its tables (here none) and so changes
    # nothing downstream.
    assert _ran(_dvc(repo, "repro")) == ["sensitivity", "shrink@w50", "evaluate", "promote"]
    assert "Data and pipelines are up to date" in _dvc(repo, "status").stdout
    assert _ran(_dvc(repo, "repro")) == [], "a second repro does nothing"
    promotion = json.loads((repo / "reports/promotion.json").read_text())
    champion = MlflowClient().get_model_version_by_alias("repro-e2e", "champion")
    assert str(champion.version) == promotion["registry"]["version"], "dvc repro registered the winner"

    metrics = json.loads(_dvc(repo, "metrics", "show", "--json").stdout)
    shown = next(iter(metrics.values()))["data"]
    assert shown["reports/metrics.json"]["data"]["baseline"]["val_acc"] > 80
    assert shown["reports/promotion.json"]["data"]["winner"] in {"baseline", "w50", "l1-50"}


@pytest.mark.scenario
def test_plots_and_experiments(repo):
    plots = json.loads(_dvc(repo, "plots", "show", "--json").stdout)["data"]
    points = plots["accuracy-vs-size"][0]["content"]["data"]["values"]  # per model and accuracy
    assert {(p["name"], p["field"]) for p in points} == {
        (model, field)
        for model in ("baseline", "w50", "l1-50")
        for field in ("val_acc", "gate_acc", "test_acc")
    }
    for model in ("baseline", "w50", "l1-50"):
        curve = plots[f"reports/curves/{model}.csv"][0]["content"]["data"]["values"]
        assert [int(p["epoch"]) for p in curve] == list(range(1, len(curve) + 1)) and len(curve) >= 2
    _dvc(repo, "plots", "show", "-o", "plots-html")
    assert (repo / "plots-html/index.html").stat().st_size > 1000

    done = _dvc(repo, "exp", "run", "-S", "evaluate.latency_repeats=3", "-n", "fewer-repeats", "evaluate")
    assert _ran(done) == ["evaluate"], "a change to evaluate's params re-runs only evaluate"
    table = _dvc(repo, "exp", "show", "--csv").stdout
    assert "fewer-repeats" in table
    assert yaml.safe_load((repo / "params.yaml").read_text())["evaluate"]["latency_repeats"] == 3


def _git(root, *args: str) -> str:
    git = ["git", "-c", "user.email=ci@example.com", "-c", "user.name=ci"]
    return subprocess.run([*git, *args], cwd=root, check=True, capture_output=True, text=True).stdout.strip()


@pytest.mark.scenario
def test_an_experiment_becomes_a_version_from_a_clean_commit_that_a_clone_pulls_and_rebuilds(repo, tmp_path):
    """README's path from `dvc exp run` to the registry, then the lineage: the version's commit
    holds the experiment's params; pushed to a directory remote, a fresh clone pulls everything and
    `dvc repro` has nothing to do; `shrinkflow reproduce` rebuilds the checkpoint byte for byte
    from the version's tags in a worktree of its commit, and moves no alias."""
    # An experiment that changes what promote does (here: into a registry name of its own, so
    # that a version is registered whatever the champion), run up to evaluate as README says.
    _dvc(repo, "exp", "run", "-S", "promote.model_name=repro-lineage", "-n", "lineage", "evaluate")
    _dvc(repo, "exp", "apply", "lineage")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "experiment lineage")
    commit = _git(repo, "rev-parse", "HEAD")
    assert _ran(_dvc(repo, "repro")) == ["promote"], "the experiment's evaluate is reused"
    version = json.loads((repo / "reports/promotion.json").read_text())["registry"]["version"]
    client = MlflowClient()
    tags = version_record(client, "repro-lineage", version)  # its tags and the rest of its figures
    assert (tags["git_commit"], tags["git_dirty"]) == (commit, "false")
    assert (
        yaml.safe_load(_git(repo, "show", f"{commit}:params.yaml"))["promote"]["model_name"]
        == "repro-lineage"
    )
    assert tags["dvc_remote"] == "none" and tags["precision"] and tags["cpu"]

    remote = tmp_path / "remote"
    _dvc(repo, "remote", "add", "-d", "shared", str(remote))
    _dvc(repo, "push")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "dvc.lock and the remote")
    clone = tmp_path / "clone"
    _git(tmp_path, "clone", "-q", str(repo), str(clone))
    _dvc(clone, "pull")
    assert "Data and pipelines are up to date" in _dvc(clone, "status").stdout
    assert _ran(_dvc(clone, "repro")) == [], "a fresh clone that pulled trains nothing"
    for path in ("artifacts/baseline/model.pt", "data/prepared/manifest.json"):
        assert (clone / path).read_bytes() == (repo / path).read_bytes()

    aliases = client.get_registered_model("repro-lineage").aliases
    done = run_cli("reproduce", "repro-lineage", version, cwd=repo)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert (
        done.stdout.strip().startswith(f"repro-lineage v{version} (")
        and ": identical, sha256 " in done.stdout
    )
    assert client.get_registered_model("repro-lineage").aliases == aliases
    assert _git(repo, "worktree", "list").count("\n") == 0, "the temporary worktree is gone"


@pytest.mark.scenario
def test_a_version_from_a_dirty_tree_says_so_and_is_not_rebuilt(repo):
    """test_changing_one_candidate registered from an uncommitted params.yaml."""
    dirty = [
        v
        for v in MlflowClient().search_model_versions("name='repro-e2e'")
        if v.tags.get("git_dirty") == "true"
    ]
    assert dirty, "the edited params.yaml was never committed"
    version = dirty[0]
    assert version.description.startswith("**Registered from a dirty tree**")
    done = run_cli("reproduce", "repro-e2e", str(version.version), cwd=repo)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"error: repro-e2e v{version.version} was registered from a dirty tree at "
        f"{version.tags['git_commit'][:12]}: its code or params are in no commit, so nothing can rebuild it"
    ]


def test_an_image_folder_under_dvc_is_pulled_into_a_clone_and_prepared_to_the_same_fingerprint(tmp_path):
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    from shrinkflow.tasks.config import load_params
    from shrinkflow.tasks.data.prepare import prepare
    from shrinkflow.tasks.layout import Layout
    from shrinkflow.tasks.records import load_manifest

    origin = tmp_path / "origin"
    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images[:300], digits.target[:300], strict=True)):
        folder = origin / "data/raw/digits" / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 16).clip(0, 255).astype(np.uint8)).save(folder / f"{i:04d}.png")
    _git(origin, "init", "-q")
    _dvc(origin, "init", "-q")
    _dvc(origin, "remote", "add", "-d", "shared", str(tmp_path / "remote"))
    _dvc(origin, "add", "data/raw/digits")
    _dvc(origin, "push")
    write_params(origin, "data.source=imagefolder", "data.root=data/raw/digits")
    _git(origin, "add", "-A")
    _git(origin, "commit", "-qm", "images under DVC")
    clone = tmp_path / "clone"
    _git(tmp_path, "clone", "-q", str(origin), str(clone))
    assert not (clone / "data/raw/digits").exists()
    _dvc(clone, "pull")
    fingerprints = []
    for root in (origin, clone):
        params = load_params(root / "params.yaml")
        layout = Layout.from_params(params, root)
        prepare(params, layout)
        fingerprints.append(load_manifest(layout).fingerprint)
    assert fingerprints[0] == fingerprints[1]
    assert sum(1 for _ in (clone / "data/raw/digits").rglob("*.png")) == 300


class _Lines(logging.Handler):
    """Collects what a flow says in its run log."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def said(self, text: str) -> bool:
        found, self.lines = any(text in line for line in self.lines), []
        return found


def _prepare_and_baseline_flow(root):
    """A flow of the pipeline's first two tasks, in a project at ``root`` with the small params."""
    from prefect import flow

    from shrinkflow.flows.pipeline import prepare, reuse_or_train_baseline
    from shrinkflow.tasks.pipeline.stages import Context

    write_params(root, *SMALL)

    @flow(name="prepare-and-baseline")
    def prepare_and_baseline():
        ctx = Context.load(root / "params.yaml", (), root)
        prepare(ctx)
        return reuse_or_train_baseline(ctx)

    return prepare_and_baseline


def test_flow_rerun_reuses_the_cached_baseline(tmp_path, prefect_server):
    prepare_and_baseline = _prepare_and_baseline_flow(tmp_path)

    log = _Lines()
    logging.getLogger("prefect.flow_runs").addHandler(log)
    try:
        first = prepare_and_baseline()
        assert not log.said("baseline reused")
        second = prepare_and_baseline()
        assert log.said("baseline reused from cache: its inputs, config and code are unchanged")
        assert second.run_id == first.run_id and second.record.sha256 == first.record.sha256

        (tmp_path / "artifacts/baseline/model.pt").unlink()
        third = prepare_and_baseline()
        assert log.said("missing or changed on disk; retraining")
    finally:
        logging.getLogger("prefect.flow_runs").removeHandler(log)
    assert third.run_id != first.run_id and (tmp_path / "artifacts/baseline/model.pt").is_file()
    assert third.record.sha256 == first.record.sha256, "retrained bit for bit"


@pytest.mark.slow
def test_flow_rerun_against_another_tracking_store_retrains(tmp_path, prefect_server, monkeypatch):
    """Prefect's cache outlives an MLflow store: after MLFLOW_TRACKING_URI moves, the cached baseline
    names a run the new store does not have, so it is trained and logged again there."""
    prepare_and_baseline = _prepare_and_baseline_flow(tmp_path)

    log = _Lines()
    logging.getLogger("prefect.flow_runs").addHandler(log)
    try:
        first = prepare_and_baseline()
        other = f"sqlite:///{tmp_path / 'other-store.db'}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
        second = prepare_and_baseline()
        assert not log.said("baseline reused"), "the new store has none of the cached runs"
        third = prepare_and_baseline()
        assert log.said("baseline reused from cache")
    finally:
        logging.getLogger("prefect.flow_runs").removeHandler(log)
    assert second.run_id != first.run_id and third.run_id == second.run_id
    assert MlflowClient(tracking_uri=other).get_run(second.run_id).info.status == "FINISHED"
    assert second.record.sha256 == first.record.sha256, "the same weights, logged again"
