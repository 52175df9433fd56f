"""Stage 1: read the configured data source, split it, and write compact uint8 train/val/test
tensors plus a manifest with the normalisation, shapes, classes and the data's fingerprint."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, replace

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from shrinkflow.models import preprocess
from shrinkflow.tasks.config import DataConfig, Params, RegisteredOptions, comes_trained
from shrinkflow.tasks.datachecks import check_classes, check_splits
from shrinkflow.tasks.gate import certifiable
from shrinkflow.tasks.io import write_json, write_torch
from shrinkflow.tasks.layout import SPLITS, Layout
from shrinkflow.tasks.records import Manifest, load_manifest
from shrinkflow.tasks.sources import DataError, RawData, load_source

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


def split_heldout(labels: np.ndarray, cfg: DataConfig, seed: int, n_heldout: int) -> dict[str, np.ndarray]:
    """For a model that comes trained: val, gate and test drawn (stratified, in the proportions of
    the three fractions) from the last ``n_heldout`` rows alone, the images it has never seen;
    every other row is training data for fine-tuning."""
    idx = np.arange(len(labels))
    train, held = idx[:-n_heldout], idx[-n_heldout:]
    total = cfg.val_fraction + cfg.gate_fraction + cfg.test_fraction
    val, rest = _stratified(held, labels, "data.val_fraction", seed=seed, train_size=cfg.val_fraction / total)
    gate_share = cfg.gate_fraction / (cfg.gate_fraction + cfg.test_fraction)
    gate, test = _stratified(rest, labels, "data.gate_fraction", seed=seed, train_size=gate_share)
    if cfg.max_train_samples and cfg.max_train_samples < len(train):
        train, _ = _stratified(
            train, labels, "data.max_train_samples", train_size=cfg.max_train_samples, seed=seed
        )
    return {"train": np.sort(train), "val": np.sort(val), "gate": np.sort(gate), "test": np.sort(test)}


def check_unseen(raw: RawData, params: Params) -> None:
    """A model that comes trained is certified only on images it has not seen: the source must
    declare them, and none of them may also be among the training images (same pixels)."""
    if not raw.n_test:
        raise DataError(
            f"the model comes trained, but data.source {params.data.source} declares no images it has not "
            f"seen, so nothing can be certified: put them in <data.root>/test/<class>/ (beside train/) or "
            "set data.heldout_root"
        )
    seen = {raw.images[i].tobytes(): i for i in range(len(raw.images) - raw.n_test)}
    overlap = [
        i for i in range(len(raw.images) - raw.n_test, len(raw.images)) if raw.images[i].tobytes() in seen
    ]
    if overlap:
        first = raw.paths[overlap[0]] if raw.paths else f"row {overlap[0]}"
        twin = raw.paths[seen[raw.images[overlap[0]].tobytes()]] if raw.paths else "a training row"
        raise DataError(
            f"{len(overlap)} of the {raw.n_test} held-out images ({raw.heldout}) are also training images "
            f"(e.g. {first} = {twin}); the model may have seen them, so the certificate would mean nothing"
        )


def prepare(params: Params, layout: Layout) -> Manifest:
    """Read ``data.source``, split it, and write ``{train,val,test}.pt`` (uint8) + manifest."""
    cfg = params.data
    if cfg.heldout_root:
        cfg = cfg.model_copy(update={"heldout_root": str(layout.root / cfg.heldout_root)})
    raw = load_source(cfg, layout.root / cfg.root)
    if raw.heldout == "data.heldout_root":
        raw = replace(raw, heldout=f"data.heldout_root {params.data.heldout_root}")
    elif not raw.heldout and raw.n_test:
        raw = replace(raw, heldout=f"the {params.data.source} test split")
    heldout = comes_trained(params.model) and (raw.n_test or not isinstance(params.model, RegisteredOptions))
    if heldout:  # every split but train comes from the held-out images; check_splits sees each
        check_unseen(raw, params)
        parts = split_heldout(raw.labels, cfg, params.seed, raw.n_test)
    else:
        check_classes(raw, cfg, layout.root / cfg.root)
        parts = split_indices(raw.labels, cfg, params.seed, raw.n_test)
    check_splits(raw, parts, cfg)
    if too_small := certifiable(params.promote, len(parts["gate"])):
        log.warning(too_small)
    tensors = {
        split: {"x": torch.from_numpy(raw.images[idx]), "y": torch.from_numpy(raw.labels[idx])}
        for split, idx in parts.items()
    }
    declared = params.model.input.resolved() if hasattr(params.model, "input") else {}
    if declared.get("mean") is not None:
        mean, std, normalisation = list(declared["mean"]), list(declared["std"]), params.model.input.preset
        normalisation = "model" if normalisation == "data" else normalisation
    else:
        (mean, std), normalisation = channel_stats(raw.images[parts["train"]], raw.scale), "data"
    manifest = Manifest(
        source=params.data.source,
        fingerprint=fingerprint(tensors),
        classes=raw.classes,
        input_shape=list(raw.images.shape[1:]),
        sizes={split: len(idx) for split, idx in parts.items()},
        mean=mean,
        std=std,
        scale=raw.scale,
        resize=cfg.resize,
        normalisation=normalisation,
        heldout=raw.heldout if heldout else "",
        origin=_origin(raw, heldout),
    )
    for split in SPLITS:
        write_torch(layout.split(split), tensors[split])
    write_json(layout.manifest, asdict(manifest))
    log.info("prepared %s: %s, fingerprint %s", manifest.source, manifest.sizes, manifest.fingerprint[:12])
    return manifest


def _origin(raw: RawData, heldout: bool) -> dict[str, str]:
    if heldout:
        return {
            "train": "the images the model may have seen",
            **dict.fromkeys(("val", "gate", "test"), raw.heldout),
        }
    if raw.n_test:
        return {
            "train": "training part",
            "val": "training part",
            "gate": "training part",
            "test": "own test split",
        }
    return dict.fromkeys(SPLITS, "one random stratified split")


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
    path = layout.split(split)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        return data["x"], data["y"]
    except FileNotFoundError:
        raise DataError(f"{path} does not exist; run `shrinkflow stage prepare` first") from None
    except Exception as exc:  # truncated, overwritten, not ours
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:150]
        raise DataError(
            f"{path} is damaged ({first}); run `shrinkflow stage prepare` (or delete {path.parent}) "
            "to rebuild it"
        ) from None


def normalise(x: torch.Tensor, manifest: Manifest) -> torch.Tensor:
    """Stored uint8 pixels -> the float32 input every model takes (and a served model expects)."""
    return preprocess.normalise(x, manifest.mean, manifest.std, manifest.scale)
