"""The bounded graph probe (models/probe.py) and what reads it: a real child process, real
torch-pruning, the user's code imported from its folder there."""

from __future__ import annotations

import logging

import pytest
import torch

from shrinkflow.models.arch.given import TorchvisionNet
from shrinkflow.models.probe import NoGraph, probe_graph, refuse_without_graph
from shrinkflow.tasks.evaluate import widths_text
from shrinkflow.tasks.records import ModelRecord
from tests.conftest import REPO

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
