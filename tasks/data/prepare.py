"""Stage 1: read the configured data source, split it, and stream each split in chunks into
uint8 ``.npy`` files that later stages memory-map, plus a manifest with the normalisation,
shapes, classes and the data's fingerprint. Memory is bounded by the chunk, not the data; the
bytes written do not depend on the chunk size, so ``dvc repro`` and the flow's cache agree."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import warnings
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from shrinkflow.models import preprocess
from shrinkflow.tasks.config import DataConfig, Params, RegisteredOptions, comes_trained
from shrinkflow.tasks.data.datachecks import check_classes, check_splits, report_duplicates
from shrinkflow.tasks.data.sources import DataError, RawData, load_source
from shrinkflow.tasks.decision.gate import certifiable
from shrinkflow.tasks.errors import first_line
from shrinkflow.tasks.io import atomic_path, write_json
from shrinkflow.tasks.layout import SPLITS, Layout
from shrinkflow.tasks.records import Manifest, load_manifest

log = logging.getLogger(__name__)

CHUNK = 1024  # images decoded, converted and written at a time: what bounds prepare's memory


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


def check_unseen(raw: RawData, params: Params, chunk: int = CHUNK) -> None:
    """A model that comes trained is certified only on images it has not seen: the source must
    declare them, and none of them may also be among the training images (same pixels)."""
    if not raw.n_test:
        raise DataError(
            f"the model comes trained, but data.source {params.data.source} declares no images it has not "
            f"seen, so nothing can be certified: put them in <data.root>/test/<class>/ (beside train/) or "
            "set data.heldout_root"
        )
    n_seen = len(raw.labels) - raw.n_test
    digests = [d for images in raw.chunks(np.arange(len(raw.labels)), chunk) for d in _digests(images)]
    seen = {digest: i for i, digest in enumerate(digests[:n_seen])}
    overlap = [i for i in range(n_seen, len(digests)) if digests[i] in seen]
    if overlap:
        first = raw.paths[overlap[0]] if raw.paths else f"row {overlap[0]}"
        twin = raw.paths[seen[digests[overlap[0]]]] if raw.paths else "a training row"
        raise DataError(
            f"{len(overlap)} of the {raw.n_test} held-out images ({raw.heldout}) are also training images "
            f"(e.g. {first} = {twin}); the model may have seen them, so the certificate would mean nothing"
        )


def _digests(images: np.ndarray) -> list[bytes]:
    return [hashlib.blake2b(image.tobytes(), digest_size=16).digest() for image in images]


def prepare(params: Params, layout: Layout, chunk: int = CHUNK) -> Manifest:
    """Read ``data.source``, split it, and write each split's images and labels as ``.npy``
    (uint8, int64) + manifest, ``chunk`` images at a time."""
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
        check_unseen(raw, params, chunk)
        parts = split_heldout(raw.labels, cfg, params.seed, raw.n_test)
    else:
        check_classes(raw, cfg, layout.root / cfg.root)
        parts = split_indices(raw.labels, cfg, params.seed, raw.n_test)
    check_splits(raw, parts, cfg)
    if too_small := certifiable(params.promote, len(parts["gate"])):
        log.warning(too_small)
    forget_earlier(layout)
    with contextlib.ExitStack() as files:  # every file renamed into place only if all are written
        written = write_splits(raw, parts, layout, chunk, files)
    report_duplicates(parts, written.digests)
    declared = params.model.input.resolved() if hasattr(params.model, "input") else {}
    if declared.get("mean") is not None:
        mean, std, normalisation = list(declared["mean"]), list(declared["std"]), params.model.input.preset
        normalisation = "model" if normalisation == "data" else normalisation
    else:
        (mean, std), normalisation = channel_stats(written.histogram, raw.scale), "data"
    manifest = Manifest(
        source=params.data.source,
        fingerprint=written.fingerprint,
        classes=raw.classes,
        input_shape=list(raw.shape),
        sizes={split: len(idx) for split, idx in parts.items()},
        mean=mean,
        std=std,
        scale=raw.scale,
        resize=cfg.resize,
        resizes=cfg.image_size is not None,
        normalisation=normalisation,
        heldout=raw.heldout if heldout else "",
        origin=_origin(raw, heldout),
    )
    write_json(layout.manifest, asdict(manifest))  # last: without it, nothing here is trusted
    log.info("prepared %s: %s, fingerprint %s", manifest.source, manifest.sizes, manifest.fingerprint[:12])
    return manifest


def forget_earlier(layout: Layout) -> None:
    """Before anything is written: the manifest goes (it is written last, so a prepare that stops
    leaves none, and no stage, cache key or ``dvc commit`` trusts a half-replaced set), and so do
    split files of the older layout, with one line saying why."""
    layout.manifest.unlink(missing_ok=True)
    older = [path for split in SPLITS if (path := layout.prepared / f"{split}.pt").is_file()]
    if older:
        log.info(
            "re-preparing %s: it holds the older layout (%s, whole tensors loaded into memory); splits "
            "are now .npy files read as memory maps",
            layout.prepared,
            ", ".join(p.name for p in older),
        )
    for path in older:
        path.unlink()


@dataclass(frozen=True)
class Written:
    """What streaming the splits measured on the way."""

    fingerprint: str  # sha256 over every split's pixels and labels (see write_splits)
    digests: dict[str, list[bytes]]  # per split, one digest per image: duplicates across splits
    histogram: np.ndarray  # C x 256: the training split's pixel values per channel


def write_splits(
    raw: RawData, parts: dict[str, np.ndarray], layout: Layout, chunk: int, files: contextlib.ExitStack
) -> Written:
    """Stream each split's images from ``raw``, ``chunk`` at a time, into ``<split>-images.npy``
    and its labels into ``<split>-labels.npy`` (temporaries entered into ``files``, renamed when
    it closes). The fingerprint hashes each split's pixels then labels, with their dtype and
    shape: the same value as the earlier ``.pt`` layout gave, whatever the file format."""
    fingerprint = hashlib.sha256()
    digests: dict[str, list[bytes]] = {}
    histogram = np.zeros((raw.shape[0], 256), dtype=np.int64)
    for split in SPLITS:
        rows, shape = parts[split], (len(parts[split]), *map(int, raw.shape))
        fingerprint.update(f"{split}/x/torch.uint8/{shape}".encode())
        digests[split] = []
        with open(files.enter_context(atomic_path(layout.images(split))), "wb") as out:
            header = {"descr": "|u1", "fortran_order": False, "shape": shape}
            np.lib.format.write_array_header_1_0(out, header)
            for images in raw.chunks(rows, chunk):
                data = np.ascontiguousarray(images, dtype=np.uint8).data
                out.write(data)
                fingerprint.update(data)
                digests[split] += _digests(images)
                if split == "train":
                    for c in range(shape[1]):
                        histogram[c] += np.bincount(images[:, c].ravel(), minlength=256)
        labels = raw.labels[rows]
        fingerprint.update(f"{split}/y/torch.int64/{labels.shape}".encode())
        fingerprint.update(labels.tobytes())
        with open(files.enter_context(atomic_path(layout.labels(split))), "wb") as out:
            np.save(out, labels, allow_pickle=False)
    return Written(fingerprint.hexdigest(), digests, histogram)


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


def channel_stats(histogram: np.ndarray, scale: float) -> tuple[list[float], list[float]]:
    """Exact per-channel mean and std of uint8 images over ``scale``, from their value histograms
    (``C x 256`` counts; no float copy of the data set is ever made)."""
    values = np.arange(256, dtype=np.float64) / scale
    mean, std = [], []
    for counts in histogram.astype(np.float64):
        mu = float(counts @ values / counts.sum())
        var = float(counts @ (values - mu) ** 2 / counts.sum())
        mean.append(round(mu, 8))
        std.append(round(max(var, 1e-12) ** 0.5, 8))
    return mean, std


class MappedImages:
    """A split's images as every model takes them: rows of the uint8 memory map, normalised as
    they are read (a batch at a time), so no stage holds a split as float, and concurrent
    workers share one copy of the pixels in the page cache."""

    def __init__(self, pixels: torch.Tensor, manifest: Manifest):
        self.pixels, self.manifest = pixels, manifest

    def __len__(self) -> int:
        return len(self.pixels)

    @property
    def shape(self) -> torch.Size:
        return self.pixels.shape

    def __getitem__(self, rows: slice | torch.Tensor) -> torch.Tensor:
        """The images at ``rows`` (a slice, or a tensor of indices) as normalised float32."""
        return normalise(self.pixels[rows], self.manifest)


def load_split(layout: Layout, split: str) -> tuple[MappedImages, torch.Tensor]:
    """One split: its images, normalised as the manifest says as they are read, and its labels."""
    x, y = load_raw_split(layout, split)
    return MappedImages(x, load_manifest(layout)), y


def load_raw_split(layout: Layout, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One split as stored: uint8 pixels (what a served model takes) and int64 labels. The pixels
    are a tensor over the file's read-only memory map: pages are read when used, shared by every
    worker through the page cache, and never charged as the process's own memory; they are only
    ever indexed or converted (an in-place write would fault)."""
    path = layout.images(split)
    if not layout.manifest.is_file():  # written last: without it the files are not a prepared set
        raise DataError(
            f"{layout.manifest} does not exist: prepare did not finish (or never ran); run "
            "`shrinkflow stage prepare`"
        )
    if not path.is_file() and (older := layout.prepared / f"{split}.pt").is_file():
        raise DataError(
            f"{older} is the older prepared layout (whole tensors); run `shrinkflow stage prepare` to "
            "re-prepare it as memory-mapped .npy files"
        )
    try:
        pixels = np.load(path, mmap_mode="r", allow_pickle=False)
        labels = np.load(layout.labels(split), allow_pickle=False)
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or labels.shape != pixels.shape[:1]:
            raise ValueError(f"{pixels.dtype} pixels {pixels.shape}, {labels.dtype} labels {labels.shape}")
        with warnings.catch_warnings():  # torch has no read-only tensors; see the docstring
            warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
            mapped = torch.from_numpy(pixels)
        return mapped, torch.from_numpy(labels.astype(np.int64, copy=False))
    except FileNotFoundError as exc:
        raise DataError(f"{exc.filename} does not exist; run `shrinkflow stage prepare` first") from None
    except Exception as exc:  # truncated, overwritten, not ours
        first = first_line(exc, 150)
        raise DataError(
            f"{path} is damaged ({first}); run `shrinkflow stage prepare` (or delete {path.parent}) "
            "to rebuild it"
        ) from None


def normalise(x: torch.Tensor, manifest: Manifest) -> torch.Tensor:
    """Stored uint8 pixels -> the float32 input every model takes (and a served model expects)."""
    return preprocess.normalise(x, manifest.mean, manifest.std, manifest.scale)
