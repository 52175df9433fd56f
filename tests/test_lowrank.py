"""The lowrank strategy and factorised networks: crafted layers of known rank, exact costs, the
rank rules, every architecture saved and rebuilt from its spec (pruned first for some), int8 after
it, and a lowrank candidate through shrink -> evaluate (ONNX parity) -> the registered pyfunc."""

from __future__ import annotations

import copy
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from shrinkflow.models import ARCHITECTURES, apply_strategy, build_model, model_spec
from shrinkflow.models.arch.given import user_code
from shrinkflow.models.checkpoint import load_checkpoint
from shrinkflow.models.lowrank import (
    check_ranks,
    energy_ranks,
    factorised,
    layer_cost,
    low_rank_layers,
    ratio_ranks,
    survey,
)
from shrinkflow.models.quantize import Int8Net
from shrinkflow.tasks.config import ConfigError, parse_params
from shrinkflow.tasks.io import save_checkpoint
from shrinkflow.tasks.measurement.evaluate import count_flops
from tests.conftest import REPO, batch, small_raw

# One torch thread for every test here (conftest's one_thread says why).
pytestmark = pytest.mark.usefixtures("one_thread")


def _orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64))[0]


def _record(layer: nn.Module, x: torch.Tensor):
    """The layer's :class:`Factorisable` record, as a network of that one layer surveys it."""
    return survey(nn.Sequential(layer), x).layers[0]


