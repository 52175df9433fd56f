"""The repository as a clone holds it, under real DVC: every file a stage writes is that stage's
declared output, a second clone pulls what the first pushed and `dvc repro` there runs nothing,
and a change to a module a stage imports (the resizing in models/preprocess.py) makes that stage
and everything after it stale.

The origin is a git + DVC copy of every file git tracks (examples/ included: its own DVC project
must stay out of the root's pull), reproduced once with small params and two candidates: a plain
one, and a budget allocated from the sensitivity stage's measured table."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import yaml

from tests.conftest import REPO, write_params
from tests.test_repro import _dvc, _git, _ran

pytestmark = [pytest.mark.slow, pytest.mark.scenario]

CANDIDATES = {
    "l1-50": {"strategy": "prune_l1", "ratio": 0.5, "lr": 0.01},
    "alloc-p10": {
        "strategy": "prune_l1",
        "lr": 0.01,
        "budget": {"objective": "params", "keep": 0.1},
        "allocation": "sensitivity",
    },
}
OUTPUT_DIRS = ("data/prepared", "artifacts", "reports")


def _tracked_tree(dst) -> None:
    """Every file git tracks (or would: new and not ignored), as a clone of the working tree."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        if (REPO / name).is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dst / name)


@pytest.fixture(scope="module")
def origin(tmp_path_factory):
    """A git + DVC copy of the repository with small params, reproduced and committed."""
    root = tmp_path_factory.mktemp("origin")
    _tracked_tree(root)
    write_params(
        root,
        "train.epochs=3",
        "shrink.epochs=2",
        f"shrink.candidates={json.dumps(CANDIDATES)}",
        "promote.model_name=clone",
    )
    _git(root, "init", "-q")
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "the project")
    ran = _ran(_dvc(root, "repro"))
    assert ran == [
        "prepare",
        "baseline",
        "sensitivity",
        *(f"shrink@{c}" for c in CANDIDATES),
        "evaluate",
        "promote",
    ]
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "a run")
    return root


def _outputs(root) -> set[str]:
    """Every output path of the pipeline's stages, as the lock resolved them (the lock also keeps
    stages of an earlier params.yaml's candidates, which are no longer in the pipeline)."""
    stages = _dvc(root, "stage", "list", "--name-only").stdout.split()
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    return {out["path"] for stage in stages for out in lock[stage].get("outs", [])}


def _undeclared(root) -> list[str]:
    """Files under the output folders that no stage declares (an output folder covers its files)."""
    declared = _outputs(root)
    written = [
        p.relative_to(root).as_posix() for d in OUTPUT_DIRS for p in (root / d).rglob("*") if p.is_file()
    ]
    return sorted(f for f in written if not any(f == o or f.startswith(f"{o}/") for o in declared))


def test_a_clone_pulls_every_output_and_reproduces_nothing(origin, tmp_path):
    assert not _undeclared(origin), f"written but no stage's output: {_undeclared(origin)}"
    _dvc(origin, "remote", "add", "-d", "shared", str(tmp_path / "remote"))
    _dvc(origin, "push")
    _git(origin, "add", "-A")
    _git(origin, "commit", "-qm", "the remote")
    clone = tmp_path / "clone"
    _git(tmp_path, "clone", "-q", str(origin), str(clone))
    assert (clone / "examples/byo/.dvc/config").is_file(), "the example is a DVC project of its own"
    _dvc(clone, "pull")  # exits 0: nothing it names is missing from the remote
    assert "Data and pipelines are up to date" in _dvc(clone, "status").stdout
    assert _ran(_dvc(clone, "repro")) == [], "a fresh clone that pulled trains nothing"
    for out in _outputs(origin):
        files = (
            [p for p in (origin / out).rglob("*") if p.is_file()]
            if (origin / out).is_dir()
            else [origin / out]
        )
        for path in files:
            assert (clone / path.relative_to(origin)).read_bytes() == path.read_bytes(), path


def test_an_edit_to_the_resizing_makes_prepare_and_everything_after_it_stale(origin):
    """models/preprocess.py resizes the images prepare writes; compiled Python beside it changes
    nothing."""
    cache = origin / "models/__pycache__"
    cache.mkdir(exist_ok=True)
    (cache / "preprocess.cpython-311.pyc").write_bytes(b"compiled")
    assert "Data and pipelines are up to date" in _dvc(origin, "status").stdout
    source = origin / "models/preprocess.py"
    before = source.read_bytes()
    source.write_bytes(before + b"\n# resized differently\n")
    try:
        stale = json.loads(_dvc(origin, "status", "--json").stdout)
    finally:
        source.write_bytes(before)
    stages = [
        "prepare",
        "baseline",
        "sensitivity",
        *(f"shrink@{c}" for c in CANDIDATES),
        "evaluate",
        "promote",
    ]
    assert sorted(stale) == sorted(stages)
    for stage in stages:
        assert {"changed deps": {"models": "modified"}} in stale[stage], (stage, stale[stage])
    assert "Data and pipelines are up to date" in _dvc(origin, "status").stdout
