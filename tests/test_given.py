"""A model the user brings: torchvision by name, a factory in a package of the user's own (called
``models``, as in ``examples/byo``), or a registered version. Real networks, real weights files
saved here, real torch-pruning, a real MLflow registry (sqlite)."""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow import MlflowClient
from PIL import Image
from torch import nn

from shrinkflow.models import apply_strategy
from shrinkflow.models.arch.given import FactoryNet, FactoryOptions, TorchvisionNet, user_code
from shrinkflow.models.checkpoint import load_checkpoint
from shrinkflow.models.strategies import ShrinkError
from shrinkflow.tasks.config import ConfigError, load_params
from shrinkflow.tasks.data.prepare import load_raw_split, load_split, prepare
from shrinkflow.tasks.io import save_checkpoint, write_json
from shrinkflow.tasks.layout import Layout
from shrinkflow.tasks.measurement.evaluate import evaluate_models, load_table
from shrinkflow.tasks.pipeline.stages import Context, run_promote
from shrinkflow.tasks.records import ModelRecord, load_manifest, load_record
from shrinkflow.tasks.store.registry import download_version, register_model
from shrinkflow.tasks.store.tracking import Tracker, tracking_uri
from shrinkflow.tasks.training.given import BaselineError, _load_weights, lineage_tags
from shrinkflow.tasks.training.given import user_code as given_user_code
from shrinkflow.tasks.training.train import shrink_candidate, train_baseline
from tests.conftest import REPO, run_cli

EXAMPLE = REPO / "examples" / "byo"


@pytest.fixture(scope="module", autouse=True)
def _users_code():
    """The example's package (``models``) is the user's code in every test here (module-scoped:
    the module's fixtures build its network too)."""
    with user_code(EXAMPLE):
        yield


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


# --- the user's code, and what a brought network returns and how it answers -----------------------

USER_NETS = '''"""Variants of the example's network, as users write them."""
import torch
import torch.nn.functional as F
from models.tinynet import TinyNet
from torch import nn


class DropoutAtInference(TinyNet):
    """Calls self.train() in forward, so its dropout (and BatchNorm) run in training mode."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        self.train()
        return self.head(self.drop(self.blocks(self.stem(x)).mean((2, 3))))


class FunctionalDropout(TinyNet):
    def forward(self, x):
        return self.head(F.dropout(self.blocks(self.stem(x)).mean((2, 3)), 0.5, training=True))


class Noisy(TinyNet):
    def forward(self, x):
        return super().forward(x + 0.1 * torch.rand_like(x))


class BatchStatistics(TinyNet):
    def forward(self, x):
        self.stem[1].train()
        return super().forward(x)


class Pair(TinyNet):
    def forward(self, x):
        logits = super().forward(x)
        return logits, logits.detach().softmax(1)


class Mapping(TinyNet):
    def __init__(self, key="logits", **kw):
        super().__init__(**kw)
        self.key = key

    def forward(self, x):
        logits = super().forward(x)
        return {self.key: logits, "aux": logits.detach()}


class Text(TinyNet):
    def forward(self, x):
        return [str(tuple(super().forward(x).shape))]


KINDS = {
    c.__name__: c
    for c in (DropoutAtInference, FunctionalDropout, Noisy, BatchStatistics, Pair, Mapping, Text)
}


def build(kind, **kw):
    return KINDS[kind](**kw)
'''
# Imported by the pipeline only if it shadowed the installed matplotlib.
DECOY = "import pathlib\npathlib.Path(__file__).with_name('RAN').write_text('the decoy ran')\n"


@pytest.fixture(scope="module")
def user_code_folder(tmp_path_factory):
    """A user's code folder: the example's package, the variants above (``byonets``), and a
    package called like one of shrinkflow's dependencies (``matplotlib``)."""
    code = tmp_path_factory.mktemp("code")
    shutil.copytree(EXAMPLE / "models", code / "models", ignore=shutil.ignore_patterns("__pycache__"))
    (code / "byonets").mkdir()
    (code / "byonets" / "__init__.py").write_text(USER_NETS)
    (code / "matplotlib").mkdir()
    (code / "matplotlib" / "__init__.py").write_text(DECOY)
    return code


KWARGS = yaml.safe_load((EXAMPLE / "params.yaml").read_text())["model"]["kwargs"]  # what weights.pt fits


def _variant(prepared: Path, code: Path, kind: str, **extra) -> tuple:
    """The project's params and layout with the brought weights in the ``kind`` variant."""
    _retarget(
        prepared, factory="byonets:build", code_path=str(code), kwargs={"kind": kind, **KWARGS, **extra}
    )
    params = load_params(prepared / "params.yaml")
    return params, Layout.from_params(params, prepared)


