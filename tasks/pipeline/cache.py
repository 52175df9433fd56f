"""What a trained model is a function of, so an orchestrator can reuse it instead of retraining.

A key hashes what the stage's spec in :mod:`shrinkflow.tasks.stage_specs` declares, the very list
``dvc.yaml`` is generated from: the source of its code (every file its entry module imports, derived
there, so a module the stage starts to import changes its keys), the values of its params, and its
data (the prepared data's fingerprint or, for a candidate, the baseline checkpoint it starts from),
plus where the checkpoint is written. :func:`intact` then checks that the checkpoint a cached result
points at is still on disk, unchanged. A re-run after an interruption therefore redoes only the
models that had not finished.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from shrinkflow.models.checkpoint import sha256_file
from shrinkflow.tasks.config import Params
from shrinkflow.tasks.io import read_json
from shrinkflow.tasks.layout import Layout
from shrinkflow.tasks.records import ModelRecord, load_manifest, load_record
from shrinkflow.tasks.stage_specs import KEY, STAGES, StageSpec, resolve
from shrinkflow.tasks.training import given
from shrinkflow.tasks.training.search import Trial

PROJECT = Path(__file__).resolve().parents[2]


def code_digest(paths: tuple[str, ...]) -> str:
    """sha256 over the Python sources under ``paths`` (files or packages), by relative name."""
    digest = hashlib.sha256()
    for path in paths:
        root = PROJECT / path
        for file in sorted(root.rglob("*.py")) if root.is_dir() else [root]:
            digest.update(str(file.relative_to(PROJECT)).encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def _declared(spec: StageSpec, params: Params, item: str = "") -> dict:
    raw = params.model_dump(mode="json")
    return {
        "code": code_digest(spec.code),
        "params": {key.replace(KEY, item): resolve(raw, key.replace(KEY, item)) for key in spec.params},
    }


def baseline_key(params: Params, layout: Layout, tracking: str) -> str:
    """Changes whenever the baseline's weights could: its data, declared code or params, or the
    project directory it is written to; or when ``tracking`` (:meth:`Tracker.identity`), the store
    its cached MLflow run lives in, changes."""
    inputs = {
        **_declared(STAGES["baseline"], params),
        "given": given.fingerprint(params, layout),  # a brought model's weights, code or version
        "data_fingerprint": load_manifest(layout).fingerprint,
        "checkpoint": str(layout.checkpoint("baseline")),
        "tracking": tracking,  # the cached result names a run in this store
    }
    return "shrinkflow-baseline-" + _digest(inputs)


def candidate_key(
    params: Params, layout: Layout, name: str, tracking: str, trials: Sequence[Trial] = ()
) -> str:
    """Changes whenever candidate ``name``'s weights could: the baseline checkpoint it shrinks,
    its declared code or params (its own entry, the shared budget, the gate), where it is
    written, or the tracking store; for a search's pick, also the ``trials`` it chooses from."""
    inputs = {
        **_declared(STAGES["shrink"], params, name),
        "baseline_sha256": load_record(layout, "baseline").sha256,
        "checkpoint": str(layout.checkpoint(name)),
        "tracking": tracking,
    }
    if trials:
        inputs["trials"] = [[t.index, t.ratio, t.passed, t.sha256, t.error] for t in trials]
    return f"shrinkflow-candidate-{name}-" + _digest(inputs)


def trial_key(params: Params, layout: Layout, name: str, index: int, ratio: float) -> str:
    """Changes whenever the weights of trial ``index`` (at ``ratio``) of candidate ``name``'s
    search could: what its candidate's key hashes, but the tracking store (a trial's cached result
    names no MLflow run), so a change to another candidate leaves it alone."""
    inputs = {
        **_declared(STAGES["shrink"], params, name),
        "baseline_sha256": load_record(layout, "baseline").sha256,
        "checkpoint": str(layout.trial_checkpoint(name, ratio)),
        "trial": [index, ratio],
    }
    return f"shrinkflow-trial-{name}-" + _digest(inputs)


def _digest(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def intact(layout: Layout, name: str, record: ModelRecord) -> bool:
    """Whether model ``name``'s checkpoint and record on disk are still the ones ``record``
    describes."""
    path = layout.checkpoint(name)
    try:
        on_disk = load_record(layout, name)
    except (FileNotFoundError, TypeError, ValueError):
        return False
    return path.is_file() and on_disk.sha256 == record.sha256 and sha256_file(path) == record.sha256


def trial_intact(layout: Layout, name: str, trial: Trial) -> bool:
    """Whether the checkpoint and record of ``trial`` of candidate ``name``'s search are still on
    disk as it wrote them."""
    path = layout.trial_checkpoint(name, trial.ratio)
    try:
        on_disk = ModelRecord(**read_json(layout.trial_record(name, trial.ratio)))
    except (FileNotFoundError, TypeError, ValueError):
        return False
    return path.is_file() and on_disk.sha256 == trial.sha256 and sha256_file(path) == trial.sha256
