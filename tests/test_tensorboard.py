"""`tracking.tensorboard: true`: event files TensorBoard reads, written at the evaluate stage."""

from __future__ import annotations

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from shrinkflow.tasks.measurement.evaluate import load_table
from shrinkflow.tasks.pipeline.stages import Context, run_evaluate
from shrinkflow.tasks.records import load_record
from shrinkflow.tasks.store.tracking import Tracker
from tests.conftest import copy_project


def _events(directory) -> EventAccumulator:
    return EventAccumulator(str(directory), size_guidance={"scalars": 0, "tensors": 0}).Reload()


def test_tensorboard_gets_every_models_curves_and_one_hparams_summary(evaluated, tmp_path):
    params, layout = copy_project(evaluated, tmp_path, "tracking.tensorboard=true")
    ctx = Context(params, layout, Tracker.for_project(tmp_path, params.tracking.experiment))
    run_evaluate(ctx)
    run_evaluate(ctx)  # a second run replaces the curves rather than doubling them
    table = load_table(layout.candidates_csv).set_index("name")
    assert table["composition"].to_dict() == {"baseline": "baseline", "w50": "width", "l1-50": "prune_l1"}
    for name in ("baseline", "w50", "l1-50"):
        history = load_record(layout, name).history
        events = _events(layout.runs / name)
        assert set(events.Tags()["scalars"]) == {"train/loss", "val/acc", "train/lr"}
        val = events.Scalars("val/acc")
        assert [e.step for e in val] == [row["epoch"] for row in history]
        assert [round(e.value, 4) for e in val] == [round(row["val_acc"], 4) for row in history]
        assert events.Scalars("train/lr")[0].value == pytest.approx(history[0]["lr"], rel=1e-6)  # float32

        summary = _events(layout.runs / "hparams" / name)
        content = summary.PluginTagToContent("hparams")["_hparams_/session_start_info"]
        hparams = HParamsPluginData.FromString(content).session_start_info.hparams
        assert hparams["strategy"].string_value == table.loc[name, "strategy"]
        assert hparams["composition"].string_value == table.loc[name, "composition"]
        assert hparams["ratio"].number_value == table.loc[name, "ratio"]
        metrics = {tag: summary.Scalars(tag)[0].value for tag in summary.Tags()["scalars"]}
        assert metrics["hparam/val_acc"] == pytest.approx(table.loc[name, "val_acc"], rel=1e-6)
        assert metrics["hparam/params"] == table.loc[name, "params"]
        assert metrics["hparam/latency_ms"] > 0


def test_tensorboard_is_off_by_default(evaluated, tmp_path):
    params, layout = copy_project(evaluated, tmp_path)
    assert params.tracking.tensorboard is False
    run_evaluate(Context(params, layout, Tracker.for_project(tmp_path, params.tracking.experiment)))
    assert not layout.runs.exists()
