"""Data sources on real files: an ImageFolder of real CIFAR-10 JPEGs (read from the shared tarball
in place), MNIST's IDX files through torchvision, the one-line errors for missing or malformed
data directories, seeded augmentation, and the key that lets the flow reuse a baseline."""

from __future__ import annotations

import gzip
import json
import shutil
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from shrinkflow.models.checkpoint import load_checkpoint
from shrinkflow.tasks.config import ConfigError, DataConfig, TrainConfig, parse_params
from shrinkflow.tasks.data.prepare import load_raw_split, load_split, prepare
from shrinkflow.tasks.data.sources import LOADERS, DataError
from shrinkflow.tasks.layout import Layout
from shrinkflow.tasks.pipeline.cache import baseline_key, intact
from shrinkflow.tasks.records import load_record
from shrinkflow.tasks.store.tracking import Tracker
from shrinkflow.tasks.training.engine import augment_batch, fit
from shrinkflow.tasks.training.train import train_baseline
from tests.conftest import REPO, run_cli, small_raw, write_params

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CIFAR_TAR = SHARED / "cifar10-jpg.tar.gz"
MNIST_T10K = SHARED / "mnist-t10k"
CIFAR_CLASSES = sorted(
    ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
)
TINY_MODEL = ("model.channels=[8, 16]", "model.hidden=[32]", "train.epochs=2")


def _params(*overrides: str):
    return parse_params(small_raw(*overrides))


@pytest.fixture(scope="session")
def cifar_folder(tmp_path_factory) -> Path:
    """320 real CIFAR-10 JPEGs in ImageFolder layout: train/<class>/ (24 each), test/<class>/ (8 each)."""
    root = tmp_path_factory.mktemp("cifar")
    keep = {"train": 24, "test": 8}
    with tarfile.open(CIFAR_TAR, "r:gz") as tar:
        for member in tar:  # streamed: only the wanted members are written
            parts = member.name.split("/")
            if member.isfile() and len(parts) == 3 and int(Path(parts[2]).stem) < keep.get(parts[0], 0):
                tar.extract(member, root, filter="data")
    return root


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory) -> Path:
    """A torchvision MNIST root from the real t10k IDX files. The shared copy has no training
    files, so the test set stands in for both (torchvision insists on all four)."""
    raw = tmp_path_factory.mktemp("mnist") / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for kind in ("images-idx3", "labels-idx1"):
        with gzip.open(MNIST_T10K / f"t10k-{kind}-ubyte.gz") as src:
            (raw / f"t10k-{kind}-ubyte").write_bytes(src.read())
        (raw / f"train-{kind}-ubyte").symlink_to(raw / f"t10k-{kind}-ubyte")
    return raw.parents[1]


def test_image_folder_runs_through_prepare_and_baseline(cifar_folder, tmp_path):
    params = _params("data.source=imagefolder", f"data.root={cifar_folder}", *TINY_MODEL)
    layout = Layout.from_params(params, tmp_path)
    manifest = prepare(params, layout)
    assert manifest.classes == CIFAR_CLASSES and manifest.input_shape == [3, 32, 32]
    assert manifest.sizes["test"] == 80, "the folder's own test/ tree is the test split"
    assert manifest.sizes["train"] + manifest.sizes["val"] + manifest.sizes["gate"] == 240
    assert load_raw_split(layout, "train")[0].dtype == torch.uint8, "images are stored compactly"
    x, y = load_split(layout, "train")
    assert x[:].dtype == torch.float32 and x[:].mean(dim=(0, 2, 3)).abs().max() < 1e-3
    counts = torch.bincount(y)
    assert len(counts) == 10 and counts.max() - counts.min() <= 1, "stratified"

    record = train_baseline(params, layout)
    model, _ = load_checkpoint(layout.root / record.checkpoint, sha256=record.sha256)
    assert (model.in_channels, model.image_size, model.num_classes) == (3, 32, 10)
    assert record.status == "ok" and len(record.history) == 2


