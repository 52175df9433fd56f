"""A model the user brings: torchvision by name, a factory in a package of the user's own (called
``models``, as in ``examples/byo``), or a registered version. Real networks, real weights files
saved here, real torch-pruning, a real MLflow registry (sqlite)."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient
from PIL import Image
from torch import nn

from shrinkflow.models import apply_strategy
from shrinkflow.models.arch.given import FactoryNet, TorchvisionNet, trust_code
from shrinkflow.models.checkpoint import load_checkpoint
from shrinkflow.models.strategies import ShrinkError
from shrinkflow.tasks.config import ConfigError, load_params
from shrinkflow.tasks.evaluate import evaluate_models, load_table
from shrinkflow.tasks.io import save_checkpoint
from shrinkflow.tasks.layout import Layout
from shrinkflow.tasks.prepare import prepare
from shrinkflow.tasks.records import load_manifest, load_record
from shrinkflow.tasks.stages import Context, run_promote
from shrinkflow.tasks.tracking import Tracker, tracking_uri
from shrinkflow.tasks.train import shrink_candidate, train_baseline
from tests.conftest import REPO, run_cli

EXAMPLE = REPO / "examples" / "byo"


@pytest.fixture(autouse=True)
def _users_code():
    """The example's package (``models``) is the user's code in every test here."""
    trust_code(EXAMPLE)


def _params(root: Path, **model) -> Path:
    """The example's params, made small, with ``model`` keys replaced."""
    raw = yaml.safe_load((EXAMPLE / "params.yaml").read_text())
    raw["model"] = {**raw["model"], "code_path": str(EXAMPLE), **model}
    raw["train"]["epochs"] = 3
    raw["shrink"]["epochs"] = 20  # the tiny network fine-tunes in well under a second an epoch
    raw["shrink"]["candidates"] = {"l1-50-kd": raw["shrink"]["candidates"]["l1-50-kd"]}
    raw["evaluate"] = {"latency_warmup": 1, "latency_repeats": 3}
    raw["promote"]["model_name"] = f"byo-{uuid.uuid4().hex[:8]}"
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def brought(tmp_path_factory):
    """An image folder of digits (train/ seen, test/ never seen) and the example's network
    trained on train/ by the example's own script: what a user has before shrinkflow."""
    root = tmp_path_factory.mktemp("byo")
    subprocess.run(
        [
            sys.executable,
            str(EXAMPLE / "train.py"),
            "--data",
            str(root / "images"),
            "--out",
            str(root / "weights.pt"),
            "--epochs",
            "8",
        ],
        check=True,
        capture_output=True,
        cwd=EXAMPLE,
    )
    return root


def _project(brought: Path, dst: Path, **model) -> tuple:
    (dst / "images").symlink_to(brought / "images")
    shutil.copy(brought / "weights.pt", dst / "weights.pt")
    params = load_params(_params(dst, **model))
    return params, Layout.from_params(params, dst)


@pytest.fixture(scope="module")
def champion(brought, tmp_path_factory):
    """The brought network through the whole pipeline into the registry: (params, layout)."""
    params, layout = _project(brought, tmp_path_factory.mktemp("champion"))
    prepare(params, layout)
    train_baseline(params, layout)
    shrink_candidate(params, layout, "l1-50-kd")
    evaluate_models(params, layout)
    ctx = Context(params, layout, Tracker(tracking_uri(layout.root), params.tracking.experiment))
    decision = run_promote(ctx)
    return params, layout, decision


@pytest.mark.slow
@pytest.mark.scenario
def test_a_factory_model_from_a_package_called_models_is_certified_registered_and_served(champion):
    params, layout, decision = champion
    manifest = load_manifest(layout)
    # val, gate and test come from the never-seen test/ tree only
    assert manifest.heldout == "images/test/" and manifest.origin["gate"] == "images/test/"
    seen = sum(1 for _ in (layout.root / "images" / "train").rglob("*.png"))  # train.py's split
    assert manifest.sizes["train"] == seen and sum(manifest.sizes.values()) == 1797
    assert (manifest.mean, manifest.std, manifest.normalisation) == ([0.5], [0.5], "model")
    base = load_record(layout, "baseline")
    assert base.strategy == "given" and base.epochs == 0  # taken as given, not trained
    assert base.origin["source"] == "factory models.tinynet:build"
    assert base.origin["weights_sha256"] and base.origin["val_acc_as_given"] > 50
    table = load_table(layout.candidates_csv).set_index("name")
    assert table.loc["l1-50-kd", "params"] < 0.5 * table.loc["baseline", "params"]
    assert table.loc["l1-50-kd", "onnx"] == "ok"
    assert decision.winner == "l1-50-kd" and decision.kind == "champion"
    # the pruned network rebuilds from its description and pruning history, not from a pickle
    spec = torch.load(layout.checkpoint("l1-50-kd"), weights_only=True)["spec"]
    assert spec["arch"] == "factory" and spec["factory"] == "models.tinynet:build" and spec["pruning_history"]
    version = MlflowClient().get_model_version(params.promote.model_name, decision.registry.version)
    assert version.tags["baseline_source"] == "factory models.tinynet:build"
    assert version.tags["baseline_weights_sha256"] == base.origin["weights_sha256"]
    # a fresh process, elsewhere, with no shrinkflow checkout on its path: raw images in, names out
    sevens = sorted((layout.root / "images" / "test" / "7").glob("*.png"))[:5]
    images = np.stack([np.asarray(Image.open(f)) for f in sevens])
    script = (
        "import sys, json, numpy as np, mlflow; "
        f"m = mlflow.pyfunc.load_model('models:/{params.promote.model_name}@champion'); "
        "x = np.array(json.loads(sys.stdin.read()), dtype=np.uint8)[..., None]; "
        "print(json.dumps(m.predict(x)['label'].tolist()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps(images.tolist()),
        capture_output=True,
        text=True,
        cwd="/",
        check=True,
    )
    labels = json.loads(out.stdout.strip().splitlines()[-1])
    assert labels.count("7") >= 4


