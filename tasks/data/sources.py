"""Raw data sets by name (``data.source``): each loader turns one kind of data directory into
labels, class names and a reader of uint8 images at the configured channel count and size, so
``prepare`` can stream any rows in chunks and no loader holds a folder of images decoded. A new
source is one function and one line in :data:`LOADERS`."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from shrinkflow.models.preprocess import fit_size, to_channels
from shrinkflow.tasks.config import DataConfig
from shrinkflow.tasks.errors import ShrinkflowError, first_line

log = logging.getLogger(__name__)

IMAGE_LAYOUT = "<root>/<class>/*.png|jpg, or <root>/train/<class>/... and <root>/test/<class>/..."
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


class DataError(ShrinkflowError, RuntimeError):
    """A data directory that is missing, empty or not in the layout its source expects."""


@dataclass(frozen=True)
class RawData:
    """A data set's labels, and its images read on demand: the source's own test split, if it
    has one, last."""

    labels: np.ndarray  # int64, N
    classes: list[str]
    scale: float  # the pixel value that means full intensity (255; 16 for sklearn's digits)
    shape: tuple[int, int, int]  # C x H x W of every image ``read`` returns
    read: Callable[[np.ndarray], np.ndarray]  # rows -> their uint8 images, N x C x H x W
    n_test: int = 0  # the last n_test rows are the source's own test split (or the held-out folder)
    paths: tuple[str, ...] = ()  # each row's file, where the source has files
    heldout: str = ""  # what the last n_test rows are: "<data.root>/test/", "data.heldout_root", ""

    def chunks(self, rows: np.ndarray, size: int) -> Iterator[np.ndarray]:
        """The images of ``rows``, in order, ``size`` at a time."""
        for start in range(0, len(rows), size):
            yield self.read(rows[start : start + size])


Loader = Callable[[DataConfig, Path], RawData]


def load_digits_source(cfg: DataConfig, root: Path) -> RawData:
    """scikit-learn's bundled 8x8 digits (offline); ``root`` is not used."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.uint8)[:, None, :, :]  # integer intensities 0..16
    return in_memory(images, digits.target.astype(np.int64), [str(c) for c in digits.target_names], 16.0, cfg)


def in_memory(
    images: np.ndarray, labels: np.ndarray, classes: list[str], scale: float, cfg: DataConfig, n_test: int = 0
) -> RawData:
    """A source whose files hold every image in one array (bounded: torchvision's and scikit-learn's
    fixed data sets); rows are converted as they are read."""
    channels = cfg.channels or images.shape[1]
    size = cfg.image_size or images.shape[2]
    shape = images.shape[1:] if (channels, size, size) == images.shape[1:] else (channels, size, size)

    def read(rows: np.ndarray) -> np.ndarray:
        x = to_channels(torch.from_numpy(images[rows]), channels)
        return fit_size(x, size, cfg.resize, scale).numpy()

    return RawData(labels, classes, scale, tuple(shape), read, n_test)