def test_image_folder_resizes_converts_and_subsets(cifar_folder, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(cifar_folder / "train", mixed)
    # Real images in other sizes, channel counts and formats, as a user's folder would have them.
    Image.open(mixed / "cat/0000.jpg").convert("L").resize((48, 40)).save(mixed / "cat/grey.png")
    Image.open(mixed / "dog/0000.jpg").convert("RGBA").resize((64, 64)).save(mixed / "dog/big.png")

    native = _params("data.source=imagefolder", f"data.root={mixed}")
    with pytest.raises(DataError, match="not all one square size.*48x40.*set data.image_size"):
        prepare(native, Layout.from_params(native, tmp_path / "a"))

    params = _params(
        "data.source=imagefolder", f"data.root={mixed}", "data.image_size=16", "data.max_train_samples=50"
    )
    manifest = prepare(params, Layout.from_params(params, tmp_path / "b"))
    assert manifest.input_shape == [3, 16, 16] and manifest.sizes["train"] == 50
    assert sum(manifest.sizes.values()) < 242, "no test/ tree: val and test are carved out, train subset"

    grey = _params("data.source=imagefolder", f"data.root={mixed}", "data.image_size=12", "data.channels=1")
    assert prepare(grey, Layout.from_params(grey, tmp_path / "c")).input_shape == [1, 12, 12]


def test_mnist_through_torchvision_from_local_idx_files(mnist_root, tmp_path):
    params = _params("data.source=mnist", f"data.root={mnist_root}", "data.max_train_samples=500")
    layout = Layout.from_params(params, tmp_path / "native")
    manifest = prepare(params, layout)
    assert manifest.input_shape == [1, 28, 28] and manifest.num_classes == 10
    assert manifest.sizes == {"train": 500, "val": 1000, "gate": 3000, "test": 10000}
    assert manifest.classes[0] == "0 - zero"
    x, _ = load_split(layout, "test")
    assert abs(float(x[:].mean())) < 0.2 and x.shape == (10000, 1, 28, 28)

    resized = _params(
        "data.source=mnist",
        f"data.root={mnist_root}",
        "data.image_size=14",
        "data.channels=3",
        "data.max_train_samples=200",
    )
    assert prepare(resized, Layout.from_params(resized, tmp_path / "small")).input_shape == [3, 14, 14]


def _loose_files(root: Path) -> None:
    root.mkdir()
    (root / "0001.jpg").write_bytes(b"not in a class folder")


def _empty_class(root: Path) -> None:
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    (root / "cat/a.png").write_bytes(b"")
    (root / "dog/notes.txt").write_text("no images here")


def _train_and_val(root: Path) -> None:
    for tree in ("train/cat", "val/cat"):
        (root / tree).mkdir(parents=True)


def _corrupt_image(root: Path) -> None:
    (root / "cat").mkdir(parents=True)
    (root / "cat/broken.jpg").write_bytes(b"\xff\xd8 truncated jpeg")


def _cut_png(root: Path) -> None:
    """Among good images, a real PNG cut in half: its header is valid, its pixels are not all there."""
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True)
        for i in range(30):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / label / f"{i}.png")
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / "cat/cut.png")
    data = (root / "cat/cut.png").read_bytes()
    (root / "cat/cut.png").write_bytes(data[: len(data) // 2])


BAD_DATA = [
    ("imagefolder", None, r"is not a directory; expected images as <root>/<class>/\*.png\|jpg"),
    ("imagefolder", _loose_files, "Couldn't find any class folder.*Expected images as <root>/<class>/"),
    ("imagefolder", _empty_class, "Found no valid file for the classes dog.*Expected images as"),
    ("imagefolder", _corrupt_image, r"broken.jpg is not a readable image"),
    ("imagefolder", _cut_png, r"cut.png is not a readable image: image file is truncated"),
    ("imagefolder", _train_and_val, r"has train/ without its pair; expected images as"),
    ("mnist", None, r"expected .*/MNIST/raw/\{train-images-idx3-ubyte,.*\(set data.download: true"),
    ("fashion_mnist", None, r"expected .*/FashionMNIST/raw/\{train-images-idx3-ubyte"),
    ("cifar10", None, r"expected .*/cifar-10-batches-py/\{data_batch_1,.*test_batch"),
]


@pytest.mark.parametrize(
    "source,make,message", BAD_DATA, ids=[f"{s}-{m and m.__name__}" for s, m, _ in BAD_DATA]
)
def test_missing_or_malformed_data_gives_a_clear_error(tmp_path, source, make, message):
    root = tmp_path / "raw"
    if make:
        make(root)
    params = _params(f"data.source={source}", f"data.root={root}")
    with pytest.raises(DataError, match=message) as info:
        prepare(params, Layout.from_params(params, tmp_path))
    assert "\n" not in str(info.value)


def test_every_source_is_registered_and_declared():
    for source in LOADERS:
        assert _params(f"data.source={source}").data.source == source
    with pytest.raises(ConfigError, match="data.source.*'digits'.*'cifar10'"):
        _params("data.source=imagenet")
    with pytest.raises(ConfigError, match="unknown key 'data.colour'"):
        _params("data.colour=red")
    with pytest.raises(ConfigError, match="data.download applies to torchvision sources only"):
        _params("data.download=true")
    with pytest.raises(ConfigError, match="data.augment"):
        _params("data.augment=rotate")


def test_dvc_stages_depend_on_every_data_key_they_read():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    keys = {f"data.{name}" for name in DataConfig.model_fields}
    assert {p for p in stages["prepare"]["params"] if p.startswith("data")} == keys - {"data.augment"}
    assert "${data.root}" in stages["prepare"]["deps"], "new or changed raw files re-run prepare"
    for training in (stages["baseline"], stages["shrink"]["do"]):
        assert "data.augment" in training["params"] and "data" not in training["params"]
    # DVC refuses a stage whose params are missing from params.yaml, so every key is spelled out.
    assert {f"data.{k}" for k in yaml.safe_load((REPO / "params.yaml").read_text())["data"]} == keys


def test_cli_reports_a_missing_data_directory_in_one_line(tmp_path):
    raw = small_raw("data.source=cifar10", "data.root=nowhere")
    write_params(tmp_path, raw=raw)
    done = run_cli("stage", "prepare", cwd=tmp_path)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("error: data.source cifar10: ") and f"{tmp_path}/nowhere/cifar-10-batches-py" in last
    )
    assert "Traceback" not in done.stderr


def test_augmentation_is_a_seeded_crop_and_flip_of_each_image():
    x = torch.arange(4 * 3 * 16 * 16, dtype=torch.float32).view(4, 3, 16, 16)
    out = augment_batch(x, "crop_flip", torch.Generator().manual_seed(0))
    again = augment_batch(x, "crop_flip", torch.Generator().manual_seed(0))
    assert torch.equal(out, again) and out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    windows = [padded[:, :, t : t + 16, s : s + 16] for t in range(5) for s in range(5)]
    for i in range(4):  # each output is a window of its own padded image, possibly mirrored
        assert any(torch.equal(out[i], w[i]) or torch.equal(out[i], w[i].flip(-1)) for w in windows)
    assert augment_batch(x, "none", torch.Generator()) is x


def test_augmented_training_is_deterministic_even_in_concurrent_threads(tmp_path):
    params = _params()
    layout = Layout.from_params(params, tmp_path)
    manifest = prepare(params, layout)
    train, val = load_split(layout, "train"), load_split(layout, "val")
    models = []
    for _ in range(4):
        torch.manual_seed(0)
        models.append(_tiny_model(manifest))

    def train_one(model, augment="crop_flip"):
        result = fit(model, train, val, TrainConfig(epochs=1), seed=0, augment=augment)
        return result.history, model.state_dict()

    alone = train_one(models[0])
    with ThreadPoolExecutor(2) as pool:  # as shrink candidates train: side by side, in threads
        together = list(pool.map(train_one, models[1:3]))
    for history, state in together:
        assert history == alone[0] and all(torch.equal(state[k], alone[1][k]) for k in state)
    assert train_one(models[3], augment="none")[0] != alone[0], "augmentation changes what is learnt"


def _tiny_model(manifest):
    from shrinkflow.models import build_model

    c, size, _ = manifest.input_shape
    return build_model(
        {
            "arch": "basenet",
            "in_channels": c,
            "image_size": size,
            "num_classes": manifest.num_classes,
            "channels": [8, 16],
            "hidden": [32],
        }
    )


def test_baseline_key_follows_data_config_and_checkpoint(trained_layout):
    root = trained_layout.root
    tracker = Tracker(f"sqlite:///{root / 'keys.db'}", "keys")

    def key(*overrides, store=tracker):
        params = _params(*overrides)
        return baseline_key(params, Layout.from_params(params, root), store.identity())

    assert key() == key(), "stable"
    assert key("train.lr=0.01") != key() and key("model.hidden=[64]") != key()
    assert key("data.augment=crop") != key()
    assert key("promote.tolerance=3") == key(), "sections the baseline does not read do not matter"
    assert key(store=Tracker(f"sqlite:///{root / 'other.db'}", "keys")) != key(), "runs live in one store"
    before = key()
    manifest = json.loads(trained_layout.manifest.read_text())
    trained_layout.manifest.write_text(json.dumps({**manifest, "fingerprint": "0" * 64}))
    assert key() != before, "other data, other key"

    record = load_record(trained_layout, "baseline")
    assert intact(trained_layout, "baseline", record)
    with open(trained_layout.checkpoint("baseline"), "ab") as fh:
        fh.write(b"tampered")
    assert not intact(trained_layout, "baseline", record)
    trained_layout.checkpoint("baseline").unlink()
    assert not intact(trained_layout, "baseline", record)


def test_stored_digits_are_exact_integers_with_their_scale(tmp_path):
    params = _params()
    layout = Layout.from_params(params, tmp_path)
    manifest = prepare(params, layout)
    stored = load_raw_split(layout, "train")[0]
    assert stored.dtype == torch.uint8 and int(stored.max()) == 16 and manifest.scale == 16.0
    x = load_split(layout, "train")[0][:]
    assert np.isclose(float(x.mean()), 0.0, atol=1e-5) and np.isclose(float(x.std()), 1.0, atol=1e-3)


def _prepared_files(layout: Layout) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(layout.prepared.iterdir())}


