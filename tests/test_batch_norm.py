"""BatchNorm statistics are recomputed after every structural change: after a strategy that
changes shapes (on the calibration batch), at the end of every fine-tuning (on training images),
and on a brought baseline whose stored statistics do not reproduce its accuracy. A pruned
network scored with the statistics of the channels it had is at chance (#33: a pruned
MobileNetV3-Small scored 10%, DenseNet-121 83%, against baselines of 86% and 98%)."""

from __future__ import annotations

import copy
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from sklearn.datasets import load_digits
from torch import nn

from shrinkflow.models import apply_strategy
from shrinkflow.tasks.config import TrainConfig, load_params
from shrinkflow.tasks.data.prepare import prepare
from shrinkflow.tasks.layout import Layout
from shrinkflow.tasks.records import load_record
from shrinkflow.tasks.training.engine import fit
from shrinkflow.tasks.training.train import shrink_candidate, train_baseline
from tests.conftest import batch
from tests.zoo import MEAN, STD, user_trains


def _net() -> nn.Module:
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )
    net.num_classes = 10  # what the pruner keeps
    return net


def _statistics(model: nn.Module) -> list[torch.Tensor]:
    return [
        t.clone()
        for m in model.modules()
        if isinstance(m, nn.BatchNorm2d)
        for t in (m.running_mean, m.running_var)
    ]


def test_a_strategy_that_changes_shapes_leaves_statistics_of_its_calibration_batch():
    torch.manual_seed(0)
    model, (x, y) = _net(), batch(96, mean=2, std=3)
    shrunk = apply_strategy("prune_l1", copy.deepcopy(model), (x, y), ratio=0.5)
    with torch.no_grad():  # what the first BatchNorm sees, a batch of 64 at a time
        seen = [shrunk[0](x[i : i + 64]) for i in range(0, len(x), 64)]
    norm = shrunk[1]
    assert torch.allclose(
        norm.running_mean, torch.stack([b.mean((0, 2, 3)) for b in seen]).mean(0), atol=1e-5
    )
    assert torch.allclose(norm.running_var, torch.stack([b.var((0, 2, 3)) for b in seen]).mean(0), rtol=1e-4)
    assert not shrunk.training
    # a strategy that keeps the shapes leaves the statistics alone
    masked = apply_strategy("magnitude", copy.deepcopy(model), (x, y), ratio=0.5)
    assert all(torch.equal(a, b) for a, b in zip(_statistics(masked), _statistics(model), strict=True))


def test_fine_tuning_ends_with_statistics_of_its_training_images_unaugmented():
    torch.manual_seed(0)
    model, train, val = _net(), batch(256, mean=2, std=3), batch(64, seed=1, mean=2, std=3)
    cfg = TrainConfig(
        epochs=1, batch_size=32, optimizer="adamw", lr=1e-3, precision="fp32", channels_last=False
    )
    fit(model, train, val, cfg, seed=0, augment="crop_flip")
    recomputed = copy.deepcopy(model)
    for m in recomputed.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        recomputed.train()
        for i in range(0, 256, 64):
            recomputed(train[0][i : i + 64])
    assert all(
        torch.allclose(a, b, rtol=1e-4, atol=1e-5)
        for a, b in zip(_statistics(model), _statistics(recomputed), strict=True)
    )


# --- torchvision networks a user trained, pruned and fine-tuned for one epoch -------------------------


def _write_folder(root: Path, seen: int) -> Path:
    """``root/{train,test}/<digit>/*.png``: scikit-learn's digits, grey, at 32 px (as
    tests/zoo.py writes them), ``seen`` for training and the last 397 never seen."""
    digits = load_digits()
    x = torch.from_numpy(digits.images).float()[:, None] * (255 / 16)
    images = nn.functional.interpolate(x, size=32, mode="bilinear").round().clamp(0, 255)[:, 0]
    for i in [*range(seen), *range(1400, len(images))]:
        folder = root / ("train" if i < seen else "test") / str(digits.target[i])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i].to(torch.uint8).numpy(), mode="L").save(folder / f"{i:04d}.png")
    return root


# (network, training images, the user's epochs). Before statistics were recomputed the issue
# measured 10% and 83% against baselines of 86% and 98%; here the halved networks end one epoch
# at 85.0% against 87.1% (MobileNetV3-Small) and 89.3% against 92.9% (DenseNet-121). The
# fine-tuning rate decides how near: 3e-4 left MobileNetV3-Small at 72.1%, 3e-3 DenseNet-121 at
# 83.6%; 1e-3 suits both. MobileNetV3-Small, small already, needs the 1,400 images (from
# 500 it reached 51% against 77%).
FAMILIES = [("mobilenet_v3_small", 1400, 4), ("densenet121", 500, 2)]


@pytest.mark.slow
@pytest.mark.scenario
@pytest.mark.parametrize(("name", "seen", "epochs"), FAMILIES)
def test_a_pruned_torchvision_network_stays_near_its_baseline_after_one_epoch(
    tmp_path, one_thread, name, seen, epochs
):
    images = _write_folder(tmp_path / "images", seen)
    user_trains(name, {}, images, tmp_path / "weights.pt", epochs, lr=3e-3)
    raw = {
        "seed": 0,
        "data": {
            "source": "imagefolder",
            "root": "images",
            "val_fraction": 0.3,
            "gate_fraction": 0.4,
            "test_fraction": 0.15,
        },
        "model": {
            "arch": "torchvision",
            "name": name,
            "weights": "weights.pt",
            "input": {"mean": [MEAN] * 3, "std": [STD] * 3},
        },
        "train": {"epochs": 1, "batch_size": 32, "optimizer": "adamw", "lr": 0.001},
        "shrink": {"epochs": 1, "candidates": {"l1-50": {"strategy": "prune_l1", "ratio": 0.5}}},
        "promote": {"model_name": f"bn-{uuid.uuid4().hex[:8]}", "tolerance": 5},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    params = load_params(tmp_path / "params.yaml")
    layout = Layout.from_params(params, tmp_path)
    prepare(params, layout)
    base = train_baseline(params, layout)
    shrink_candidate(params, layout, "l1-50")
    pruned = load_record(layout, "l1-50")
    assert base.best_val_acc > 80, base.origin
    assert pruned.status == "ok" and pruned.best_val_acc >= base.best_val_acc - 5, pruned.history