def load_image_folder(cfg: DataConfig, root: Path) -> RawData:
    """torchvision's ImageFolder layout, with or without its own ``train/`` and ``test/`` trees; a
    ``data.heldout_root`` folder of the same classes is read as the held-out (test) part."""
    if not root.is_dir():
        raise DataError(f"data.root {root} is not a directory; expected images as {IMAGE_LAYOUT}")
    split = [(root / name).is_dir() for name in ("train", "test")]
    if split[0] != split[1]:  # e.g. train/ and val/: read as two classes, a silent mix-up
        half = "train/" if split[0] else "test/"
        raise DataError(f"{root} has {half} without its pair; expected images as {IMAGE_LAYOUT}")
    trees, heldout = [root], ""
    if all(split):
        trees, heldout = [root / "train", root / "test"], f"{cfg.root}/test/"
    if cfg.heldout_root:
        held = Path(cfg.heldout_root)  # made absolute (from the project) by prepare
        if heldout:
            raise DataError(f"{root} has its own test/ tree and data.heldout_root is set too; keep one")
        if not held.is_dir():
            raise DataError(f"data.heldout_root {held} is not a directory; expected {held}/<class>/*.png|jpg")
        trees, heldout = [root, held], "data.heldout_root"
    found = [_scan(tree) for tree in trees]
    classes = found[0][0]
    if any(c != classes for c, _ in found):
        other = "data.heldout_root" if cfg.heldout_root else "train/ and test/"
        raise DataError(f"{root}: {other} must hold the same class folders")
    files = [f for _, tree_files in found for f in tree_files]
    mode, size = _common_format(files, cfg)
    labels = np.array([label for _, label in files], dtype=np.int64)
    n_test = len(found[1][1]) if len(found) == 2 else 0
    paths = tuple(p for p, _ in files)
    log.info("found %d images of %d classes in %s", len(files), len(classes), root)

    def read(rows: np.ndarray) -> np.ndarray:
        # PIL and torch release the GIL while decoding and resizing, so threads use every core;
        # map keeps the order, so the bytes do not depend on the thread count.
        with ThreadPoolExecutor(DECODE_THREADS) as pool:
            return np.stack(list(pool.map(lambda r: _read(paths[r], mode, size, cfg.resize), rows)))

    shape = (1 if mode == "L" else 3, size, size)
    return RawData(labels, classes, 255.0, shape, read, n_test, paths, heldout)


DECODE_THREADS = os.cpu_count() or 1


def _scan(tree: Path) -> tuple[list[str], list[tuple[str, int]]]:
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    try:
        classes, class_to_idx = find_classes(tree)
        return classes, unique_files(
            make_dataset(tree, class_to_idx, extensions=IMG_EXTENSIONS), tree, class_to_idx
        )
    except FileNotFoundError as exc:
        raise DataError(f"{exc} Expected images as {IMAGE_LAYOUT}") from None


def unique_files(
    files: list[tuple[str, int]], tree: Path, class_to_idx: dict[str, int]
) -> list[tuple[str, int]]:
    """Each image file once, however many paths reach it: torchvision follows symlinks, so a link
    back up the tree (a loop) or a linked copy would repeat images across train, val and test. A
    file inside the tree keeps the class of the folder it really is in; one from outside the tree
    linked into two classes is refused, since it cannot have both labels."""
    real_tree = tree.resolve()
    first: dict[str, tuple[str, int]] = {}
    for path, label in files:
        real = Path(path).resolve()
        if real.is_relative_to(real_tree) and (home := real.relative_to(real_tree).parts[0]) in class_to_idx:
            label = class_to_idx[home]
        seen = first.setdefault(str(real), (path, label))
        if seen[1] != label:
            raise DataError(f"{real} is linked from two class folders ({seen[0]} and {path}); remove one")
    if len(first) < len(files):
        log.warning(
            "%d image path(s) lead to files already read (symlinks); each file is used once",
            len(files) - len(first),
        )
    return list(first.values())  # in the order torchvision found them


def _common_format(files: list[tuple[str, int]], cfg: DataConfig) -> tuple[str, int]:
    """The PIL mode and square size every image is converted to (headers only, no decoding)."""
    if cfg.channels and cfg.image_size:
        return ("L" if cfg.channels == 1 else "RGB"), cfg.image_size
    modes, sizes = set(), set()
    for path, _ in files:
        with _open(path) as img:
            modes.add(img.mode)
            sizes.add(img.size)
    channels = cfg.channels or (1 if modes <= _GRAY_MODES else 3)
    if cfg.image_size:
        return ("L" if channels == 1 else "RGB"), cfg.image_size
    (width, height), *others = sorted(sizes)
    if others or width != height:
        shown = ", ".join(f"{w}x{h}" for w, h in sorted(sizes)[:3])
        raise DataError(f"images are not all one square size ({shown}); set data.image_size to resize them")
    return ("L" if channels == 1 else "RGB"), width


def _open(path: str) -> Image.Image:
    try:
        with warnings.catch_warnings():  # PIL only warns up to twice its pixel limit
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(
            f"{path}: its header claims more pixels than PIL's limit of {Image.MAX_IMAGE_PIXELS:,} "
            f"(a decompression bomb, or an image far too large to train on): {exc}"
        ) from None
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{path} is not a readable image: {exc}") from None


