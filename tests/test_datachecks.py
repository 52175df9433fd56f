"""Bad data refused at prepare in one line, on real image folders written with PIL: one class (or
data.root a level too high), classes too small for every split, symlink loops, duplicates across
splits, 16-bit PNGs, decompression bombs."""

from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shrinkflow.tasks.config import parse_params
from shrinkflow.tasks.data.prepare import load_raw_split, prepare
from shrinkflow.tasks.data.sources import DataError
from shrinkflow.tasks.layout import Layout
from tests.conftest import run_cli, small_raw, write_params


def _folder(root: Path, counts: dict[str, int], size: int = 8, seed: int = 0) -> Path:
    """An ImageFolder of distinct random grey PNGs, ``counts[class]`` images per class."""
    rng = np.random.default_rng(seed)
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = rng.integers(0, 256, (size, size), dtype=np.uint8)
            Image.fromarray(pixels, mode="L").save(root / name / f"{i:03d}.png")
    return root


def _prepare(tmp_path: Path, root: Path, *overrides: str):
    params = parse_params(small_raw("data.source=imagefolder", f"data.root={root}", *overrides))
    layout = Layout.from_params(params, tmp_path / "project")
    return prepare(params, layout), layout


def _refused(tmp_path: Path, root: Path, pattern: str, *overrides: str) -> str:
    with pytest.raises(DataError, match=pattern) as info:
        _prepare(tmp_path, root, *overrides)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "project").exists(), "nothing written"
    return str(info.value)


def test_a_single_class_is_refused(tmp_path):
    root = _folder(tmp_path / "raw", {"cat": 12})
    _refused(tmp_path, root, r"has one class \('cat'\); a classifier needs at least two")


def test_data_root_one_level_too_high_says_where_the_classes_are(tmp_path):
    _folder(tmp_path / "raw/flowers", {"daisy": 10, "rose": 10})
    message = _refused(tmp_path, tmp_path / "raw", r"has one class \('flowers'\)")
    assert f"set data.root to {tmp_path / 'raw/flowers'}" in message


@pytest.mark.parametrize("few", [1, 2])
def test_a_class_too_small_for_every_split_is_named_with_the_minimum(tmp_path, few):
    root = _folder(tmp_path / "raw", {"cat": 12, "dog": 12, "rare": few})
    message = _refused(tmp_path, root, rf"class 'rare' has {few} image\(s\) but needs at least 10 ")
    assert "data.val_fraction 0.1, data.gate_fraction 0.3, data.test_fraction 0.2" in message
    assert "stratified" not in message, "no raw scikit-learn message with class indices"


def test_the_minimum_follows_the_fractions(tmp_path):
    root = _folder(tmp_path / "raw", {"cat": 12, "dog": 4})
    _refused(tmp_path, root, "'dog' has 4 image.* at least 10 ", "data.val_fraction=0.1")
    quarters = ("data.val_fraction=0.25", "data.gate_fraction=0.25", "data.test_fraction=0.25")
    manifest, _ = _prepare(tmp_path, root, *quarters)
    assert manifest.sizes == {"train": 4, "val": 4, "gate": 4, "test": 4}


def test_symlink_loop_reads_every_image_once(tmp_path):
    root = _folder(tmp_path / "raw", {"cat": 10, "dog": 10})
    (root / "cat/again").symlink_to(root / "cat", target_is_directory=True)  # a loop
    (root / "dog/up").symlink_to(root, target_is_directory=True)  # a loop through the root
    manifest, layout = _prepare(tmp_path, root)
    assert sum(manifest.sizes.values()) == 20
    pixels = [load_raw_split(layout, s)[0] for s in ("train", "val", "gate", "test")]
    rows = {bytes(x.numpy().tobytes()) for split in pixels for x in split}
    assert len(rows) == 20, "no image is repeated within or across splits"


def test_an_outside_file_linked_into_two_classes_is_refused(tmp_path):
    root = _folder(tmp_path / "raw", {"cat": 10, "dog": 10})
    _folder(tmp_path / "elsewhere", {"x": 1})
    for name in ("cat", "dog"):
        (root / name / "linked.png").symlink_to(tmp_path / "elsewhere/x/000.png")
    _refused(tmp_path, root, r"elsewhere/x/000.png is linked from two class folders")


def test_duplicates_across_splits_are_reported(tmp_path, caplog):
    root = _folder(tmp_path / "raw", {"cat": 20, "dog": 20})
    for i in range(20):  # byte-identical copies under other names (not links)
        (root / f"cat/copy-{i:03d}.png").write_bytes((root / f"cat/{i:03d}.png").read_bytes())
    with caplog.at_level(logging.WARNING, logger="shrinkflow.tasks.data.datachecks"):
        _prepare(tmp_path, root)
    warned = [
        r.getMessage() for r in caplog.records if "more than one of train/val/gate/test" in r.getMessage()
    ]
    assert len(warned) == 1 and int(warned[0].split()[0]) > 0


def test_16_bit_png_keeps_its_grey_levels(tmp_path):
    root = tmp_path / "raw"
    levels = np.linspace(0, 65535, 64).astype(np.uint16).reshape(8, 8)
    for name in ("dark", "light"):
        (root / name).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(levels).save(root / name / f"{i}.png")
    assert Image.open(root / "dark/0.png").mode.startswith("I")  # really 16-bit on disk
    _, layout = _prepare(tmp_path, root)
    x = load_raw_split(layout, "train")[0][0, 0].numpy()
    expected = np.rint(levels / 65535 * 255).astype(np.uint8)
    assert np.array_equal(x, expected), "scaled at the real bit depth, not clipped at 255"
    assert len(np.unique(x)) == 64


def _png_claiming(path: Path, width: int, height: int) -> None:
    """A tiny valid PNG whose header claims ``width`` x ``height`` (CRC fixed up)."""
    Image.new("L", (8, 8)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data[12:29]  # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    path.write_bytes(bytes(data))


def test_decompression_bomb_is_a_clean_error(tmp_path):
    root = _folder(tmp_path / "raw", {"cat": 10, "dog": 10})
    _png_claiming(root / "cat/bomb.png", 20000, 20000)
    _refused(tmp_path, root, r"cat/bomb.png: its header claims more pixels than PIL's limit")


def test_cli_refuses_a_single_class_in_one_line(tmp_path):
    root = _folder(tmp_path / "raw", {"cat": 12})
    raw = small_raw("data.source=imagefolder", f"data.root={root}")
    write_params(tmp_path, raw=raw)
    done = run_cli("stage", "prepare", cwd=tmp_path)
    assert done.returncode == 1
    assert [line for line in done.stderr.splitlines() if line.startswith(("error", "Traceback"))] == [
        f"error: data.source imagefolder at {root} has one class ('cat'); a classifier needs at least two"
    ]
    assert not (tmp_path / "data/prepared").exists()
