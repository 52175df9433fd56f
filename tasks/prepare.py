"""Stage 1: read the configured data source, split it, and write compact uint8 train/val/test
tensors plus a manifest with the normalisation, shapes, classes and the data's fingerprint."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from shrinkflow.tasks.config import DataConfig, Params
from shrinkflow.tasks.datachecks import check_classes, check_splits
from shrinkflow.tasks.gate import certifiable
from shrinkflow.tasks.io import write_json, write_torch
from shrinkflow.tasks.layout import SPLITS, Layout
from shrinkflow.tasks.records import Manifest, load_manifest
from shrinkflow.tasks.sources import DataError, load_source

log = logging.getLogger(__name__)


def split_indices(labels: np.ndarray, cfg: DataConfig, seed: int, n_test: int = 0) -> dict[str, np.ndarray]:
    """Deterministic stratified train/val/gate/test indices. A source with its own test split (its
    last ``n_test`` rows) keeps it, and ``val_fraction`` and ``gate_fraction`` are then shares of
    its training rows; otherwise all three fractions are shares of the whole data set."""
    idx = np.arange(len(labels))
    if n_test:
        rest, test, share = idx[:-n_test], idx[-n_test:], 1.0
    else:
        rest, test = _stratified(idx, labels, "data.test_fraction", test_size=cfg.test_fraction, seed=seed)
        share = 1 / (1 - cfg.test_fraction)
    held_out = (cfg.val_fraction + cfg.gate_fraction) * share
    train, held = _stratified(rest, labels, "data.val_fraction", test_size=held_out, seed=seed)
    gate_share = cfg.gate_fraction / (cfg.val_fraction + cfg.gate_fraction)
    val, gate = _stratified(held, labels, "data.gate_fraction", test_size=gate_share, seed=seed)
    if cfg.max_train_samples and cfg.max_train_samples < len(train):
        train, _ = _stratified(
            train, labels, "data.max_train_samples", train_size=cfg.max_train_samples, seed=seed
        )
    return {"train": np.sort(train), "val": np.sort(val), "gate": np.sort(gate), "test": np.sort(test)}


def _stratified(idx: np.ndarray, labels: np.ndarray, key: str, seed: int, **size) -> list[np.ndarray]:
    try:
        return train_test_split(idx, stratify=labels[idx], random_state=seed, **size)
    except ValueError as exc:  # too few images per class for a stratified split of that size
        raise DataError(f"{key}: cannot split {len(idx)} images stratified by class: {exc}") from None


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
    """Read ``data.source``, split it, and write ``{train,val,test}.pt`` (uint8) + manifest."""
    raw = load_source(params.data, layout.root / params.data.root)
    check_classes(raw, params.data, layout.root / params.data.root)
    parts = split_indices(raw.labels, params.data, params.seed, raw.n_test)
    check_splits(raw, parts, params.data)
    if too_small := certifiable(params.promote, len(parts["gate"])):
        log.warning(too_small)
    tensors = {
        split: {"x": torch.from_numpy(raw.images[idx]), "y": torch.from_numpy(raw.labels[idx])}
        for split, idx in parts.items()
    }
    mean, std = channel_stats(raw.images[parts["train"]], raw.scale)
    manifest = Manifest(
        source=params.data.source,
        fingerprint=fingerprint(tensors),
        classes=raw.classes,
        input_shape=list(raw.images.shape[1:]),
        sizes={split: len(idx) for split, idx in parts.items()},
        mean=mean,
        std=std,
        scale=raw.scale,
    )
    for split in SPLITS:
        write_torch(layout.split(split), tensors[split])
    write_json(layout.manifest, asdict(manifest))
    log.info("prepared %s: %s, fingerprint %s", manifest.source, manifest.sizes, manifest.fingerprint[:12])
    return manifest


def channel_stats(images: np.ndarray, scale: float) -> tuple[list[float], list[float]]:
    """Exact per-channel mean and std of uint8 images over ``scale``, from value histograms (no
    float copy of the data set is ever made)."""
    values = np.arange(256, dtype=np.float64) / scale
    mean, std = [], []
    for c in range(images.shape[1]):
        counts = np.bincount(images[:, c].ravel(), minlength=256).astype(np.float64)
        mu = float(counts @ values / counts.sum())
        var = float(counts @ (values - mu) ** 2 / counts.sum())
        mean.append(round(mu, 8))
        std.append(round(max(var, 1e-12) ** 0.5, 8))
    return mean, std


def load_split(layout: Layout, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One split as float32 images normalised as the manifest says, and int64 labels."""
    x, y = load_raw_split(layout, split)
    return normalise(x, load_manifest(layout)), y


def load_raw_split(layout: Layout, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One split as stored: uint8 pixels (what a served model takes) and int64 labels."""
    data = torch.load(layout.split(split), map_location="cpu", weights_only=True)
    return data["x"], data["y"]


def normalise(x: torch.Tensor, manifest: Manifest) -> torch.Tensor:
    """Stored uint8 pixels -> the float32 input every model takes (and a served model expects)."""
    mean = torch.tensor(manifest.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(manifest.std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x.to(torch.float32) / manifest.scale - mean) / std