# Integer modes wider than 8 bits, and the largest value a pixel of each can hold.
_WIDE_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535}


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit grey scaled to 0..255 at its real depth (PIL's convert("L") clips at 255, which
    turns a 16-bit image into two grey levels)."""
    if img.mode not in _WIDE_MODES:
        return img
    pixels = np.asarray(img, dtype=np.float64)
    top = _WIDE_MODES[img.mode] if img.mode != "I" or pixels.max() > 255 else 255
    return Image.fromarray(np.rint(pixels.clip(0, top) * (255 / top)).astype(np.uint8))


def _read(path: str, mode: str, size: int, resize: str = "stretch") -> np.ndarray:
    """One file as uint8 ``C x size x size``, converted and resized by the same functions that
    prepare served images (``models/preprocess.py``)."""
    with _open(path) as img:
        try:
            img = _to_8bit(img)
            pixels = np.asarray(img.convert("L" if img.mode in _GRAY_MODES else "RGB"), dtype=np.uint8)
        except OSError as exc:  # a truncated or corrupt body behind a valid header
            raise DataError(f"{path} is not a readable image: {exc}") from None
    x = torch.from_numpy(
        np.array(pixels[None, None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)[None])
    )
    x = to_channels(x, 1 if mode == "L" else 3)
    return fit_size(x, size, resize)[0].numpy()


def torchvision_loader(class_name: str) -> Loader:
    """A loader for one of torchvision's data set classes (train and test splits, local root)."""

    def load(cfg: DataConfig, root: Path) -> RawData:
        import torchvision.datasets

        cls = getattr(torchvision.datasets, class_name)
        try:
            train = cls(str(root), train=True, download=cfg.download)
            test = cls(str(root), train=False, download=cfg.download)
        except (RuntimeError, OSError) as exc:
            hint = "" if cfg.download else " (set data.download: true to fetch them)"
            first = first_line(exc, None)
            raise DataError(
                f"data.source {cfg.source}: {first}; expected {_expected_files(cls, root)}{hint}"
            ) from None
        images = np.concatenate([_as_nchw(train.data), _as_nchw(test.data)])
        labels = np.concatenate([np.asarray(train.targets), np.asarray(test.targets)]).astype(np.int64)
        return in_memory(images, labels, [str(c) for c in train.classes], 255.0, cfg, n_test=len(test.data))

    return load


def _expected_files(cls: type, root: Path) -> str:
    """Where torchvision looks for ``cls``'s files under ``root``, read off the class itself."""
    if hasattr(cls, "resources"):  # MNIST and its relatives: decompressed IDX files
        names = [os.path.splitext(os.path.basename(url))[0] for url, _ in cls.resources]
        return f"{root / cls.__name__ / 'raw'}/{{{','.join(names)}}}"
    names = [name for name, _ in (*cls.train_list, *cls.test_list)]  # CIFAR: pickled batches
    return f"{root / cls.base_folder}/{{{','.join(names)}}}"


def _as_nchw(data) -> np.ndarray:
    array = np.asarray(data, dtype=np.uint8)
    return array[:, None] if array.ndim == 3 else array.transpose(0, 3, 1, 2)


LOADERS: dict[str, Loader] = {
    "digits": load_digits_source,
    "imagefolder": load_image_folder,
    "mnist": torchvision_loader("MNIST"),
    "fashion_mnist": torchvision_loader("FashionMNIST"),
    "cifar10": torchvision_loader("CIFAR10"),
}
# Every source params.yaml accepts has a loader, and nothing else does.
assert set(LOADERS) == set(get_args(DataConfig.model_fields["source"].annotation)), "sources disagree"


def load_source(cfg: DataConfig, root: Path) -> RawData:
    """The data set ``cfg.source`` names, at ``root``, read as the configured channels and size."""
    raw = LOADERS[cfg.source](cfg, root)
    if len(raw.labels) == 0:
        raise DataError(f"data.source {cfg.source} at {root} holds no images")
    return raw
