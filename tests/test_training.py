"""What the one training loop offers beyond plain float32 SGD: mixed precision and channels-last
(``train.precision``), L1 weight regularisation (``train.l1``), pruning in rounds with
fine-tuning between them (``rounds``), slimming's recorded sparsity phase, and the promotion rule
that keeps a latency objective off int8 models slower than their float twin."""

from __future__ import annotations

import copy
import io
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from torch import nn

from shrinkflow.models.checkpoint import load_checkpoint
from shrinkflow.models.strategies.structured import step_ratios
from shrinkflow.tasks.config import ConfigError, PromoteConfig, TrainConfig, parse_params
from shrinkflow.tasks.data.prepare import load_split
from shrinkflow.tasks.decision.decide import decide
from shrinkflow.tasks.layout import Layout
from shrinkflow.tasks.records import load_record
from shrinkflow.tasks.store.tracking import Tracker, log_record
from shrinkflow.tasks.training.engine import fit, native_bf16, small_bn_scales
from shrinkflow.tasks.training.train import shrink_candidate
from tests.conftest import small_raw


def _baseline_and_data(trained, small_params):
    layout = Layout.from_params(small_params, trained)
    model = load_checkpoint(layout.checkpoint("baseline"))[0]
    return model, load_split(layout, "train"), load_split(layout, "val")


def _state_bytes(model: nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_repeatably_and_hands_back_float32(trained, small_params, precision):
    runs = []
    for name in (precision, precision, "fp32"):
        model, train, val = _baseline_and_data(trained, small_params)
        result = fit(model, train, val, TrainConfig(epochs=2, precision=name), seed=1)
        runs.append((result, model))
    (mixed, model), (again, model_again), (full, model_fp32) = runs
    assert mixed.precision == f"{precision}+cl" and full.precision == "fp32+cl"
    assert _state_bytes(model) == _state_bytes(model_again), "same data, params and seed: same bytes"
    assert mixed.history == again.history
    # Autocast really ran: the reduced-precision step moves the weights differently.
    assert _state_bytes(model) != _state_bytes(model_fp32)
    # What is saved and served is float32 and contiguous, whatever the step ran in.
    assert all(p.dtype == torch.float32 and p.is_contiguous() for p in model.parameters())
    assert mixed.history[-1]["val_acc"] > 85


def test_auto_precision_is_bf16_where_the_cpu_has_it(trained, small_params):
    model, train, val = _baseline_and_data(trained, small_params)
    result = fit(model, train, val, TrainConfig(epochs=1), seed=0)
    expected = "bf16" if native_bf16(torch.device("cpu")) else "fp32"
    assert result.precision == f"{expected}+cl"
    off = fit(model, train, val, TrainConfig(epochs=1, channels_last=False, precision="fp32"), seed=0)
    assert off.precision == "fp32"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.precision=fp8", "train.precision"),
        ("train.l1=-0.1", "train.l1"),
        ("shrink.candidates={w: {strategy: width, ratio: 0.5, rounds: 2}}", "cannot prune in rounds"),
        ("shrink.candidates={p: {strategy: prune_l1, ratio: 0.5, rounds: 5, epochs: 3}}", "rounds 5 need"),
        (
            "shrink.candidates={g: {strategy: prune_l1, global_pruning: true, search: {high: 0.95}}}",
            "above max_layer_ratio",
        ),
    ],
)
def test_bad_training_options_are_refused_in_one_line(override, message):
    with pytest.raises(ConfigError, match=message) as refused:
        parse_params(small_raw(override))
    assert "\n" not in str(refused.value)


def test_l1_regularisation_drives_weights_towards_zero(trained, small_params):
    def near_zero(model: nn.Module) -> float:
        weights = torch.cat(
            [
                m.weight.detach().abs().flatten()
                for m in model.modules()
                if isinstance(m, nn.Conv2d | nn.Linear)
            ]
        )
        return float((weights < 1e-3).float().mean())

    shares = {}
    for l1 in (0.0, 1e-3):
        model, train, val = _baseline_and_data(trained, small_params)
        fit(model, train, val, TrainConfig(epochs=4, lr=0.02, l1=l1), seed=0)
        shares[l1] = near_zero(model)
    assert shares[1e-3] > 3 * shares[0.0], shares


def test_pruning_in_rounds_reaches_the_ratio_within_the_same_budget(trained_layout):
    params = parse_params(
        small_raw(
            "shrink.candidates={one: {strategy: prune_l1, ratio: 0.75, lr: 0.01},"
            " three: {strategy: prune_l1, ratio: 0.75, lr: 0.01, rounds: 3}}",
            "shrink.epochs=5",
        )
    )
    one = shrink_candidate(params, trained_layout, "one")
    three = shrink_candidate(params, trained_layout, "three")
    assert [r["ratio"] for r in three.rounds] == pytest.approx(step_ratios(0.75, 3))
    assert [r["epochs"] for r in three.rounds] == [1, 2, 2] and three.epochs == one.epochs == 5
    assert [row["epoch"] for row in three.history] == [1, 2, 3, 4, 5]
    shapes = [load_checkpoint(trained_layout.root / r.checkpoint)[0].spec()["channels"] for r in (one, three)]
    assert shapes[0] == shapes[1], "three rounds end at the one-shot widths"
    assert load_record(trained_layout, "three").rounds == three.rounds


def test_step_ratios_keep_equal_shares_of_the_original_width():
    ratios = step_ratios(0.75, 3)
    kept = 1.0
    for i, r in enumerate(ratios, start=1):
        kept *= 1 - r
        assert kept == pytest.approx(1 - 0.75 * i / 3)