def test_prepared_bytes_depend_on_neither_the_run_nor_the_chunk_size(cifar_folder, tmp_path):
    """Decoded by several threads, streamed in chunks of 1024 or of 7 images: the same files."""
    params = _params("data.source=imagefolder", f"data.root={cifar_folder}")
    runs = [Layout.from_params(params, tmp_path / name) for name in ("a", "b", "c")]
    manifests = [prepare(params, runs[0]), prepare(params, runs[1]), prepare(params, runs[2], chunk=7)]
    assert manifests[0] == manifests[1] == manifests[2]
    files = [_prepared_files(layout) for layout in runs]
    assert files[0] == files[1] == files[2] and len(files[0]) == 9  # 4 x (images, labels) + manifest
    pixels = np.load(runs[0].images("train"), mmap_mode="r", allow_pickle=False)
    assert pixels.dtype == np.uint8 and pixels.shape == (manifests[0].sizes["train"], 3, 32, 32)


def test_an_older_pt_layout_is_refused_then_re_prepared(tmp_path, caplog):
    params = _params()
    layout = Layout.from_params(params, tmp_path)
    prepare(params, layout)
    for split in ("train", "val", "gate", "test"):  # what an earlier version left
        x, y = load_raw_split(layout, split)
        torch.save({"x": x.clone(), "y": y}, layout.prepared / f"{split}.pt")
        layout.images(split).unlink()
    with pytest.raises(DataError, match=r"train.pt is the older prepared layout.*shrinkflow stage prepare"):
        load_split(layout, "train")
    with caplog.at_level("INFO", logger="shrinkflow.tasks.data.prepare"):
        prepare(params, layout)
    (line,) = [r.getMessage() for r in caplog.records if "older layout" in r.getMessage()]
    assert "re-preparing" in line and "train.pt" in line
    assert not list(layout.prepared.glob("*.pt")) and len(load_split(layout, "train")[0]) == 718


