"""Every torchvision classification family through the pipeline, as a user brings it (#33): a
state dict trained by the user's own script on a 32-px digits image folder, taken as given, one
structured prune (or, where torch-pruning has no usable graph, its one-line refusal and another
strategy), evaluate with ONNX parity, registration, and the registered version serving raw images
in a fresh process. Each family's smallest member: the convolutional families here, ConvNeXt, ViT
and Swin in tests/test_zoo_large.py (two files for `make test-scenarios`' two workers)."""

from __future__ import annotations

import pytest

from tests.zoo import Family, Runs, served_labels, write_digits

# One torch thread for every test here (conftest's one_thread says why).
pytestmark = pytest.mark.usefixtures("one_thread")

PRUNE = {"l1-50": {"strategy": "prune_l1", "ratio": 0.5}}
PRUNED = [
    Family("mobilenet_v3_small", {}, PRUNE),
    Family("efficientnet_b0", {}, PRUNE),
    Family("regnet_y_400mf", {}, PRUNE),
    Family("densenet121", {}, PRUNE),
]
SHUFFLENET = Family("shufflenet_v2_x0_5", {}, PRUNE | {"mag-50": {"strategy": "magnitude", "ratio": 0.5}})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    return Runs([*PRUNED, SHUFFLENET], write_digits(root), root)


@pytest.mark.slow
@pytest.mark.scenario
@pytest.mark.parametrize("family", PRUNED, ids=[f.name for f in PRUNED])
def test_a_pruned_family_member_is_measured_and_registered(family, runs):
    ran = runs[family.name]
    assert ran.baseline.strategy == "given" and ran.baseline.origin["val_acc_as_given"] > 25
    probe = ran.baseline.pruning
    assert probe["ok"] and probe["groups"] > 0 and probe["family"] == f"torchvision {family.name}"
    assert len(probe["left_alone"]) == 1  # the classifier
    assert not ran.failures and ran.records["l1-50"].status == "ok"
    assert ran.table.loc["l1-50", "params"] < 0.5 * ran.table.loc["baseline", "params"]
    assert (ran.table["onnx"] == "ok").all(), ran.table["onnx"]  # exported, and onnxruntime agrees
    assert ran.decision.winner == "l1-50" and ran.decision.kind == "champion"


@pytest.mark.slow
@pytest.mark.scenario
def test_shufflenet_has_no_graph_its_structured_candidate_says_so_and_magnitude_runs(runs):
    ran = runs[SHUFFLENET.name]
    probe = ran.baseline.pruning
    assert not probe["ok"] and probe["reason"].startswith("ZeroDivisionError")
    assert "at the reshape after net.stage" in probe["reason"]  # channel shuffle's view
    line = ran.failures["l1-50"]
    assert line.startswith("torchvision shufflenet_v2_x0_5: torch-pruning has no usable graph (ZeroDivision")
    assert "so prune_fpgm, prune_l1, prune_taylor, slim cannot run; " in line and "\n" not in line
    assert "magnitude" in line.split("cannot run; ")[1]
    assert ran.records["mag-50"].status == "ok" and ran.table.loc["mag-50", "onnx"] == "ok"
    # magnitude pruning keeps dense shapes, so it is not smaller: the measured baseline stands
    assert ran.decision.winner == "baseline" and ran.decision.kind == "champion"


@pytest.mark.slow
@pytest.mark.scenario
def test_every_registered_version_serves_raw_images_in_a_fresh_process(runs, tmp_path):
    for family in [*PRUNED, SHUFFLENET]:
        runs[family.name]  # noqa: B018 (made here if no test above ran it)
    for family, (served, pipeline) in served_labels(runs, tmp_path).items():
        assert served == pipeline, family  # pruned networks rebuilt from their pruning history
