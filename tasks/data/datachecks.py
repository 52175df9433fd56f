"""Expectations on the data itself, checked at prepare: enough classes and enough images of each
class for every split (before anything is written), and no image in two splits unnoticed (from
the digests taken while the images are written). Each failure is one :class:`DataError` line
naming the class and what it needs."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from shrinkflow.tasks.config import DataConfig
from shrinkflow.tasks.data.sources import DataError, RawData

log = logging.getLogger(__name__)


def check_classes(raw: RawData, cfg: DataConfig, root: Path) -> None:
    """At least two classes, and each large enough to appear in train, val, gate and test."""
    present = np.unique(raw.labels)
    if len(present) < 2:
        only = raw.classes[present[0]] if len(present) else "none"
        nested = cfg.source == "imagefolder" and any(p.is_dir() for p in (root / only).glob("*"))
        hint = f"; if the folders in {root / only} are the classes, set data.root to {root / only}"
        raise DataError(
            f"data.source {cfg.source} at {root} has one class ({only!r}); a classifier needs at "
            f"least two{hint if nested else ''}"
        )
    train_part = raw.labels[: len(raw.labels) - raw.n_test]
    need = min_per_class(cfg, own_test=bool(raw.n_test))
    counts = np.bincount(train_part, minlength=len(raw.classes))
    for label in np.argsort(counts, kind="stable"):
        if counts[label] < need:
            where = "in its training split " if raw.n_test else ""
            raise DataError(
                f"class {raw.classes[label]!r} has {counts[label]} image(s) {where}but needs at least "
                f"{need} to appear in train, val, gate and test ({_fractions(cfg, bool(raw.n_test))}); add "
                "images or remove the class"
            )
    if raw.n_test:
        in_test = np.bincount(raw.labels[-raw.n_test :], minlength=len(raw.classes))
        if missing := [raw.classes[c] for c in np.flatnonzero(in_test == 0)]:
            raise DataError(f"class {missing[0]!r} has no images in the source's own test split")


def min_per_class(cfg: DataConfig, own_test: bool) -> int:
    """The fewest images of one class a stratified split can spread over every split: each split
    that is carved out by a fraction needs one image per ``1 / fraction``."""
    fractions = [cfg.val_fraction, cfg.gate_fraction] + ([] if own_test else [cfg.test_fraction])
    return max(3 if own_test else 4, math.ceil(1 / min(fractions) - 1e-9))


def _fractions(cfg: DataConfig, own_test: bool) -> str:
    shown = f"data.val_fraction {cfg.val_fraction}, data.gate_fraction {cfg.gate_fraction}"
    return shown if own_test else f"{shown}, data.test_fraction {cfg.test_fraction}"


def check_splits(raw: RawData, parts: dict[str, np.ndarray], cfg: DataConfig) -> None:
    """Every class in every split."""
    own_test = bool(raw.n_test)
    for split, idx in parts.items():
        counts = np.bincount(raw.labels[idx], minlength=len(raw.classes))
        for label in np.flatnonzero((counts == 0) & (np.bincount(raw.labels, minlength=len(counts)) > 0)):
            total = int((raw.labels == label).sum())
            more = " or raise data.max_train_samples" if split == "train" and cfg.max_train_samples else ""
            raise DataError(
                f"class {raw.classes[label]!r} ({total} images) got none in {split}; give it at least "
                f"{min_per_class(cfg, own_test)} ({_fractions(cfg, own_test)}){more}"
            )


def report_duplicates(parts: dict[str, np.ndarray], digests: dict[str, list[bytes]]) -> None:
    """Warn about images whose exact pixels occur in more than one split (``digests``: each
    split's per-image digests, in the order of ``parts``)."""
    shared = duplicates_across_splits(parts, digests)
    if shared:
        log.warning(
            "%d image(s) occur in more than one of train/val/gate/test with identical pixels (e.g. row %d); "
            "test accuracy overstates generalisation by that much",
            len(shared),
            shared[0],
        )


def duplicates_across_splits(parts: dict[str, np.ndarray], digests: dict[str, list[bytes]]) -> list[int]:
    """Rows whose exact pixels also occur in another split (first occurrence per split)."""
    seen: dict[bytes, str] = {}
    shared = []
    for split, idx in parts.items():
        for row, key in zip(idx, digests[split], strict=True):
            if seen.setdefault(key, split) != split:
                shared.append(int(row))
    return shared
