"""Stage 1: turn the raw data set into normalised train/val/test tensors plus a manifest."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from tasks.config import DataConfig, Params
from tasks.io import read_json, write_json, write_torch
from tasks.layout import SPLITS, Layout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Manifest:
    source: str
    fingerprint: str
    classes: list[str]
    input_shape: list[int]  # C, H, W
    sizes: dict[str, int]
    mean: float
    std: float

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def load_source(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Raw images as float32 N x C x H x W in [0, 1], integer labels, and class names."""
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    return images, digits.target.astype(np.int64), [str(c) for c in digits.target_names]


def split_indices(labels: np.ndarray, cfg: DataConfig, seed: int) -> dict[str, np.ndarray]:
    """Deterministic stratified train/val/test indices."""
    idx = np.arange(len(labels))
    rest, test = train_test_split(idx, test_size=cfg.test_fraction, stratify=labels, random_state=seed)
    val_share = cfg.val_fraction / (1 - cfg.test_fraction)
    train, val = train_test_split(rest, test_size=val_share, stratify=labels[rest], random_state=seed)
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def fingerprint(tensors: dict[str, dict[str, torch.Tensor]]) -> str:
    """sha256 over the prepared tensors' bytes, split by split: independent of file format."""
    digest = hashlib.sha256()
    for split in SPLITS:
        for key in ("x", "y"):
            t = tensors[split][key].contiguous()
            digest.update(f"{split}/{key}/{t.dtype}/{tuple(t.shape)}".encode())
            digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def prepare(params: Params, layout: Layout) -> Manifest:
    """Split, normalise with training statistics, and write ``{train,val,test}.pt`` + manifest."""
    images, labels, classes = load_source(params.data)
    parts = split_indices(labels, params.data, params.seed)
    train_x = images[parts["train"]]
    mean, std = float(train_x.mean()), float(train_x.std())
    tensors = {
        split: {
            "x": torch.from_numpy((images[idx] - mean) / std),
            "y": torch.from_numpy(labels[idx]),
        }
        for split, idx in parts.items()
    }
    manifest = Manifest(
        source=params.data.source,
        fingerprint=fingerprint(tensors),
        classes=classes,
        input_shape=list(images.shape[1:]),
        sizes={split: len(idx) for split, idx in parts.items()},
        mean=round(mean, 8),
        std=round(std, 8),
    )
    for split in SPLITS:
        write_torch(layout.split(split), tensors[split])
    write_json(layout.manifest, asdict(manifest))
    log.info("prepared %s: %s, fingerprint %s", manifest.source, manifest.sizes, manifest.fingerprint[:12])
    return manifest


def load_manifest(layout: Layout) -> Manifest:
    return Manifest(**read_json(layout.manifest))


def load_split(layout: Layout, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.load(layout.split(split), map_location="cpu", weights_only=True)
    return data["x"], data["y"]
