"""Stages 2 and 3: train the baseline, and shrink + train one candidate, with one shared path."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from models import WARM_START, apply_strategy, build_model
from models.checkpoint import load_checkpoint
from tasks.config import Params, TrainConfig
from tasks.engine import fit
from tasks.io import read_json, save_checkpoint, write_json
from tasks.layout import Layout
from tasks.prepare import load_manifest, load_split

log = logging.getLogger(__name__)

# torch's default RNG is process-global: model construction in concurrent threads is serialised
# so each candidate's initial weights depend only on the seed. Training itself uses an explicit
# torch.Generator and no dropout, so it needs no lock.
_RNG_LOCK = threading.Lock()


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    with _RNG_LOCK:
        torch.manual_seed(seed)
        yield


@dataclass
class ModelRecord:
    """What a training stage hands on: where the weights are and how training went."""

    name: str
    strategy: str
    options: dict[str, Any]
    status: str = "ok"
    checkpoint: str | None = None
    sha256: str | None = None
    epochs: int = 0
    best_epoch: int = 0
    best_val_acc: float = 0.0
    train_seconds: float = 0.0
    images_per_second: float = 0.0
    worker: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    error: str | None = None
    history: list[dict[str, float]] = field(default_factory=list)


def load_record(layout: Layout, name: str) -> ModelRecord:
    return ModelRecord(**read_json(layout.record(name)))


def threads_per_worker(workers: int) -> int:
    """Each concurrent worker's share of the cores, so N workers never oversubscribe the CPU."""
    return max(1, (os.cpu_count() or 1) // workers)


def _train_and_save(
    name: str, model: nn.Module, record: ModelRecord, params: Params, layout: Layout, cfg: TrainConfig
) -> ModelRecord:
    train, val = load_split(layout, "train"), load_split(layout, "val")
    result = fit(model, train, val, cfg, seed=params.seed)
    record.epochs = cfg.epochs
    record.best_epoch, record.best_val_acc = result.best_epoch, result.best_val_acc
    record.train_seconds = result.seconds
    record.images_per_second = result.images_seen / max(result.seconds, 1e-9)
    record.history = result.history
    path = layout.checkpoint(name)
    record.sha256 = save_checkpoint(model, path, meta={"name": name, "strategy": record.strategy})
    record.checkpoint = str(path.relative_to(layout.root))
    write_json(layout.record(name), asdict(record))
    log.info("%s: best val_acc %.2f at epoch %d", name, record.best_val_acc, record.best_epoch)
    return record


def train_baseline(params: Params, layout: Layout) -> ModelRecord:
    """Build the configured architecture for the prepared data's shape and train it."""
    manifest = load_manifest(layout)
    channels, size, _ = manifest.input_shape
    spec = {
        "arch": params.model.arch,
        "in_channels": channels,
        "image_size": size,
        "num_classes": manifest.num_classes,
        "channels": list(params.model.channels),
        "hidden": list(params.model.hidden),
        "batch_norm": params.model.batch_norm,
    }
    with seeded(params.seed):
        model = build_model(spec)
    record = ModelRecord(name="baseline", strategy="baseline", options={})
    return _train_and_save("baseline", model, record, params, layout, params.train)


def candidate_train_config(params: Params, name: str) -> TrainConfig:
    """The baseline's training recipe with the shrink stage's (or the candidate's) budget."""
    cand, shrink = params.shrink.candidates[name], params.shrink
    return params.train.model_copy(
        update={"epochs": cand.epochs or shrink.epochs, "lr": cand.lr or shrink.lr or params.train.lr}
    )


def shrink_candidate(params: Params, layout: Layout, name: str) -> ModelRecord:
    """Apply candidate ``name``'s strategy to the baseline, then train it with the same loop.

    A failure is recorded (status ``failed`` with the reason) before it is re-raised, so the
    evaluation table can show it."""
    cand = params.shrink.candidates[name]
    record = ModelRecord(name=name, strategy=cand.strategy, options=cand.options())
    try:
        base = load_record(layout, "baseline")
        baseline, _ = load_checkpoint(layout.root / base.checkpoint, sha256=base.sha256)
        x, y = load_split(layout, "train")
        calibration = (x[: params.shrink.calibration_size], y[: params.shrink.calibration_size])
        with seeded(params.seed):
            model = apply_strategy(cand.strategy, baseline, calibration, **cand.options())
            if not WARM_START[cand.strategy]:
                log.info("%s: %s starts from a fresh initialisation", name, cand.strategy)
        return _train_and_save(name, model, record, params, layout, candidate_train_config(params, name))
    except Exception as exc:
        record.status, record.error = "failed", f"{type(exc).__name__}: {exc}"
        layout.checkpoint(name).unlink(missing_ok=True)  # never leave an older model to be trusted
        write_json(layout.record(name), asdict(record))
        raise
