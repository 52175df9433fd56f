"""``train.device``: validated up front, and the training loop hands models back on the CPU."""

from __future__ import annotations

import pytest
import torch

from shrinkflow.models import build_model
from shrinkflow.tasks.config import ConfigError, parse_params
from shrinkflow.tasks.training.engine import evaluate, fit, model_device, predict, resolve_device
from tests.conftest import small_raw


def test_device_defaults_to_auto_and_resolves_to_what_torch_sees():
    params = parse_params(small_raw())
    assert params.train.device == "auto"
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu").type == "cpu"


def test_unknown_device_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="train.device"):
        parse_params(small_raw("train.device=tpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_refused_when_the_config_is_read():
    with pytest.raises(ConfigError, match="train.device: cuda was requested but torch sees no CUDA"):
        parse_params(small_raw("train.device=cuda"))


def test_cpu_training_returns_a_cpu_model_that_learns():
    params = parse_params(small_raw("train.device=cpu", "train.epochs=10"))
    generator = torch.Generator().manual_seed(0)
    # Two separable blobs: any working loop fits them.
    x = torch.randn(256, 1, 8, 8, generator=generator)
    y = (x.mean(dim=(1, 2, 3)) > 0).long()
    torch.manual_seed(0)
    model = build_model(
        {
            "arch": "basenet",
            "in_channels": 1,
            "image_size": 8,
            "num_classes": 2,
            "channels": [4],
            "hidden": [8],
        }
    )
    result = fit(model, (x, y), (x, y), params.train, seed=0)
    assert model_device(model).type == "cpu"
    assert all(t.device.type == "cpu" for t in model.state_dict().values())
    assert predict(model, x).device.type == "cpu"
    assert evaluate(model, (x, y)) == result.best_val_acc > 75