def test_a_prepare_killed_mid_write_leaves_nothing_to_trust(tmp_path):
    """The process is killed (SIGXFSZ: a file-size limit) while it writes the first split, over an
    earlier complete prepare: no manifest is left (so no stage, cache key or `dvc commit` takes the
    files), only temporaries the next run sweeps, and the stages refuse in one line."""
    import signal
    import subprocess
    import sys

    from shrinkflow.tasks.io import sweep_temporaries

    write_params(tmp_path)
    params = _params()
    layout = Layout.from_params(params, tmp_path)
    prepare(params, layout)
    earlier = _prepared_files(layout)
    code = (
        "import resource, signal\n"
        "from shrinkflow.tasks.config import load_params\n"
        "from shrinkflow.tasks.layout import Layout\n"
        "from shrinkflow.tasks.data.prepare import prepare\n"
        "params = load_params('params.yaml')\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it; the kernel's default kills\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))\n"
        "prepare(params, Layout.from_params(params, '.'))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, timeout=300)
    assert done.returncode == -signal.SIGXFSZ, done.stderr.decode()[-2000:]
    assert not layout.manifest.exists()
    left = sweep_temporaries(layout.prepared)
    assert left and all(p.name.startswith(".train-images.npy.") for p in left)
    assert set(_prepared_files(layout)) == set(earlier) - {"manifest.json"}
    with pytest.raises(DataError, match="did not finish.*shrinkflow stage prepare"):
        load_split(layout, "train")


@pytest.mark.scenario
def test_training_runs_under_a_memory_limit_smaller_than_the_data_as_float32(mnist_root, tmp_path):
    """The baseline stage in a process that may allocate 384 MiB more than its imports took
    (RLIMIT_DATA; the read-only maps of the prepared files are not charged to it), about half the
    data as float32 (737 MB); the test split alone as float (491 MB) does not fit there."""
    import subprocess
    import sys

    overrides = (
        "data.source=mnist",
        f"data.root={mnist_root}",
        "data.channels=3",
        "data.image_size=64",
        "data.max_train_samples=1000",
        "model.channels=[4, 8]",
        "model.hidden=[16]",
        "train.epochs=1",
    )
    write_params(tmp_path, *overrides)
    params = _params(*overrides)
    manifest = prepare(params, Layout.from_params(params, tmp_path))
    per_image = 4 * int(np.prod(manifest.input_shape))
    limit = 384 << 20
    assert per_image * sum(manifest.sizes.values()) > 1.8 * limit
    assert per_image * manifest.sizes["test"] > limit
    code = f"""
import resource
import torch._dynamo  # noqa: F401  (imported by the stage on first use: counted before the limit)
from shrinkflow.tasks.config import load_params
from shrinkflow.tasks.layout import Layout
from shrinkflow.tasks.data.prepare import load_split
from shrinkflow.tasks.training.train import train_baseline

status = dict(line.split(":", 1) for line in open("/proc/self/status"))
in_use = int(status["VmData"].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_DATA, (in_use + {limit}, resource.RLIM_INFINITY))
params = load_params("params.yaml")
layout = Layout.from_params(params, ".")
print("trained", train_baseline(params, layout).best_val_acc)
try:
    load_split(layout, "test")[0][:]  # a whole split as float: what every stage used to hold
except RuntimeError as exc:
    print("a whole split as float does not fit:", exc)
"""
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "trained" in done.stdout and "a whole split as float does not fit" in done.stdout, done.stdout