def _baseline_refusal(params, layout) -> str:
    with pytest.raises(BaselineError) as info, given_user_code(params, layout):
        train_baseline(params, layout)
    assert "\n" not in str(info.value)
    assert not layout.checkpoint("baseline").exists()
    return str(info.value)


@pytest.mark.parametrize(
    ("kind", "cause"),
    [
        ("DropoutAtInference", "dropout 'net.drop' is in training mode after eval() (set in forward)"),
        ("FunctionalDropout", "forward draws random numbers"),
        ("Noisy", "forward draws random numbers"),
        ("BatchStatistics", "BatchNorm 'net.stem.1' is in training mode after eval()"),
    ],
)
def test_a_model_whose_answers_change_between_calls_is_refused_naming_the_cause(
    prepared, user_code_folder, kind, cause
):
    line = _baseline_refusal(*_variant(prepared, user_code_folder, kind))
    assert line.startswith("the model does not answer the same images the same way twice") and cause in line


def test_the_cli_refuses_dropout_at_inference_in_one_line_before_training(prepared, user_code_folder):
    _variant(prepared, user_code_folder, "DropoutAtInference")
    assert "dropout 'net.drop' is in training mode" in _fails(prepared, "baseline")
    assert not (user_code_folder / "matplotlib" / "RAN").exists()


def test_a_candidate_whose_answers_change_fails_at_evaluate(prepared, user_code_folder):
    params, layout = _project_params(prepared)
    train_baseline(params, layout)
    with user_code(user_code_folder):  # the candidate was built by the user's variant
        noisy = FactoryNet(
            "byonets:build", {"kind": "Noisy", **KWARGS}, in_channels=1, image_size=8, num_classes=10
        )
        noisy.net.load_state_dict(torch.load(prepared / "weights.pt", weights_only=True))
        path = layout.checkpoint("l1-50-kd")
        record = ModelRecord(name="l1-50-kd", strategy="prune_l1", options={}, steps=["prune_l1"])
        record.sha256, record.checkpoint = save_checkpoint(noisy, path), str(path.relative_to(layout.root))
        write_json(layout.record("l1-50-kd"), asdict(record))
        table = evaluate_models(params, layout).set_index("name")
    assert table.loc["baseline", "status"] == "ok"
    assert table.loc["l1-50-kd", "status"] == "failed"
    assert table.loc["l1-50-kd", "error"].startswith(
        "answers change between calls: forward draws random numbers"
    )
    assert "l1-50-kd" not in pd.read_csv(layout.predictions_csv).columns


def _project_params(project: Path) -> tuple:
    params = load_params(project / "params.yaml")
    return params, Layout.from_params(params, project)


@pytest.mark.parametrize(
    ("kind", "extra"),
    [("Pair", {}), ("Mapping", {}), ("Mapping", {"key": "out"})],
)
def test_logits_are_taken_from_a_tuple_or_a_mapping_and_the_spec_remembers_the_key(
    prepared, user_code_folder, kind, extra
):
    params, layout = _variant(prepared, user_code_folder, kind, **extra)
    if extra:
        _retarget(prepared, output=extra["key"])
        params, layout = _project_params(prepared)
    with given_user_code(params, layout):
        record = train_baseline(params, layout)
        model, _ = load_checkpoint(layout.checkpoint("baseline"), sha256=record.sha256)
        x = load_split(layout, "val")[0][:4]
        pruned = apply_strategy(
            "prune_l1", copy.deepcopy(model), (x, torch.zeros(4, dtype=torch.long)), ratio=0.5
        )
        path = layout.root / "pruned.pt"
        rebuilt, _ = load_checkpoint(path, sha256=save_checkpoint(pruned, path))
    assert record.origin["val_acc_as_given"] > 80
    assert model(x).shape == (4, 10) and torch.equal(rebuilt(x), pruned(x))
    assert rebuilt.spec().get("output") == extra.get("key")


