"""Each stage function on real digits data, called directly."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from shrinkflow.models.checkpoint import load_checkpoint
from shrinkflow.tasks.config import TrainConfig, parse_params
from shrinkflow.tasks.data.prepare import load_split, prepare
from shrinkflow.tasks.layout import Layout
from shrinkflow.tasks.measurement.evaluate import COLUMNS, evaluate_models, load_table
from shrinkflow.tasks.records import load_manifest, load_record
from shrinkflow.tasks.training.engine import TrainingDiverged, evaluate, fit
from shrinkflow.tasks.training.train import shrink_candidate
from tests.conftest import small_raw


def test_prepare_is_deterministic_stratified_and_fingerprinted(tmp_path, small_params):
    a = prepare(small_params, Layout.from_params(small_params, tmp_path / "a"))
    b = prepare(small_params, Layout.from_params(small_params, tmp_path / "b"))
    assert a == b
    assert sum(a.sizes.values()) == 1797 and a.input_shape == [1, 8, 8] and a.num_classes == 10
    assert a.sizes == {"train": 718, "val": 179, "gate": 540, "test": 360}
    for split in ("train", "val", "gate", "test"):
        for path in (f"{split}-images.npy", f"{split}-labels.npy"):
            assert (tmp_path / "a/data/prepared" / path).read_bytes() == (
                tmp_path / "b/data/prepared" / path
            ).read_bytes()
    layout = Layout.from_params(small_params, tmp_path / "a")
    _, y_train = load_split(layout, "train")
    _, y_test = load_split(layout, "test")
    # Stratified: every class keeps (almost exactly) its share in each split.
    share_train = torch.bincount(y_train) / len(y_train)
    share_test = torch.bincount(y_test) / len(y_test)
    assert (share_train - share_test).abs().max() < 0.01
    other = parse_params(small_raw("seed=1"))
    c = prepare(other, Layout.from_params(other, tmp_path / "c"))
    assert c.fingerprint != a.fingerprint, "a different seed gives a different split"


def test_baseline_learns_and_keeps_its_last_epoch(trained, small_params):
    layout = Layout.from_params(small_params, trained)
    record = load_record(layout, "baseline")
    assert record.status == "ok" and record.epochs == small_params.train.epochs
    assert record.best_epoch == record.epochs and record.best_val_acc == record.history[-1]["val_acc"]
    model, _ = load_checkpoint(layout.root / record.checkpoint, sha256=record.sha256)
    assert evaluate(model, load_split(layout, "val")) == record.best_val_acc
    assert record.best_val_acc > 90, "a small CNN learns 8x8 digits well within a few epochs"
    assert load_manifest(layout).input_shape == [model.in_channels, model.image_size, model.image_size]


def test_training_is_deterministic(trained, small_params):
    layout = Layout.from_params(small_params, trained)
    train, val = load_split(layout, "train"), load_split(layout, "val")
    cfg = TrainConfig(epochs=2)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = load_checkpoint(layout.checkpoint("baseline"))[0]
        torch.nn.init.normal_(model.classifier[-1].weight)
        result = fit(model, train, val, cfg, seed=3)
        runs.append((result.history, model.state_dict()))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])


def test_diverging_loss_is_detected(trained, small_params):
    layout = Layout.from_params(small_params, trained)
    model = load_checkpoint(layout.checkpoint("baseline"))[0]
    with pytest.raises(TrainingDiverged, match="loss became"):
        fit(
            model,
            load_split(layout, "train"),
            load_split(layout, "val"),
            TrainConfig(epochs=3, lr=1e6),
            seed=0,
        )


@pytest.mark.parametrize("name", ["w50", "l1-50"])
def test_shrink_candidate_is_smaller_and_trained_with_the_same_loop(trained_layout, small_params, name):
    record = shrink_candidate(small_params, trained_layout, name)
    base = load_record(trained_layout, "baseline")
    small, _ = load_checkpoint(trained_layout.root / record.checkpoint, sha256=record.sha256)
    big, _ = load_checkpoint(trained_layout.root / base.checkpoint)
    assert sum(p.numel() for p in small.parameters()) < 0.35 * sum(p.numel() for p in big.parameters())
    assert record.epochs == small_params.shrink.epochs and len(record.history) == record.epochs
    assert record.best_val_acc > 80


def test_failed_candidate_is_recorded_and_leaves_no_checkpoint(trained_layout):
    params = parse_params(small_raw("shrink.candidates.w50.lr=1000000"))
    stale = trained_layout.checkpoint("w50")
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"an older model that must not survive")
    with pytest.raises(TrainingDiverged):
        shrink_candidate(params, trained_layout, "w50")
    record = load_record(trained_layout, "w50")
    assert record.status == "failed" and "TrainingDiverged" in record.error
    assert not stale.exists()


def test_evaluate_measures_every_model_and_marks_failures(trained_layout, small_params):
    shrink_candidate(small_params, trained_layout, "l1-50")  # w50 never ran
    table = evaluate_models(small_params, trained_layout)
    assert list(table.columns) == COLUMNS
    assert list(table["name"]) == ["baseline", "w50", "l1-50"]
    assert list(table["status"]) == ["ok", "missing", "ok"]
    base, pruned = table.iloc[0], table.iloc[2]
    assert pruned["params"] < base["params"] and pruned["flops"] < base["flops"]
    assert pruned["size_bytes"] < base["size_bytes"] and pruned["latency_ms"] > 0
    assert base["param_ratio"] == 1.0 and pruned["param_ratio"] > 3
    on_disk = load_table(trained_layout.candidates_csv)
    assert list(on_disk["name"]) == list(table["name"])
    metrics = json.loads(trained_layout.metrics_json.read_text())
    assert metrics["baseline"]["test_acc"] == base["test_acc"]
    assert metrics["candidates"] == {"declared": 2, "ok": 1, "failed": 1}
    # Paired outcomes: one predicted class per image and model, from which every figure derives.
    predictions = pd.read_csv(trained_layout.predictions_csv)
    assert list(predictions.columns) == ["split", "index", "label", "baseline", "l1-50"]
    assert predictions.groupby("split").size().to_dict() == {"val": 179, "gate": 540, "test": 360}
    for split in ("val", "gate", "test"):
        rows = predictions[predictions["split"] == split]
        assert pruned[f"{split}_acc"] == round(100 * (rows["l1-50"] == rows["label"]).mean(), 4)
    gate = predictions[predictions["split"] == "gate"]
    gain = int(((gate["l1-50"] == gate["label"]) & (gate["baseline"] != gate["label"])).sum())
    loss = int(((gate["l1-50"] != gate["label"]) & (gate["baseline"] == gate["label"])).sum())
    assert pruned["gate_delta"] == pytest.approx(100 * (gain - loss) / 540, abs=1e-3)
    assert pruned["gate_lower"] < pruned["gate_delta"] < pruned["gate_upper"]
    assert "eligible" not in table, "evaluate measures; tasks/decision/decide.py decides"
    assert base["gate_delta"] == 0 and base["test_delta"] == 0
    assert pd.isna(table.iloc[1]["gate_lower"])


def test_prepare_says_when_the_gate_cannot_certify_the_tolerance(tmp_path, caplog):
    tight = parse_params(small_raw("promote.tolerance=0.5"))
    with caplog.at_level("WARNING", logger="shrinkflow.tasks.data.prepare"):
        prepare(tight, Layout.from_params(tight, tmp_path / "tight"))
    [line] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "promote.tolerance 0.5" in line and "540 gate images" in line and "data.gate_fraction" in line
    caplog.clear()
    with caplog.at_level("WARNING", logger="shrinkflow.tasks.data.prepare"):
        prepare(parse_params(small_raw()), Layout.from_params(tight, tmp_path / "default"))
    assert not [r for r in caplog.records if r.levelname == "WARNING"], "the default tolerance is certifiable"
