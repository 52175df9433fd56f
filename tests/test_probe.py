"""The bounded graph probe (models/probe.py) and what reads it: a real child process, real
torch-pruning, the user's code imported from its folder there."""

from __future__ import annotations

import logging

import pytest
import torch

from shrinkflow.models.arch.given import TorchvisionNet
from shrinkflow.models.probe import NoGraph, probe_graph, refuse_without_graph
from shrinkflow.tasks.config import parse_params
from shrinkflow.tasks.io import read_json, write_json
from shrinkflow.tasks.measurement.evaluate import widths_text
from shrinkflow.tasks.records import ModelRecord, load_record
from shrinkflow.tasks.training.train import shrink_candidate, shrink_trial
from tests.conftest import REPO, small_raw

FACTORY = {
    "arch": "factory",
    "factory": "models.tinynet:build",
    "kwargs": {"in_channels": 1, "width": 8, "blocks": 1, "num_classes": 10},
    "in_channels": 1,
    "image_size": 8,
    "num_classes": 10,
}


def test_a_users_network_is_probed_in_a_child_that_imports_it_from_its_folder():
    probe = probe_graph(FACTORY, code=[str(REPO / "examples" / "byo")])
    assert probe.ok, probe.reason
    assert probe.family == "factory models.tinynet:build" and probe.groups > 0
    assert probe.left_alone == ["net.head"]  # the classifier, kept for its classes
    assert probe.line().startswith("factory models.tinynet:build: torch-pruning finds ")
    # without the folder the child cannot build it: a finding, not an exception here
    missing = probe_graph(FACTORY)
    assert not missing.ok and "GivenError" in missing.reason


def test_a_probe_past_its_time_bound_is_one_line():
    probe = probe_graph(FACTORY, code=[str(REPO / "examples" / "byo")], timeout_s=0.5)
    assert not probe.ok and probe.reason == "not done within 0.5 s"
    assert "\n" not in probe.line() and "magnitude" in probe.line()


def test_only_strategies_that_need_the_graph_are_refused():
    found = {"family": "torchvision swin_t", "ok": False, "reason": "stopped at its memory bound of 2 GiB"}
    with pytest.raises(NoGraph, match=r"^torchvision swin_t: torch-pruning has no usable graph \(stopped"):
        refuse_without_graph("prune_taylor", found)
    refuse_without_graph("magnitude", found)
    refuse_without_graph("int8", found)
    refuse_without_graph("prune_l1", None)  # our own networks are not probed
    refuse_without_graph("prune_l1", {"groups": 3, "left_alone": []})  # a record from before the probe


def test_a_widths_summary_torch_pruning_cannot_build_is_a_log_line(caplog):
    model = TorchvisionNet("shufflenet_v2_x0_5", in_channels=3, image_size=32, num_classes=10).eval()
    record = ModelRecord(name="l1-50", strategy="prune_l1", options={}, steps=["prune_l1"])
    with caplog.at_level(logging.WARNING):
        assert widths_text(record, model, torch.zeros(1, 3, 32, 32)) == ""
    assert "l1-50: no widths column (torch-pruning: ZeroDivisionError" in caplog.text


def test_candidates_and_search_trials_that_need_the_graph_fail_at_once(trained_layout):
    """A baseline whose probe found no graph (as Swin's): the structured candidate and a search's
    trial fail with the probe's line before anything is built; magnitude pruning runs."""
    record = read_json(trained_layout.record("baseline"))
    record["pruning"] = {"family": "torchvision swin_t", "ok": False, "reason": "stopped at its memory bound"}
    write_json(trained_layout.record("baseline"), record)
    params = parse_params(
        small_raw(
            "shrink.epochs=1",
            "shrink.candidates={l1: {strategy: prune_l1, ratio: 0.5},"
            " mag: {strategy: magnitude, ratio: 0.5}}",
        )
    )
    line = r"^torchvision swin_t: torch-pruning has no usable graph \(stopped at its memory bound\), so "
    with pytest.raises(NoGraph, match=line):
        shrink_candidate(params, trained_layout, "l1")
    failed = load_record(trained_layout, "l1")
    assert failed.status == "failed" and failed.error.startswith("NoGraph: torchvision swin_t")
    assert not trained_layout.checkpoint("l1").exists()
    with pytest.raises(NoGraph, match=line):
        shrink_trial(params, trained_layout, "l1", 0, 0.3)
    assert shrink_candidate(params, trained_layout, "mag").status == "ok"