def test_slim_records_its_sparsity_phase(tmp_path):
    from shrinkflow.tasks.data.prepare import prepare
    from shrinkflow.tasks.training.train import train_baseline

    params = parse_params(
        small_raw(
            "model.batch_norm=true",
            "train.epochs=4",
            "train.keep=best",
            # What moves the scales is lr * sparsity * steps: 0.05 * 0.3 * 36 steps here.
            "shrink.candidates={s: {strategy: slim, ratio: 0.5, lr: 0.05,"
            " sparsity: 0.3, sparsity_epochs: 3}}",
        )
    )
    layout = Layout.from_params(params, tmp_path)
    prepare(params, layout)
    train_baseline(params, layout)
    record = shrink_candidate(params, layout, "s")
    phase = record.sparsity_phase
    assert phase["epochs"] == 3 and len(phase["history"]) == 3
    assert phase["strength"] == 0.3
    assert phase["small_bn_scales_before"] < 0.05 and phase["small_bn_scales_after"] > 0.15
    assert load_record(layout, "s").sparsity_phase == phase

    # MLflow gets the phase too: its settings, its effect and its own per-epoch curve.
    tracker = Tracker(f"sqlite:///{tmp_path / 'phase.db'}", "phase")
    run_id = tracker.start_run("phase")
    log_record(tracker, run_id, record)
    logged = tracker.run(run_id).data
    assert (
        logged.params["sparsity_phase.strength"] == "0.3" and logged.params["precision"] == record.precision
    )
    assert logged.metrics["sparsity_phase.small_bn_scales_after"] == phase["small_bn_scales_after"]
    assert len(MlflowClient(tracker.uri).get_metric_history(run_id, "sparsity_epoch/val_acc")) == 3


def test_engine_sparsity_share_counts_small_batchnorm_scales():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([0.0, 0.001, 0.5, 1.0]))
    assert small_bn_scales(net) == 0.5


def _inputs(latency: dict[str, float], float_twin: dict[str, float]):
    """A table and predictions where every model is as accurate as the baseline."""
    rows = []
    for name, ms in latency.items():
        rows.append(
            {
                "name": name,
                "strategy": "baseline" if name == "baseline" else "prune_l1",
                "ratio": 0.5,
                "status": "ok",
                "val_acc": 90.0,
                "gate_acc": 90.0,
                "test_acc": 90.0,
                "params": 100 if name == "baseline" else 10,
                "latency_ms": ms,
                "float_latency_ms": float_twin.get(name),
                "worst_class_drop": 0.0,
            }
        )
    labels = np.arange(1000) % 10
    frame = pd.DataFrame({"label": labels, **dict.fromkeys(latency, labels)})
    return pd.DataFrame(rows), {"gate": frame, "test": frame}


def test_a_latency_objective_never_picks_int8_slower_than_its_float_twin():
    inputs = _inputs(
        {"baseline": 1.0, "small": 0.4, "small-int8": 0.3, "tiny-int8": 0.2},
        {
            "small-int8": 0.35,  # faster than its float twin: may win
            "tiny-int8": 0.1,  # twice as slow as its float twin: never picked
        },
    )
    decision = decide(*inputs, PromoteConfig(objective="latency_ms"))
    assert decision.winner == "small-int8"
    assert "int8 slower than its float twin here: tiny-int8" in decision.reason
    # Other objectives do not look at latency at all.
    assert decide(*inputs, PromoteConfig(objective="params")).winner in {
        "small",
        "small-int8",
        "tiny-int8",
    }


_HEAP = """
import contextlib
import sys
import torch
from shrinkflow.tasks.training.engine import batches_given_back
def anon():
    return int(next(l for l in open("/proc/self/status") if l.startswith("RssAnon")).split()[1]) << 10
first = torch.ones(30 << 18)  # 30 MiB, freed: glibc's default raises its threshold to this size
del first
before = anon()
with batches_given_back() if sys.argv[1] == "fixed" else contextlib.nullcontext():  # as predict
    batches, kept = [], []
    for _ in range(10):
        batches.append(torch.ones(20 << 18))  # 20 MiB each, as prediction batches of large images
        kept.append(bytearray(200_000))  # something still alive between them
    del batches
print(anon() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_batches_go_back_to_the_system():
    """A stage's memory is bounded by its batch, not by the largest batch it has freed before:
    with glibc's default, ten freed 20 MiB batches stay in the process (~200 MB)."""
    kept = {
        mode: int(
            subprocess.run(
                [sys.executable, "-c", _HEAP, mode], capture_output=True, text=True, check=True
            ).stdout
        )
        for mode in ("default", "fixed")
    }
    assert kept["default"] > 150 << 20, "the default allocator keeps them (else this test proves nothing)"
    assert kept["fixed"] < 20 << 20, kept


def test_a_network_with_dropout_fine_tunes_to_the_same_weights_whatever_the_global_generator():
    """nn.Dropout draws from torch's global generator: fit seeds it for its duration and gives
    the process its state back."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 10))
    g = torch.Generator().manual_seed(0)
    train, val = (
        (torch.randn(128, 1, 8, 8, generator=g), torch.randint(0, 10, (128,), generator=g)),
        (
            torch.randn(32, 1, 8, 8, generator=g),
            torch.randint(0, 10, (32,), generator=g),
        ),
    )
    cfg = TrainConfig(epochs=2, batch_size=32, optimizer="adamw", lr=1e-2, precision="fp32")
    trained = []
    for state in (1, 2):  # the process's generator in another state before each fit
        torch.manual_seed(state)
        before = torch.get_rng_state()
        trained.append(copy.deepcopy(net))
        fit(trained[-1], train, val, cfg, seed=0)
        assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(a, b) for a, b in zip(*(m.state_dict().values() for m in trained), strict=True))
