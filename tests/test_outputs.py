"""What a run writes: only inside the project (or where explicitly allowed), never deleting files
it does not own, with the permissions the umask asks for, and lineage that says `-dirty` only when
code or params changed."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from shrinkflow.tasks.config import ConfigError, parse_params
from shrinkflow.tasks.io import atomic_path, current_umask, write_json
from shrinkflow.tasks.layout import Layout
from shrinkflow.tasks.measurement.evaluate import write_curves
from shrinkflow.tasks.records import ModelRecord
from shrinkflow.tasks.store.tracking import code_version
from tests.conftest import small_raw


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("paths.reports=/tmp/elsewhere", "paths.reports '/tmp/elsewhere' leaves the project"),
        ("paths.reports=../reports", "paths.reports '../reports' leaves the project"),
        ("paths.prepared=data/../../x", "leaves the project"),
        ("paths.reports=.", "must name a directory below the project"),
        ("paths.baseline=reports", "must all differ"),
    ],
)
def test_output_paths_outside_the_project_are_refused(override, named):
    with pytest.raises(ConfigError, match=named):
        parse_params(small_raw(override))


def test_outside_paths_need_an_explicit_opt_in(tmp_path):
    params = parse_params(
        small_raw(f"paths.reports={tmp_path / 'shared-reports'}", "paths.outside_project=true")
    )
    assert Layout.from_params(params, tmp_path / "project").reports == tmp_path / "shared-reports"


def test_a_symlink_out_of_the_project_is_refused(tmp_path):
    (tmp_path / "project").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "project/reports").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(ConfigError, match=r"paths.reports: .* outside the project"):
        Layout.from_params(parse_params(small_raw()), tmp_path / "project")


def _record(name: str) -> ModelRecord:
    history = [{"epoch": 1, "train_loss": 0.5, "val_acc": 90.0, "lr": 0.1}]
    return ModelRecord(name=name, strategy="width", options={}, history=history)


def test_write_curves_deletes_only_the_curves_it_wrote(tmp_path):
    curves = tmp_path / "curves"
    write_curves(curves, [_record("baseline"), _record("old-candidate")])
    mine = {"notes.csv": "epoch,comment\n1,looks fine\n", "README.md": "my plots\n"}
    for name, text in mine.items():
        (curves / name).write_text(text)
    write_curves(curves, [_record("baseline"), _record("new-candidate")])
    assert sorted(p.name for p in curves.iterdir()) == [
        "README.md",
        "baseline.csv",
        "new-candidate.csv",
        "notes.csv",
    ]
    assert all((curves / name).read_text() == text for name, text in mine.items())


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_outputs_honour_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        assert current_umask() == umask
        write_json(tmp_path / "reports/metrics.json", {"v": 1})
        with atomic_path(tmp_path / "model.pt") as tmp:
            tmp.write_bytes(b"weights")
    finally:
        os.umask(previous)
    for path in (tmp_path / "reports/metrics.json", tmp_path / "model.pt"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, oct(path.stat().st_mode)


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


def test_code_version_is_dirty_for_code_and_params_not_for_pipeline_outputs(tmp_path):
    repo = tmp_path / "repo"
    for name in (
        "tasks/training/train.py",
        "params.yaml",
        "dvc.lock",
        "reports/candidates.csv",
        "reports/curves/b.csv",
    ):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text("v1\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    clean = code_version(repo)
    assert len(clean) == 12 and not clean.endswith("-dirty")
    for output in ("dvc.lock", "reports/candidates.csv", "reports/curves/b.csv"):
        (repo / output).write_text("rewritten by a run\n")
    assert code_version(repo) == clean
    for source in ("params.yaml", "tasks/training/train.py"):
        (repo / source).write_text("changed\n")
        assert code_version(repo) == f"{clean}-dirty", source
        _git(repo, "checkout", "--", source)
    assert code_version(tmp_path) == "unknown"
