"""The records stages hand each other, and where they are read back: the prepared data's
:class:`Manifest` and each model's :class:`ModelRecord`. A neutral module: every stage, the
cache and the MLflow edge import these types from here, not from the stage that writes them."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Any

from shrinkflow.tasks.io import read_json
from shrinkflow.tasks.layout import Layout


@dataclass(frozen=True)
class Manifest:
    source: str
    fingerprint: str
    classes: list[str]
    input_shape: list[int]  # C, H, W
    sizes: dict[str, int]
    mean: list[float]  # per channel, of the training split, after dividing by `scale`
    std: list[float]
    scale: float = 255.0  # stored uint8 pixels are divided by this before normalising
    resize: str = "stretch"  # how images of another size reach input_shape (models/preprocess.py)
    # Whether the images were resized to input_shape (data.image_size, or a model's input.size):
    # then the served model resizes any size the same way; else it takes input_shape's size only.
    # True in manifests written before the field existed, which served every size.
    resizes: bool = True
    normalisation: str = "data"  # whose mean/std: the training split's ("data"), or the model's
    # Which images may have trained a model brought from outside; val, gate and test come from
    # `heldout` alone then ("" when the model is ours, or the split is the usual random one).
    heldout: str = ""
    origin: dict[str, str] = field(default_factory=dict)  # split -> where its images came from

    @property
    def num_classes(self) -> int:
        return len(self.classes)


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
    steps: list[str] = field(default_factory=list)  # e.g. prune_l1, distill, int8
    trials: list[dict[str, Any]] = field(default_factory=list)  # a ratio search's trials, in order
    precision: str = ""  # what the training step ran in, e.g. bf16+cl (see train.precision)
    # slim's pre-phase: epochs, strength, seconds, the share of BatchNorm scales below 0.01
    # before and after it, and its per-epoch history
    sparsity_phase: dict[str, Any] | None = None
    rounds: list[dict[str, Any]] = field(default_factory=list)  # iterative pruning: each round
    # A baseline brought from outside: where it came from (torchvision name, factory, registered
    # version; the weights file's or checkpoint's sha256) and its validation accuracy as given.
    origin: dict[str, Any] = field(default_factory=dict)
    # Structured pruning: the groups torch-pruning found and the layers it left alone.
    pruning: dict[str, Any] | None = None


def load_manifest(layout: Layout) -> Manifest:
    return Manifest(**read_json(layout.manifest))


def load_record(layout: Layout, name: str) -> ModelRecord:
    return ModelRecord(**read_json(layout.record(name)))