@pytest.mark.slow
@pytest.mark.scenario
def test_the_registered_champion_is_shrunk_again_with_lineage(champion, brought, tmp_path):
    first, first_layout, first_decision = champion
    name = first.promote.model_name
    params, layout = _project(brought, tmp_path)
    raw = yaml.safe_load((layout.root / "params.yaml").read_text())
    raw["model"] = {"arch": "registered", "uri": f"models:/{name}@champion", "input": raw["model"]["input"]}
    raw["promote"]["model_name"] = name
    raw["shrink"]["candidates"] = {"l1-30": {"strategy": "prune_l1", "ratio": 0.3, "lr": 0.003}}
    (layout.root / "params.yaml").write_text(yaml.safe_dump(raw))
    params = load_params(layout.root / "params.yaml")
    prepare(params, layout)
    base = train_baseline(params, layout)
    assert base.origin["registered_version"] == first_decision.registry.version
    assert base.origin["checkpoint_sha256"] == load_record(first_layout, "l1-50-kd").sha256
    shrink_candidate(params, layout, "l1-30")
    # the new model replays the champion's pruning, then its own
    before = torch.load(first_layout.checkpoint("l1-50-kd"), weights_only=True)["spec"]["pruning_history"]
    after = torch.load(layout.checkpoint("l1-30"), weights_only=True)["spec"]["pruning_history"]
    assert after[: len(before)] == before and len(after) > len(before)
    evaluate_models(params, layout)
    ctx = Context(params, layout, Tracker(tracking_uri(layout.root), params.tracking.experiment))
    decision = run_promote(ctx, force=True)
    version = MlflowClient().get_model_version(name, decision.registry.version)
    assert version.tags["baseline_source"] == f"models:/{name}@champion"
    assert version.tags["baseline_registered_version"] == first_decision.registry.version