@pytest.mark.parametrize(
    ("kind", "extra", "output", "says"),
    [
        (
            "Mapping",
            {"key": "out"},
            None,
            "returns a mapping with keys 'out', 'aux' and no 'logits'; set model.output",
        ),
        ("Mapping", {}, "scores", "returns a mapping with keys 'logits', 'aux' and no 'scores'"),
        (
            "Pair",
            {},
            "logits",
            "model.output is 'logits' but the network returns a tuple of 2, not a mapping",
        ),
        ("Text", {}, None, "the network returns a str where its logits should be; it must return one tensor"),
    ],
)
def test_a_model_that_does_not_return_one_tensor_is_refused_before_training(
    prepared, user_code_folder, kind, extra, output, says
):
    _variant(prepared, user_code_folder, kind, **extra)
    _retarget(prepared, output=output)
    line = _baseline_refusal(*_project_params(prepared))
    assert line.startswith("model: ") and says in line


def test_the_users_package_is_imported_from_code_path_and_never_shadows_an_installed_one(user_code_folder):
    probe = (
        "import sys, json; from shrinkflow.models.arch.given import user_code, resolve_factory\n"
        f"with user_code({str(user_code_folder)!r}) as code:\n"
        "    build = resolve_factory('byonets:build')\n"
        "    import matplotlib, byonets\n"
        "print(json.dumps([list(code.shadowing), matplotlib.__file__, byonets.__file__,"
        " any(str(code.root) in p for p in sys.path)]))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd="/", timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    shadowing, matplotlib_file, byonets_file, on_path = json.loads(done.stdout.strip().splitlines()[-1])
    assert shadowing == ["matplotlib"] and "site-packages" in matplotlib_file
    assert byonets_file == str(user_code_folder / "byonets" / "__init__.py") and not on_path
    assert not (user_code_folder / "matplotlib" / "RAN").exists()


def test_a_factory_in_a_package_named_like_an_installed_one_is_refused(prepared, user_code_folder):
    _retarget(prepared, factory="matplotlib:build", code_path=str(user_code_folder))
    params, layout = _project_params(prepared)
    with (
        pytest.raises(
            BaselineError,
            match="the package 'matplotlib' in model.code_path .* has the name of an "
            "installed or standard module, so it is never imported from there; rename the package",
        ),
        given_user_code(params, layout),
    ):
        pass
    assert not (user_code_folder / "matplotlib" / "RAN").exists()


@pytest.mark.slow
def test_a_factory_version_carries_the_users_packages_and_loads_in_a_fresh_process(
    prepared, user_code_folder
):
    params, layout = _variant(prepared, user_code_folder, "Pair")  # byonets imports the folder's models
    name = params.promote.model_name
    with given_user_code(params, layout):
        train_baseline(params, layout)
        tracker = Tracker(tracking_uri(layout.root), params.tracking.experiment)
        run = tracker.start_run("promote")
        raw, labels = load_raw_split(layout, "test")
        version = register_model(
            tracker,
            run,
            layout.checkpoint("baseline"),
            name,
            manifest=layout.manifest,
            onnx="not exported",
            raw_example=raw[:2].numpy(),
            tags={},
            description="",
        )
        tracker.end_run(run)
    local = download_version(tracker, name, version, prepared / "downloaded")
    assert sorted(p.name for p in (local / "code").iterdir()) == ["byonets", "models", "shrinkflow"]
    script = (
        "import sys, json, numpy as np, mlflow; "
        f"m = mlflow.pyfunc.load_model('models:/{name}/{version}'); "
        "x = np.array(json.loads(sys.stdin.read()), dtype=np.uint8); "
        "print(json.dumps(m.predict(x)['label'].tolist()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps(raw[:50].numpy().tolist()),
        capture_output=True,
        text=True,
        cwd="/",
        env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri(layout.root)},
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    served = json.loads(out.stdout.strip().splitlines()[-1])
    classes = load_manifest(layout).classes
    assert sum(classes[int(t)] == s for t, s in zip(labels[:50], served, strict=True)) >= 40
    assert not (user_code_folder / "matplotlib" / "RAN").exists()


# --- the declared class order ------------------------------------------------------------------


def _origin(project: Path) -> dict:
    params, layout = _project_params(project)
    return train_baseline(params, layout).origin


def test_a_declared_order_that_swaps_two_classes_is_refused_with_the_order_to_set(prepared):
    swapped = ["1", "0", *map(str, range(2, 10))]
    _retarget(prepared, classes=swapped)
    with pytest.raises(BaselineError) as info:
        train_baseline(*_project_params(prepared))
    line = str(info.value)
    n = len(load_split(Layout.from_params(load_params(prepared / "params.yaml"), prepared), "val")[1])
    assert "looks like class '1' (" in line and f"paired test on {n} validation images" in line
    assert line.endswith(f"set model.classes: {[str(c) for c in range(10)]}")
    _retarget(prepared, classes=[str(c) for c in range(10)])  # the folder order, declared: accepted
    assert _origin(prepared)["val_acc_as_given"] > 90


def test_a_correct_but_weak_model_is_not_refused(prepared):
    state = torch.load(prepared / "weights.pt", weights_only=True)
    g = torch.Generator().manual_seed(0)
    for key, value in state.items():  # noise that costs the model about half of its accuracy
        if value.is_floating_point() and "running" not in key:
            state[key] = value + 0.6 * value.std() * torch.randn(value.shape, generator=g)
    torch.save(state, prepared / "weak.pt")
    _retarget(prepared, weights="weak.pt")
    assert 30 < _origin(prepared)["val_acc_as_given"] < 80


# --- BatchNorm statistics of the model as given ------------------------------------------------


def test_stored_batch_norm_statistics_that_work_are_kept_and_broken_ones_recomputed(prepared):
    kept = _origin(prepared)
    assert kept["batch_norm"].startswith("stored (")
    state = torch.load(prepared / "weights.pt", weights_only=True)
    for key in [k for k in state if k.endswith("running_var")]:
        state[key] = state[key] * 25  # as if the user's training had barely moved them
    torch.save(state, prepared / "stale.pt")
    _retarget(prepared, weights="stale.pt")
    recomputed = _origin(prepared)
    assert (
        recomputed["batch_norm"].startswith("recomputed (")
        and "256 training images" in recomputed["batch_norm"]
    )
    assert recomputed["val_acc_as_given"] > kept["val_acc_as_given"] - 3
    assert lineage_tags(recomputed)["baseline_batch_norm"] == recomputed["batch_norm"]


# --- the weights files people have -------------------------------------------------------------


def _tinynet() -> FactoryNet:
    return FactoryNet("models.tinynet:build", {}, in_channels=1, image_size=8, num_classes=10)


@pytest.mark.parametrize(
    ("wrap", "said"),
    [
        (
            lambda sd: {"module." + k: v for k, v in sd.items()},
            "removed the key prefix 'module.' (DataParallel",
        ),
        (lambda sd: {"state_dict": sd, "epoch": 3}, "the state dict under the checkpoint's key 'state_dict'"),
        (lambda sd: {"model_state_dict": sd, "optimizer_state_dict": {}}, "key 'model_state_dict'"),
        (lambda sd: {"model": sd, "args": {"lr": 0.1}}, "key 'model'"),  # timm, DeiT
        (  # Lightning: the LightningModule's `model` attribute, a loss with a buffer beside it
            lambda sd: {
                "state_dict": {**{"model." + k: v for k, v in sd.items()}, "loss.weight": torch.ones(10)},
                "pytorch-lightning_version": "2.4.0",
            },
            "removed the key prefix 'model.' (a LightningModule's `model` attribute); 1 tensors outside it",
        ),
        (lambda sd: {"module._orig_mod." + k: v for k, v in sd.items()}, "prefix 'module._orig_mod.'"),
    ],
)
def test_the_usual_checkpoint_wrappers_and_prefixes_load(tmp_path, caplog, wrap, said):
    source = _tinynet()
    torch.save(wrap(source.net.state_dict()), tmp_path / "w.pt")
    net = _tinynet()
    with caplog.at_level(logging.INFO, logger="shrinkflow.tasks.training.given"):
        _load_weights(net.net, tmp_path / "w.pt", FactoryOptions(factory="models.tinynet:build"))
    assert said in caplog.text
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(net.eval()(x), source.eval()(x))


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (
            lambda net: net,  # a whole pickled model
            "holds pickled Python objects (a whole model?), which are never unpickled here; save the "
            "network's state dict instead: torch.save(model.state_dict(), path)",
        ),
        (
            lambda net: {"ema": net.state_dict(), "student": net.state_dict()},
            "is a checkpoint with state dicts under ['ema', 'student'], none under ['state_dict', "
            "'model_state_dict', 'model']; save the one to use alone: torch.save(checkpoint['ema'], path)",
        ),
        (lambda net: [1, 2], "is not a state dict (a mapping of names to tensors), nor a checkpoint"),
    ],
)
def test_a_weights_file_that_is_not_a_state_dict_is_refused_saying_what_to_save(tmp_path, content, says):
    torch.save(content(_tinynet().net), tmp_path / "w.pt")
    with pytest.raises(BaselineError) as info:
        _load_weights(_tinynet().net, tmp_path / "w.pt", FactoryOptions(factory="models.tinynet:build"))
    assert says in str(info.value) and "weights_only" not in str(info.value)
    assert "\n" not in str(info.value)
