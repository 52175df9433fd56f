"""The zoo's attention and large families (see tests/test_zoo.py): ConvNeXt-T and ViT-B/16 pruned
and served, Swin-T's graph refused within its bound."""

from __future__ import annotations

import pytest

from shrinkflow.models.checkpoint import load_checkpoint
from shrinkflow.models.probe import probe_graph
from tests.zoo import Family, Runs, served_labels, write_digits

# One torch thread for every test here (conftest's one_thread says why); full-size networks, so
# `make test-large` runs them rather than `make test-scenarios`.
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.large]

PRUNE = {"l1-50": {"strategy": "prune_l1", "ratio": 0.5}}
CONVNEXT = Family("convnext_tiny", {}, PRUNE, epochs=1, lr=1e-3)
VIT = Family("vit_b_16", {"image_size": 32}, PRUNE, epochs=1, lr=1e-4)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo-large")
    return Runs([CONVNEXT, VIT], write_digits(root), root)


@pytest.mark.slow
@pytest.mark.scenario
def test_convnext_is_pruned_measured_and_registered(runs):
    ran = runs[CONVNEXT.name]
    assert ran.baseline.pruning["ok"] and ran.baseline.pruning["left_alone"] == ["net.classifier.2"]
    assert not ran.failures and ran.table.loc["l1-50", "params"] < 0.5 * ran.table.loc["baseline", "params"]
    assert (ran.table["onnx"] == "ok").all(), ran.table["onnx"]
    assert ran.decision.winner == "l1-50" and ran.decision.kind == "champion"


@pytest.mark.slow
@pytest.mark.scenario
def test_vit_loses_the_same_share_of_every_attention_head(runs):
    ran = runs[VIT.name]
    # the attention's output projection is pruned with its layer: only the classifier is left alone
    assert ran.baseline.pruning["ok"] and ran.baseline.pruning["left_alone"] == ["net.heads.head"]
    assert not ran.failures and ran.table.loc["l1-50", "params"] < 0.5 * ran.table.loc["baseline", "params"]
    model, _ = load_checkpoint(ran.layout.checkpoint("l1-50"))  # rebuilt by replaying its pruning
    vit = model.net
    for layer in vit.encoder.layers:
        attention = layer.self_attention
        assert (attention.num_heads, attention.head_dim, attention.embed_dim) == (12, 32, 384)
    assert vit.hidden_dim == vit.conv_proj.out_channels == vit.class_token.shape[-1] == 384
    assert (ran.table["onnx"] == "ok").all(), ran.table["onnx"]
    assert ran.decision.winner == "l1-50" and ran.decision.kind == "champion"


@pytest.mark.slow
@pytest.mark.scenario
def test_swin_group_enumeration_stops_at_its_memory_bound():
    """Unbounded, Swin-T's enumeration grew to 23 GB before the kernel killed a run. Here with a
    quarter of a GiB to spare (the pipeline's bound is 2 GiB: the same line, a minute later)."""
    spec = {"arch": "torchvision", "name": "swin_t", "kwargs": {}, "in_channels": 3, "image_size": 32}
    probe = probe_graph(spec | {"num_classes": 10}, memory_bytes=256 << 20)
    assert not probe.ok and probe.reason.startswith("stopped at its memory bound of 0.25 GiB")
    line = probe.line()
    assert line.startswith("torchvision swin_t: torch-pruning has no usable graph (stopped at its memory")
    assert line.endswith("magnitude still apply (each with distill)") and "prune_l1" in line


@pytest.mark.slow
@pytest.mark.scenario
def test_the_registered_versions_serve_raw_images_in_a_fresh_process(runs, tmp_path):
    for family in (CONVNEXT, VIT):
        runs[family.name]  # noqa: B018 (made here if no test above ran it)
    for family, (served, pipeline) in served_labels(runs, tmp_path).items():
        assert served == pipeline, family
