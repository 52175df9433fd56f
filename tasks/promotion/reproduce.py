"""From a registered version back to its bytes.

A version records where it came from (:func:`provenance_tags`): the git commit and whether the
tree was clean, a hash of the params it ran with, the DVC remote that holds its data, and the
precision, device, torch and CPU it trained on. :func:`reproduce` checks out that commit in a
temporary git worktree, pulls the inputs from the remote, re-runs through DVC the stages that
made the winner (``prepare``, ``baseline`` and its ``shrink`` stage, forced) with that commit's
own code, and compares the rebuilt checkpoint's sha256 with the version's. The rebuild logs to a
throwaway MLflow store: the registry and its aliases are only read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from shrinkflow.tasks.config import Params, load_params
from shrinkflow.tasks.errors import ShrinkflowError
from shrinkflow.tasks.io import sha256_file
from shrinkflow.tasks.layout import Layout
from shrinkflow.tasks.records import load_manifest, load_record


class ReproduceError(ShrinkflowError):
    """A version that cannot be rebuilt from what it records, said in one line."""


def params_sha256(params: Params) -> str:
    """The validated params, as canonical JSON: equal for equal configs however the YAML is laid out."""
    return hashlib.sha256(json.dumps(params.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def git_state(root: Path) -> tuple[str, bool] | None:
    """``(full commit, dirty)`` of the repository holding ``root`` (pipeline outputs aside, as
    :func:`shrinkflow.tasks.store.tracking.code_version` counts them), or None outside git."""
    from shrinkflow.tasks.store.tracking import code_version

    version = code_version(root)
    if version == "unknown":
        return None
    return _git(root, "rev-parse", "HEAD"), version.endswith("-dirty")


def dvc_remote(root: Path) -> str:
    """``name url`` of the DVC default remote configured for ``root``'s repository, or ``none``."""
    from dvc.config import Config
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        config = Config(dvc_dir=str(Path(Repo.find_root(str(root))) / ".dvc"))
    except NotDvcRepoError:
        return "none"
    name = config["core"].get("remote")
    if not name:
        return "none"
    return f"{name} {config['remote'].get(name, {}).get('url', '?')}"


def cpu_model() -> str:
    """The CPU's model name (floating point and latency differ between CPU families), else the arch."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    with_name = [line for line in lines if line.startswith("model name")]
    return with_name[0].split(":", 1)[1].strip() if with_name else platform.machine()


def provenance_tags(params: Params, layout: Layout) -> dict[str, str]:
    """What ``shrinkflow reproduce`` needs to rebuild a version from this project as it is now."""
    import torch

    from shrinkflow.tasks.training.engine import resolve_device

    state = git_state(layout.root)
    return {
        "git_commit": state[0] if state else "none",
        "git_dirty": str(state[1]).lower() if state else "unknown",
        "params_sha256": params_sha256(params),
        "dvc_remote": dvc_remote(layout.root),
        "precision": load_record(layout, "baseline").precision,
        "device": str(resolve_device(params.train.device)),
        "torch": torch.__version__,
        "cpu": cpu_model(),
    }


def dirty_warning(tags: dict[str, str]) -> str:
    """The first lines of a version's description when its code or params are in no commit."""
    if tags.get("git_dirty") != "true":
        return ""
    return (
        f"**Registered from a dirty tree** (uncommitted code or params on {tags['git_commit'][:12]}): "
        "`shrinkflow reproduce` cannot rebuild it.\n\n"
    )


@dataclass(frozen=True)
class Rebuilt:
    """What :func:`reproduce` found: ``identical`` or not, and the one line that says why."""

    identical: bool
    line: str
    where: Path | None = None  # the worktree, when kept


def reproduce(name: str, version: str, root: Path, keep: bool = False) -> Rebuilt:
    """Rebuild ``name`` version ``version`` from its commit and data and compare its checkpoint."""
    from shrinkflow.tasks.store.registry import open_registry, registered_version, version_record
    from shrinkflow.tasks.store.tracking import PROJECT_ROOT, tracking_uri

    uri = tracking_uri(root)
    client = open_registry(uri)
    version = str(registered_version(client, name, version, uri).version)  # or one line: which not
    tags = version_record(client, name, version)  # its tags and record
    label = f"{name} v{version}"
    commit = _usable_commit(label, tags, root)
    top = Path(_git(root, "rev-parse", "--show-toplevel")).resolve()
    scratch = Path(tempfile.mkdtemp(prefix="shrinkflow-reproduce-"))
    tree = scratch / "tree"
    _git(top, "worktree", "add", "--detach", str(tree), commit)
    project = tree / root.resolve().relative_to(top)
    # The commit's own shrinkflow runs when the repository holds the code that runs now (a
    # checkout of shrinkflow, or a project inside one); else the installed one, and the reasons
    # for a difference say when that is not the registered code_version.
    code = tree / PROJECT_ROOT.relative_to(top) if PROJECT_ROOT.is_relative_to(top) else None
    try:
        rebuilt = _rebuild(label, tags, project, scratch, code)
    finally:
        if not keep:
            _git(top, "worktree", "remove", "--force", str(tree))
            shutil.rmtree(scratch, ignore_errors=True)
    return dataclasses.replace(rebuilt, where=project) if keep else rebuilt