def _linear_of_rank(rank: int, singular: list[float] | None = None) -> nn.Linear:
    layer = nn.Linear(24, 16)
    s = torch.tensor(singular or [1.0 + i for i in range(rank)][::-1], dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_((_orthonormal(16, len(s), 1) * s) @ _orthonormal(24, len(s), 2).T)
    return layer


def _conv_of_ranks(r_in: int, r_out: int, **geometry) -> nn.Conv2d:
    """A 3x3 conv 12 -> 10 whose weight has multilinear ranks ``(r_in, r_out)`` on its channel modes."""
    conv = nn.Conv2d(12, 10, 3, **geometry)
    core = torch.randn(r_out, r_in, 3, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    weight = torch.einsum("oa,ib,abhw->oihw", _orthonormal(10, r_out, 4), _orthonormal(12, r_in, 5), core)
    with torch.no_grad():
        conv.weight.copy_(weight)
    return conv


# --- crafted layers of known rank -------------------------------------------------------------


def test_a_linear_layer_of_rank_r_is_reproduced_at_rank_r_and_refused_above_its_maximum():
    layer, x = _linear_of_rank(5), torch.randn(32, 24)
    exact = factorised(layer, "linear", (5,))
    assert [p.shape for p in exact.parameters()] == [(5, 24), (16, 5), (16,)]
    torch.testing.assert_close(exact(x), layer(x), rtol=1e-5, atol=1e-5)
    assert (factorised(layer, "linear", (4,))(x) - layer(x)).abs().max() > 0.1, "rank 4 loses a direction"
    record = _record(layer, x)
    assert record.max_ranks == (16,)
    with pytest.raises(
        ValueError, match=r"ranks \[17\] for linear layer '0' \(24 -> 16\): each between 1 and \[16\]"
    ):
        check_ranks(record, 17)


def test_a_1x1_conv_of_rank_r_is_reproduced_with_its_stride():
    conv, x = nn.Conv2d(24, 16, 1, stride=2), torch.randn(4, 24, 9, 9)
    with torch.no_grad():
        conv.weight.copy_(_linear_of_rank(3).weight[:, :, None, None])
    exact = factorised(conv, "conv1x1", (3,))
    torch.testing.assert_close(exact(x), conv(x), rtol=1e-5, atol=1e-5)
    assert _record(conv, x).kind == "conv1x1"


@pytest.mark.parametrize("geometry", [{"padding": 1}, {"stride": 2, "padding": 2, "dilation": 2}])
def test_a_conv_of_multilinear_ranks_is_reproduced_by_tucker2_at_those_ranks(geometry):
    conv, x = _conv_of_ranks(4, 3, **geometry), torch.randn(4, 12, 11, 11)
    exact = factorised(conv, "tucker2", (4, 3))
    shapes = [tuple(m.weight.shape) for m in exact]
    assert shapes == [(4, 12, 1, 1), (3, 4, 3, 3), (10, 3, 1, 1)] and exact.core.stride == conv.stride
    torch.testing.assert_close(exact(x), conv(x), rtol=1e-5, atol=1e-5)
    assert (factorised(conv, "tucker2", (3, 3))(x) - conv(x)).abs().max() > 0.1
    # A mode kept whole needs no factor: the core reads the input channels itself.
    whole_in = factorised(conv, "tucker2", (12, 3))
    assert [name for name, _ in whole_in.named_children()] == ["core", "last"]
    torch.testing.assert_close(whole_in(x), conv(x), rtol=1e-5, atol=1e-5)
    record = _record(conv, x)
    assert record.max_ranks == (12, 10)
    with pytest.raises(ValueError, match=r"each between 1 and \[12, 10\]"):
        check_ranks(record, (13, 3))
    with pytest.raises(ValueError, match=r"give \[r_in, r_out\], not \[4\]"):
        check_ranks(record, 4)


# --- cost, and the rules that choose ranks ----------------------------------------------------


@pytest.mark.parametrize(
    ("layer", "ranks", "x"),
    [
        (nn.Linear(24, 16), (5,), torch.randn(1, 24)),
        (nn.Conv2d(24, 16, 1, stride=2, bias=False), (3,), torch.randn(1, 24, 9, 9)),
        (nn.Conv2d(12, 10, 3, stride=2, padding=1), (4, 3), torch.randn(1, 12, 11, 11)),
        (nn.Conv2d(12, 10, 3, padding=1), (12, 3), torch.randn(1, 12, 7, 7)),
        (nn.Conv2d(12, 10, 3, padding=1, bias=False), (4, 10), torch.randn(1, 12, 7, 7)),
    ],
)
def test_layer_cost_is_what_the_params_and_the_flop_counter_count(layer, ranks, x):
    record = _record(layer, x)
    for module, cost in (
        (layer, layer_cost(record)),
        (factorised(layer, record.kind, ranks), layer_cost(record, ranks)),
    ):
        assert cost.params == sum(p.numel() for p in module.parameters())
        assert cost.flops == count_flops(module, x)


def test_ratio_keeps_at_most_its_share_of_each_layers_params_at_the_largest_ranks():
    linear = _record(nn.Linear(100, 60), torch.randn(1, 100))
    (r,) = ratio_ranks(linear, 0.6)
    target = 0.4 * layer_cost(linear).params
    assert layer_cost(linear, (r,)).params <= target < layer_cost(linear, (r + 1,)).params
    conv = _record(nn.Conv2d(32, 48, 3, padding=1), torch.randn(1, 32, 8, 8))
    r_in, r_out = ratio_ranks(conv, 0.6)
    target = 0.4 * layer_cost(conv).params
    assert layer_cost(conv, (r_in, r_out)).params <= target < layer_cost(conv, (r_in + 1, r_out + 1)).params
    assert abs(r_in / 32 - r_out / 48) < 0.05, "both channel modes keep the same share"


def test_energy_picks_the_smallest_rank_keeping_that_share_of_the_squared_singular_values():
    layer = _linear_of_rank(3, singular=[3.0, 2.0, 1.0])  # squared: 9, 4, 1 of 14
    record = _record(layer, torch.randn(1, 24))
    assert [energy_ranks(record, layer.weight, e) for e in (0.6, 0.9, 0.95)] == [(1,), (2,), (3,)]
    conv = _conv_of_ranks(4, 3, padding=1)
    assert energy_ranks(_record(conv, torch.randn(1, 12, 7, 7)), conv.weight, 0.999999) == (4, 3)


class _Mixed(nn.Module):
    """A stem, a depthwise conv, a layer forward never runs and a head: with ``energy: 0.999``
    nothing here is worth factorising, each for its own reason."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.unused = nn.Linear(4, 4)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.depthwise(self.stem(x)).mean((2, 3)))


def test_layers_left_whole_are_named_with_why(caplog):
    torch.manual_seed(0)
    caplog.set_level(logging.INFO, logger="shrinkflow.models.strategies.lowrank")
    model = apply_strategy("lowrank", _Mixed(), batch(8), energy=0.999)
    assert not low_rank_layers(model)
    said = caplog.messages
    assert (
        "lowrank: depthwise left whole: grouped convolution (groups=8): no channel mode to factorise" in said
    )
    assert "lowrank: unused left whole: not run by forward" in said
    assert "lowrank: stem left whole: ranks [1, 8] would not lower its cost" in said
    assert "lowrank: head left whole: ranks [8] would not lower its cost" in said
    assert said[-1] == "lowrank: factorised nothing"


@pytest.mark.parametrize(
    ("ranks", "message"),
    [
        ({"neck": 2}, "ranks name 'neck', not a factorisable layer; the layers are stem, head"),
        ({"depthwise": 2}, "ranks name 'depthwise', which cannot be factorised: grouped convolution"),
        ({"head": 9}, r"ranks \[9\] for linear layer 'head' \(8 -> 10\): each between 1 and \[8\]"),
        ({"stem": 2}, r"ranks for tucker2 layer 'stem' \(1 -> 8\): give \[r_in, r_out\], not \[2\]"),
    ],
)
def test_explicit_ranks_are_checked_in_one_line(ranks, message):
    with pytest.raises(ValueError, match=message) as info:
        apply_strategy("lowrank", _Mixed(), batch(8), ranks=ranks)
    assert "\n" not in str(info.value)


def test_explicit_ranks_factorise_only_the_layers_named():
    model = apply_strategy("lowrank", _Mixed(), batch(8), ranks={"head": 2})
    assert {name: m.ranks for name, m in low_rank_layers(model).items()} == {"head": (2,)}


# --- every architecture: factorised (pruned first for some), saved, rebuilt -------------------


NETWORKS = {
    "basenet": ({"arch": "basenet", "channels": [16, 32], "hidden": [32]}, False),
    "basenet-bn": ({"arch": "basenet", "channels": [16, 32], "hidden": [32], "batch_norm": True}, True),
    "resnet18": ({"arch": "resnet18", "width_mult": 0.125}, True),
    "mobilenet_v2": ({"arch": "mobilenet_v2", "width_mult": 0.25, "blocks": [1, 2, 1, 2, 1, 1, 1]}, False),
    "resnet56": ({"arch": "resnet56", "width_mult": 0.5, "blocks": [2, 2, 2]}, False),
    # a user's factory (examples/byo: residual blocks, depthwise convs, squeeze-excitation) and a
    # torchvision network by name: pruned by replaying a history, then factorised
    "factory": ({"arch": "factory", "factory": "models.tinynet:build", "kwargs": {"width": 16}}, True),
    "torchvision": ({"arch": "torchvision", "name": "mobilenet_v3_small", "kwargs": {}}, True),
}


def test_every_architecture_is_covered():
    assert {spec["arch"] for spec, _ in NETWORKS.values()} == set(ARCHITECTURES)


@pytest.mark.parametrize("key", sorted(NETWORKS))
def test_a_factorised_network_rebuilds_from_its_spec_with_identical_outputs(key, tmp_path):
    spec, prune_first = NETWORKS[key]
    with user_code(REPO / "examples" / "byo"):  # the factory's package, while it is built
        channels, size = (3, 32) if spec["arch"] == "torchvision" else (1, 8)
        torch.manual_seed(0)
        model = build_model({**spec, "in_channels": channels, "image_size": size, "num_classes": 10}).eval()
        calibration = batch(8, channels, size)
        if prune_first:
            model = apply_strategy("prune_l1", model, calibration, ratio=0.5)
        pruned_spec = model_spec(model)
        shrunk = apply_strategy("lowrank", copy.deepcopy(model), calibration, ratio=0.5)
        layers = low_rank_layers(shrunk)
        assert layers, "something was factorised"
        assert sum(p.numel() for p in shrunk.parameters()) < sum(p.numel() for p in model.parameters())
        spec_after = model_spec(shrunk)
        assert {k: v for k, v in spec_after.items() if k != "factorised"} == pruned_spec, (
            "widths read off stand-ins"
        )
        assert spec_after["factorised"] == [m.record(name) for name, m in layers.items()]
        path = tmp_path / "m.pt"
        loaded, _ = load_checkpoint(path, sha256=save_checkpoint(shrunk, path))
        assert model_spec(loaded) == spec_after and type(loaded) is type(shrunk)
        assert torch.equal(loaded(calibration[0]), shrunk(calibration[0]))


def test_a_factorised_network_is_not_pruned_again():
    torch.manual_seed(0)
    model = build_model({"arch": "basenet", "in_channels": 1, "image_size": 8, "num_classes": 10})
    shrunk = apply_strategy("lowrank", model, batch(8), ratio=0.5)
    with pytest.raises(ValueError, match="prune_l1 cannot shrink a network with factorised layers") as info:
        apply_strategy("prune_l1", shrunk, batch(8), ratio=0.5)
    assert "\n" not in str(info.value)
    assert low_rank_layers(apply_strategy("magnitude", shrunk, batch(8), ratio=0.5)), "same shapes: allowed"


def test_int8_after_lowrank_rebuilds_from_the_factorised_float_spec(tmp_path):
    torch.manual_seed(0)
    model = build_model(
        {"arch": "basenet", "in_channels": 1, "image_size": 8, "num_classes": 10, "batch_norm": True}
    )
    x, y = batch(64)
    quantised = apply_strategy("int8", apply_strategy("lowrank", model.eval(), (x, y), ratio=0.5), (x, y))
    assert isinstance(quantised, Int8Net) and quantised.float_spec["factorised"]
    path = tmp_path / "q.pt"
    loaded, _ = load_checkpoint(path, sha256=save_checkpoint(quantised, path))
    assert isinstance(loaded, Int8Net) and loaded.float_spec == quantised.float_spec
    assert torch.equal(loaded.reference(x), quantised.reference(x))
    assert low_rank_layers(loaded.float_equivalent()), "its float twin is the factorised network"


# --- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "entry",
    [
        "{strategy: lowrank, ratio: 0.5}",
        "{strategy: lowrank, energy: 0.9}",
        "{strategy: lowrank, ranks: {classifier.1: 16, features.0: [1, 8]}}",
        "{strategy: lowrank, search: {low: 0.3, high: 0.8}, distill: {}, quantize: int8}",
    ],
)
def test_a_lowrank_candidate_validates(entry):
    cand = parse_params(small_raw(f"shrink.candidates={{c: {entry}}}")).shrink.candidates["c"]
    assert cand.strategy == "lowrank" and set(cand.options()) == {"ratio", "energy", "ranks"}


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            "{strategy: lowrank, ratio: 0.5, energy: 0.9}",
            "set one of ratio, energy and ranks, not ratio and energy",
        ),
        ("{strategy: lowrank}", "lowrank: set exactly one of ratio, energy, ranks and search"),
        (
            "{strategy: lowrank, energy: 0.9, search: {}}",
            "lowrank: set exactly one of ratio, energy, ranks and search",
        ),
        ("{strategy: lowrank, energy: 1.0}", "energy"),
        ("{strategy: lowrank, ranks: {}}", "ranks"),
    ],
)
def test_a_lowrank_candidate_with_no_or_two_rules_is_refused(entry, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_params(small_raw(f"shrink.candidates={{c: {entry}}}"))
    assert "\n" not in str(info.value)


# --- the pipeline: shrink (a ratio search) -> evaluate (ONNX parity) -> the served pyfunc -------


@pytest.mark.slow
def test_a_lowrank_candidate_is_searched_evaluated_exported_and_served(trained, tmp_path):
    from shrinkflow.tasks.data.prepare import load_raw_split
    from shrinkflow.tasks.measurement.evaluate import evaluate_models
    from shrinkflow.tasks.records import load_manifest
    from shrinkflow.tasks.store.serving import ShrinkflowClassifier
    from shrinkflow.tasks.training.train import shrink_candidate
    from tests.conftest import copy_project

    params, layout = copy_project(
        trained,
        tmp_path,
        "shrink.candidates={lr: {strategy: lowrank, epochs: 1, lr: 0.01,"
        " search: {low: 0.3, high: 0.6, trials: 2}}, e95: {strategy: lowrank, energy: 0.95, epochs: 1}}",
        "promote.tolerance=100",
    )
    record = shrink_candidate(params, layout, "lr")
    assert [t["ratio"] for t in record.trials] == [0.3, 0.6] and record.options["ratio"] == 0.6
    spec = torch.load(layout.checkpoint("lr"), weights_only=True)["spec"]
    assert {entry["name"] for entry in spec["factorised"]} >= {"classifier.1", "classifier.3"}
    shrink_candidate(params, layout, "e95")
    table = evaluate_models(params, layout).set_index("name")
    assert table.loc["e95", "onnx"] == "ok" and table.loc["e95", "ratio"] == 0.0, "no ratio: 0, as int8"
    assert table.loc["lr", "onnx"] == "ok", "onnxruntime runs the factorised network like PyTorch"
    assert table.loc["lr", "params"] < 0.5 * table.loc["baseline", "params"]
    assert table.loc["lr", "flops"] < table.loc["baseline", "flops"]
    # The registered pyfunc's own loader (checkpoint, its sha256, the manifest), on raw images.
    (tmp_path / "model.pt.sha256").write_text(record.sha256 + "\n")
    artifacts = {
        "checkpoint": str(layout.checkpoint("lr")),
        "checkpoint_sha256": str(tmp_path / "model.pt.sha256"),
        "manifest": str(layout.manifest),
    }
    served = ShrinkflowClassifier()
    served.load_context(SimpleNamespace(artifacts=artifacts))
    raw, labels = load_raw_split(layout, "test")
    predicted = served.predict(None, raw.numpy())
    classes = load_manifest(layout).classes
    correct = np.array([classes.index(str(label)) for label in predicted["label"]]) == labels.numpy()
    assert 100 * correct.mean() == pytest.approx(table.loc["lr", "test_acc"])