# Bad input: one line, exit 1, nothing registered.
def _fails(project: Path, stage: str) -> str:
    result = run_cli(
        "stage", stage, cwd=project, env={"MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    )
    assert result.returncode == 1, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.stderr.strip().endswith(errors[0]), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    return errors[0]


def test_a_heldout_folder_that_overlaps_the_training_images_is_refused(brought, tmp_path):
    params, layout = _project(brought, tmp_path)
    shutil.copytree(brought / "images" / "train", tmp_path / "seen")  # the images it trained on
    (tmp_path / "flat").mkdir()
    for cls in (brought / "images" / "train").iterdir():
        shutil.copytree(cls, tmp_path / "flat" / cls.name)
    raw = yaml.safe_load((tmp_path / "params.yaml").read_text())
    raw["data"]["root"], raw["data"]["heldout_root"] = "flat", "seen"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    line = _fails(tmp_path, "prepare")
    seen = sum(1 for _ in (tmp_path / "seen").rglob("*.png"))
    assert f"of the {seen} held-out images (data.heldout_root seen) are also training images" in line
    assert not (tmp_path / "data" / "prepared" / "manifest.json").exists()


def test_a_model_without_declared_unseen_images_is_refused(brought, tmp_path):
    _project(brought, tmp_path)
    raw = yaml.safe_load((tmp_path / "params.yaml").read_text())
    raw["data"] = {"source": "digits"}
    raw["model"]["input"] = {"mean": [0.5], "std": [0.5]}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    assert "declares no images it has not seen" in _fails(tmp_path, "prepare")


def _retarget(project: Path, **model) -> None:
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["model"].update(model)
    (project / "params.yaml").write_text(yaml.safe_dump(raw))


@pytest.fixture
def prepared(brought, tmp_path):
    params, layout = _project(brought, tmp_path)
    prepare(params, layout)
    return tmp_path


def test_weights_that_do_not_fit_the_factory_are_refused(prepared):
    _retarget(prepared, kwargs={"in_channels": 1, "width": 16, "blocks": 2, "num_classes": 10})
    line = _fails(prepared, "baseline")
    assert "weights.pt does not fit factory models.tinynet:build" in line and "of another shape" in line


def test_a_wrong_number_of_outputs_is_refused(prepared, brought):
    net = FactoryNet("models.tinynet:build", {"num_classes": 9}, in_channels=1, image_size=8, num_classes=9)
    torch.save(net.net.state_dict(), prepared / "nine.pt")
    _retarget(
        prepared, weights="nine.pt", kwargs={"in_channels": 1, "width": 32, "blocks": 2, "num_classes": 9}
    )
    assert "the model outputs [9] per image but the data has 10 classes" in _fails(prepared, "baseline")


def test_a_shuffled_class_order_is_found_and_model_classes_fixes_it(prepared):
    state = torch.load(prepared / "weights.pt", weights_only=True)
    order = [3, 0, 1, 2, 4, 5, 6, 7, 9, 8]  # output i now predicts class order[i]
    state["head.weight"], state["head.bias"] = state["head.weight"][order], state["head.bias"][order]
    torch.save(state, prepared / "shuffled.pt")
    _retarget(prepared, weights="shuffled.pt")
    line = _fails(prepared, "baseline")
    classes = [str(c) for c in order]
    assert "looks like class" in line and f"set model.classes: {classes}" in line
    _retarget(prepared, classes=classes)
    result = run_cli(
        "stage", "baseline", cwd=prepared, env={"MLFLOW_TRACKING_URI": f"sqlite:///{prepared / 'mlflow.db'}"}
    )
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((prepared / "artifacts" / "baseline" / "record.json").read_text())
    assert record["origin"]["val_acc_as_given"] > 50 and record["origin"]["classes"] == classes


def test_a_model_that_is_not_accurate_is_refused_with_its_accuracy(prepared):
    width = yaml.safe_load((prepared / "params.yaml").read_text())["model"]["kwargs"][
        "width"
    ]  # the example's
    net = FactoryNet("models.tinynet:build", {"width": width}, in_channels=1, image_size=8, num_classes=10)
    torch.save(net.net.state_dict(), prepared / "untrained.pt")
    _retarget(prepared, weights="untrained.pt")
    assert "the model is not accurate on the validation images" in _fails(prepared, "baseline")


def test_config_refuses_what_does_not_apply_to_a_brought_model(tmp_path):
    path = _params(tmp_path)
    with pytest.raises(ConfigError, match="width on factory needs a parametric architecture"):
        load_params(path, ["shrink.candidates={w: {strategy: width, ratio: 0.5}}"])
    with pytest.raises(ConfigError, match="torchvision has no classification model 'resnet1800'"):
        load_params(path, ["model={arch: torchvision, name: resnet1800}"])
    with pytest.raises(ConfigError, match="data.image_size 16 contradicts model.input"):
        load_params(path, ["data.image_size=16"])


# torchvision by name, standard stems, weights saved here: prune, save, rebuild exactly.
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_a_torchvision_model_prunes_and_rebuilds_from_its_history(name, tmp_path):
    torch.manual_seed(0)
    source = TorchvisionNet(name, in_channels=3, image_size=32, num_classes=10)
    torch.save(source.net.state_dict(), tmp_path / "w.pt")  # what a user's fine-tuning saved
    model = TorchvisionNet(name, in_channels=3, image_size=32, num_classes=10).eval()
    model.net.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True))
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    before = sum(p.numel() for p in model.parameters())
    shrunk = apply_strategy("prune_l1", copy.deepcopy(model), (x, y), ratio=0.5)
    assert sum(p.numel() for p in shrunk.parameters()) < 0.5 * before
    assert shrunk.classifier_layer().out_features == 10 and shrunk.pruning_history
    path = tmp_path / "m.pt"
    loaded, _ = load_checkpoint(path, sha256=save_checkpoint(shrunk, path))
    assert isinstance(loaded, TorchvisionNet) and loaded.spec() == shrunk.spec()
    assert torch.equal(loaded(x), shrunk(x))


class FixedGain(nn.Module):
    """A per-channel gain held in a buffer (not a parameter): torch-pruning does not see its
    channels, so pruning the convolution before it breaks it."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("gain", torch.linspace(0.5, 1.5, channels).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


def test_a_layer_torch_pruning_cannot_follow_fails_that_candidate_in_one_line():
    net = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        FixedGain(16),
        nn.Conv2d(16, 8, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )
    net.num_classes = 10
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    with pytest.raises(
        ShrinkError,
        match=r"prune_l1 left the network unable to run: module '2' \(FixedGain\) fails: The size",
    ) as info:
        apply_strategy("prune_l1", net, (x, y), ratio=0.5)
    assert "\n" not in str(info.value)