def _usable_commit(label: str, tags: dict[str, str], root: Path) -> str:
    commit = tags.get("git_commit", "none")
    if commit == "none":
        raise ReproduceError(f"{label} records no git commit (registered outside git or before lineage tags)")
    if tags.get("git_dirty") == "true":
        raise ReproduceError(
            f"{label} was registered from a dirty tree at {commit[:12]}: its code or params are in no "
            "commit, so nothing can rebuild it"
        )
    try:
        _git(root, "cat-file", "-e", f"{commit}^{{commit}}")
    except ReproduceError:
        raise ReproduceError(
            f"{label}'s commit {commit[:12]} is not in this repository (git fetch it)"
        ) from None
    return commit


def _rebuild(label: str, tags: dict[str, str], project: Path, scratch: Path, code: Path | None) -> Rebuilt:
    params = load_params(project / "params.yaml")
    if params_sha256(params) != tags.get("params_sha256"):
        raise ReproduceError(
            f"{label} ran with params that differ from its commit's params.yaml (set with -s at run "
            "time?); the commit alone cannot rebuild it"
        )
    env = _rebuild_env(scratch, code)
    inputs = _git(project, "ls-files", "--", "*.dvc").split()  # data added with `dvc add`
    if inputs:
        pulled = subprocess.run(
            ["dvc", "pull", *inputs], cwd=project, env=env, capture_output=True, text=True
        )
        if pulled.returncode:
            raise ReproduceError(f"{label}'s data is not all in the DVC remote: {_last_line(pulled)}")
    winner = tags["candidate"]
    target = "baseline" if winner == "baseline" else f"shrink@{winner}"
    done = subprocess.run(
        ["dvc", "repro", "--force", target], cwd=project, env=env, capture_output=True, text=True
    )
    if done.returncode:
        raise ReproduceError(f"the stages that made {label} failed at its commit: {_last_line(done)}")
    layout = Layout.from_params(params, project)
    record = load_record(layout, winner)
    sha = sha256_file(layout.root / record.checkpoint)
    if sha == tags.get("checkpoint_sha256"):
        return Rebuilt(
            True, f"{label} ({winner}, commit {tags['git_commit'][:12]}): identical, sha256 {sha[:16]}"
        )
    reasons = _why(tags, record.precision, load_manifest(layout).fingerprint, code)
    return Rebuilt(False, f"{label} ({winner}): rebuilt to other bytes; {reasons}")


def _why(tags: dict[str, str], precision: str, fingerprint: str, code: Path | None) -> str:
    """The likeliest reasons two runs of one commit differ, from what the version recorded."""
    from shrinkflow.tasks.store.tracking import code_version

    reasons = []
    if code is None and (installed := code_version()) != tags.get("code_version"):
        reasons.append(f"shrinkflow {installed} installed here, {tags.get('code_version')} at registration")
    if fingerprint != tags.get("data_fingerprint"):
        reasons.append(
            f"the data differs (fingerprint {fingerprint[:12]}, registered {tags.get('data_fingerprint')})"
        )
    import torch

    here = {"precision": precision, "torch": torch.__version__, "cpu": cpu_model()}
    reasons += [
        f"{key} {value} here, {tags[key]} at registration"
        for key, value in here.items()
        if tags.get(key, value) != value
    ]
    return "; ".join(reasons) or "same code, data, precision, torch and CPU: a nondeterministic kernel"


def _rebuild_env(scratch: Path, code: Path | None) -> dict[str, str]:
    """The venv's commands, the commit's shrinkflow first on the path when there is one
    (``code``), and a throwaway tracking store."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    if code is not None:
        packages = scratch / "python"
        packages.mkdir()
        (packages / "shrinkflow").symlink_to(code, target_is_directory=True)
        env["PYTHONPATH"] = os.pathsep.join([str(packages), *filter(None, [env.get("PYTHONPATH")])])
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{scratch / 'rebuild-mlflow.db'}"
    return env


def _git(cwd: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        raise ReproduceError(f"git {args[0]}: {_last_line(done)}")
    return done.stdout.strip()


def _last_line(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
    return lines[-1].strip() if lines else f"exit {done.returncode}"
