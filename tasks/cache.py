"""What a trained model is a function of, so an orchestrator can reuse it instead of retraining.

A key covers everything the weights depend on: the prepared data (its fingerprint) or, for a
candidate, the baseline checkpoint it starts from; the config sections training reads; and the
source of the code that trains. :func:`intact` then checks that the checkpoint a cached result
points at is still on disk, unchanged. A re-run after an interruption therefore redoes only the
models that had not finished.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from models.checkpoint import sha256_file
from tasks.prepare import load_manifest
from tasks.stages import Context
from tasks.train import ModelRecord, load_record

PROJECT = Path(__file__).resolve().parents[1]
# The same code dvc.yaml's baseline stage depends on.
BASELINE_CODE = ("models", "tasks/prepare.py", "tasks/train.py", "tasks/engine.py", "tasks/io.py")
CANDIDATE_CODE = (*BASELINE_CODE, "tasks/search.py")


def code_digest(paths: tuple[str, ...] = BASELINE_CODE) -> str:
    """sha256 over the Python sources under ``paths`` (files or packages), by relative name."""
    digest = hashlib.sha256()
    for path in paths:
        root = PROJECT / path
        for file in sorted(root.rglob("*.py")) if root.is_dir() else [root]:
            digest.update(str(file.relative_to(PROJECT)).encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def baseline_key(ctx: Context) -> str:
    """A key that changes whenever the baseline's weights could: data, seed, augmentation, model,
    training recipe, training code, the project directory it is written to, or the tracking
    store its MLflow run is in."""
    params = ctx.params
    inputs = {
        "data_fingerprint": load_manifest(ctx.layout).fingerprint,
        "seed": params.seed,
        "augment": params.data.augment,
        "model": params.model.model_dump(mode="json"),
        "train": params.train.model_dump(mode="json"),
        "code": code_digest(),
        "checkpoint": str(ctx.layout.checkpoint("baseline")),
        "tracking": ctx.tracker.identity(),  # the cached result names a run in this store
    }
    return "shrinkflow-baseline-" + _digest(inputs)


def candidate_key(ctx: Context, name: str) -> str:
    """A key that changes whenever candidate ``name``'s weights could: the baseline checkpoint it
    shrinks, its own options, the shared shrink budget, the training recipe, the tolerance (a
    search reads it), the code, where it is written, or the tracking store."""
    params = ctx.params
    inputs = {
        "baseline_sha256": load_record(ctx.layout, "baseline").sha256,
        "seed": params.seed,
        "augment": params.data.augment,
        "train": params.train.model_dump(mode="json"),
        "shrink": params.shrink.model_dump(
            mode="json", include={"workers", "epochs", "lr", "calibration_size"}
        ),
        "candidate": params.shrink.candidates[name].model_dump(mode="json"),
        "tolerance": [params.promote.tolerance, params.promote.tolerance_mode],
        "code": code_digest(CANDIDATE_CODE),
        "checkpoint": str(ctx.layout.checkpoint(name)),
        "tracking": ctx.tracker.identity(),
    }
    return f"shrinkflow-candidate-{name}-" + _digest(inputs)


def _digest(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def intact(ctx: Context, name: str, record: ModelRecord) -> bool:
    """Whether model ``name``'s checkpoint and record on disk are still the ones ``record``
    describes."""
    path = ctx.layout.checkpoint(name)
    try:
        on_disk = load_record(ctx.layout, name)
    except (FileNotFoundError, TypeError, ValueError):
        return False
    return path.is_file() and on_disk.sha256 == record.sha256 and sha256_file(path) == record.sha256
