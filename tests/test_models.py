"""Architectures, strategies (parametrised over the registry) and safe checkpoints."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from shrinkflow.models import STRATEGIES, apply_strategy, build_model, model_spec
from shrinkflow.models.arch.basenet import BaseNet
from shrinkflow.models.checkpoint import CheckpointError, load_checkpoint
from shrinkflow.tasks.io import save_checkpoint
from shrinkflow.tasks.measurement.evaluate import count_flops
from tests.conftest import batch


def _net(**kw) -> BaseNet:
    torch.manual_seed(0)
    return BaseNet(in_channels=1, image_size=8, num_classes=10, channels=(16, 32), hidden=(64,), **kw)


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_basenet_shapes_and_spec_round_trip():
    model = _net(batch_norm=True)
    x, _ = batch(32)
    assert model(x).shape == (32, 10)
    rebuilt = build_model(model_spec(model))
    assert model_spec(rebuilt) == model_spec(model)
    assert _params(rebuilt) == _params(model)


def test_basenet_refuses_inputs_too_small_for_its_pooling():
    with pytest.raises(ValueError, match="too small"):
        BaseNet(in_channels=1, image_size=2, num_classes=10, channels=(8, 8))


def test_unknown_architecture_lists_the_choices():
    with pytest.raises(ValueError, match="choose one of"):
        build_model({"arch": "vgg99"})


# Strategies that cut every channel width by the ratio (the registry-wide checks, over every
# architecture, are in test_strategies.py).
CHANNEL_STRATEGIES = ("width", "prune_l1", "prune_taylor", "prune_fpgm")


@pytest.mark.parametrize("strategy", CHANNEL_STRATEGIES)
@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_strategy_shrinks_and_keeps_the_output_shape(strategy, ratio, tmp_path):
    base = _net()
    x, y = batch(32)
    shrunk = apply_strategy(strategy, copy.deepcopy(base), (x, y), ratio=ratio)
    assert shrunk(x).shape == base(x).shape
    # Channel widths fall by the ratio, so params and FLOPs fall roughly by its square.
    keep = 1 - ratio
    assert _params(shrunk) < _params(base) * (keep + 0.05)
    assert count_flops(shrunk, x[:1]) < count_flops(base, x[:1]) * (keep + 0.05)
    for before, after in zip(model_spec(base)["channels"], model_spec(shrunk)["channels"], strict=True):
        assert after == round(before * keep)
    # Save -> load gives the identical function.
    path = tmp_path / "m.pt"
    digest = save_checkpoint(shrunk, path)
    loaded, _ = load_checkpoint(path, sha256=digest)
    assert torch.equal(loaded(x), shrunk.eval()(x))


@pytest.mark.parametrize("strategy", sorted(s for s in CHANNEL_STRATEGIES if STRATEGIES[s].warm_start))
def test_warm_start_strategies_keep_the_baselines_weights(strategy):
    """Pruning removes channels but keeps the survivors' trained weights (a tiny ratio keeps
    the outputs close), unlike a fresh re-initialisation."""
    base = _net()
    x, y = batch(32)
    shrunk = apply_strategy(strategy, copy.deepcopy(base), (x, y), ratio=0.05)
    drift = (shrunk(x) - base.eval()(x)).abs().mean() / base(x).abs().mean()
    assert drift < 0.5


def test_unknown_strategy_lists_the_choices():
    with pytest.raises(ValueError, match="choose one of"):
        apply_strategy("shrinkray", _net(), batch(32), ratio=0.5)


def test_checkpoint_with_wrong_sha256_is_refused(tmp_path):
    path = tmp_path / "m.pt"
    digest = save_checkpoint(_net(), path)
    with path.open("ab") as fh:
        fh.write(b"tampered")
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(path, sha256=digest)


class _Payload:
    def __reduce__(self):
        return (open, (str(_Payload.marker), "w"))


def test_planted_pickle_is_never_executed(tmp_path):
    _Payload.marker = tmp_path / "pwned"
    path = tmp_path / "m.pt"
    torch.save({"format": "shrinkflow.checkpoint/1", "spec": {}, "state_dict": _Payload()}, path)
    assert not _Payload.marker.exists()
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_checkpoint(path)
    assert not _Payload.marker.exists(), "loading a checkpoint executed pickled code"
    path.write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not _Payload.marker.exists()


def test_truncated_and_foreign_checkpoints_are_refused(tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(_net(), path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match="not a shrinkflow"):
        load_checkpoint(path)
