"""A baseline the user brings: a torchvision model by name or a factory of their own with a weights
file, or a version this pipeline registered (``models:/<name>@<alias>``). It is checked before
anything trains (output count, class order, accuracy) and taken as it is, unless ``model.finetune``
asks for epochs; its lineage (where it came from, the file's sha256) goes in its record.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from scipy.optimize import linear_sum_assignment
from scipy.stats import binomtest
from torch import nn

from shrinkflow.models.arch.given import FactoryOptions, GivenError, GivenOptions, trust_code
from shrinkflow.models.architecture import classifier_layers
from shrinkflow.models.checkpoint import CheckpointError, load_checkpoint, sha256_file
from shrinkflow.models.registry import build_model
from shrinkflow.tasks.config import Params, RegisteredOptions
from shrinkflow.tasks.errors import ShrinkflowError, first_line
from shrinkflow.tasks.layout import Layout
from shrinkflow.tasks.records import Manifest
from shrinkflow.tasks.registry import download_version, version_by_alias
from shrinkflow.tasks.tracking import Tracker

log = logging.getLogger(__name__)

# A model whose validation accuracy is not above chance at this significance is refused.
CHANCE_P = 1e-3


class BaselineError(ShrinkflowError, ValueError):
    """A brought model that cannot be the baseline: it does not build, load, fit the data or work."""


def is_given(params: Params) -> bool:
    return isinstance(params.model, GivenOptions | RegisteredOptions)


def trust_user_code(params: Params, layout: Layout) -> None:
    """Put the user's code folder (``model.code_path``) first on ``sys.path`` and trust factories
    from it; a no-op for every other model section. Every process that loads a model calls it."""
    if isinstance(params.model, FactoryOptions):
        try:
            trust_code(layout.root / params.model.code_path)
        except GivenError as exc:
            raise BaselineError(str(exc)) from None


def fingerprint(params: Params, layout: Layout) -> dict[str, Any]:
    """What a brought baseline depends on beyond its params (for the run cache): the weights
    file's sha256, the user's code, or the registered version an alias points at now."""
    model_cfg = params.model
    found: dict[str, Any] = {}
    if isinstance(model_cfg, GivenOptions) and model_cfg.weights:
        path = layout.root / model_cfg.weights
        found["weights_sha256"] = sha256_file(path) if path.is_file() else "missing"
    if isinstance(model_cfg, FactoryOptions):
        digest = hashlib.sha256()
        code = layout.root / model_cfg.code_path
        for file in sorted(code.rglob("*.py")) if code.is_dir() else []:
            digest.update(str(file.relative_to(code)).encode() + b"\0" + file.read_bytes())
        found["code_sha256"] = digest.hexdigest()
    if isinstance(model_cfg, RegisteredOptions):
        name, ref = _parse(model_cfg.uri)
        tracker = Tracker.for_project(layout.root, params.tracking.experiment)
        version = version_by_alias(tracker, name, ref[1:]) if ref.startswith("@") else None
        found["registered"] = (
            [ref, version.version, version.tags.get("checkpoint_sha256")] if version else ref
        )
    return found


def build_given(params: Params, layout: Layout, manifest: Manifest) -> tuple[nn.Module, dict[str, Any]]:
    """The brought network with its weights, its outputs in the data's class order, and where it
    came from (the lineage recorded with it and on every version registered from it)."""
    model_cfg = params.model
    if isinstance(model_cfg, RegisteredOptions):
        model, origin = _registered(params, layout, manifest)
    else:
        trust_user_code(params, layout)
        channels, size, _ = manifest.input_shape
        spec = {
            "arch": model_cfg.arch,
            **model_cfg.description(),
            "in_channels": channels,
            "image_size": size,
            "num_classes": manifest.num_classes,
        }
        try:
            model = build_model(spec)
        except GivenError as exc:
            raise BaselineError(str(exc)) from None
        except Exception as exc:  # the user's own constructor
            raise BaselineError(
                f"model: building {_described(model_cfg)} failed: {first_line(exc, 300)}"
            ) from None
        origin = {"source": _described(model_cfg)}
        if model_cfg.weights:
            path = layout.root / model_cfg.weights
            _load_weights(model.net, path, model_cfg)
            origin |= {"weights": model_cfg.weights, "weights_sha256": sha256_file(path)}
    if model_cfg.classes is not None:
        _reorder_outputs(model, list(model_cfg.classes), manifest.classes)
        origin["classes"] = list(model_cfg.classes)
    return model.eval(), origin


def _described(model_cfg: GivenOptions) -> str:
    if isinstance(model_cfg, FactoryOptions):
        return f"factory {model_cfg.factory}"
    return f"torchvision {model_cfg.name}"


def _load_weights(net: nn.Module, path: Path, model_cfg: GivenOptions) -> None:
    """A plain state dict (``torch.save(model.state_dict())`` or safetensors) into ``net``; one
    line naming what does not fit."""
    if not path.is_file():
        raise BaselineError(f"model.weights {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BaselineError(f"model.weights {path} cannot be loaded safely: {first_line(exc, 300)}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a common checkpoint convention
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BaselineError(f"model.weights {path} is not a state dict (a mapping of names to tensors)")
    own = net.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} of another shape (e.g. {k}: {list(state[k].shape)} vs {list(own[k].shape)})"
            )
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise BaselineError(f"model.weights {path} does not fit {_described(model_cfg)}: " + "; ".join(parts))
    net.load_state_dict(state)


def _reorder_outputs(model: nn.Module, model_classes: list[str], data_classes: list[str]) -> None:
    """Permute the classifier's output rows so that output ``i`` is the data's class ``i``."""
    if sorted(model_classes) != sorted(data_classes):
        extra = sorted(set(model_classes) - set(data_classes)) or sorted(
            set(data_classes) - set(model_classes)
        )
        raise BaselineError(
            f"model.classes must name the data's {len(data_classes)} classes once each; "
            f"{extra[:3] or 'a repeated name'} differs"
        )
    head = classifier_layers(model, len(data_classes))[0]
    order = torch.tensor([model_classes.index(name) for name in data_classes])
    with torch.no_grad():
        head.weight.copy_(head.weight[order])
        if head.bias is not None:
            head.bias.copy_(head.bias[order])


def check_given(model: nn.Module, x: torch.Tensor, y: torch.Tensor, classes: list[str]) -> float:
    """Refuse, in one line, a model that cannot be the baseline: a wrong number of outputs, an
    output order that differs from the data's (found by the best class assignment on validation),
    or an accuracy no better than chance. Returns its validation accuracy."""
    with torch.inference_mode():
        try:
            logits = model(x[:2])
        except Exception as exc:
            raise BaselineError(
                f"the model fails on the prepared images (shape {list(x.shape[1:])}): {first_line(exc, 300)}"
            ) from None
        if logits.ndim != 2 or logits.shape[1] != len(classes):
            raise BaselineError(
                f"the model outputs {list(logits.shape[1:])} per image but the data has {len(classes)} "
                "classes; size its classifier to them (or point data at the classes it was trained on)"
            )
        predicted = torch.cat([model(x[i : i + 256]).argmax(1) for i in range(0, len(x), 256)]).numpy()
    truth = y.numpy()
    k, n = len(classes), len(truth)
    correct = int((predicted == truth).sum())
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (predicted, truth), 1)
    rows, cols = linear_sum_assignment(-confusion)  # output row -> class col
    mapped = int(confusion[rows, cols].sum())
    above_chance = binomtest(correct, n, 1 / k, alternative="greater").pvalue < CHANCE_P
    mapping_works = binomtest(mapped, n, 1 / k, alternative="greater").pvalue < CHANCE_P
    if mapped > correct and mapping_works and (not above_chance or mapped - correct > 0.25 * n):
        r, c = next((r, c) for r, c in zip(rows, cols, strict=True) if r != c)
        order = [classes[c] for c in cols[np.argsort(rows)]]
        raise BaselineError(
            f"the model's output {r} looks like class {classes[c]!r} ({100 * correct / n:.1f}% as "
            f"ordered, {100 * mapped / n:.1f}% with the outputs reassigned); set model.classes: {order}"
        )
    if not above_chance:
        raise BaselineError(
            f"the model is not accurate on the validation images: {100 * correct / n:.1f}% "
            f"(chance {100 / k:.1f}%, {n} images); is it trained for these classes and this input?"
        )
    return 100 * correct / n


def _registered(params: Params, layout: Layout, manifest: Manifest) -> tuple[nn.Module, dict[str, Any]]:
    """A registered version's network, its checkpoint checked against the version's sha256 and its
    task and preprocessing against this run's data."""
    uri = params.model.uri
    name, version_ref = _parse(uri)
    tracker = Tracker.for_project(layout.root, params.tracking.experiment)
    try:
        version = (
            version_by_alias(tracker, name, version_ref[1:])
            if version_ref.startswith("@")
            else tracker.client.get_model_version(name, version_ref)
        )
    except Exception as exc:
        raise BaselineError(
            f"model.uri {uri}: cannot read it from the registry: {first_line(exc, 300)}"
        ) from None
    if version is None:
        raise BaselineError(f"model.uri {uri}: no such registered version")
    with tempfile.TemporaryDirectory(prefix="shrinkflow-given-") as tmp:
        try:
            local = download_version(tracker, name, str(version.version), Path(tmp))
        except Exception as exc:
            raise BaselineError(
                f"model.uri {uri}: cannot download v{version.version}: {first_line(exc, 300)}"
            ) from None
        files = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]["artifacts"]
        checkpoint, their_manifest = local / files["checkpoint"]["path"], local / files["manifest"]["path"]
        expected = version.tags.get("checkpoint_sha256")
        try:
            model, _ = load_checkpoint(checkpoint, sha256=expected)
        except CheckpointError as exc:
            raise BaselineError(f"model.uri {uri} v{version.version}: {exc}") from None
        theirs = yaml.safe_load(their_manifest.read_text())
    _same_task(uri, version.version, theirs, manifest)
    origin = {
        "source": uri,
        "registered_model": name,
        "registered_version": str(version.version),
        "checkpoint_sha256": sha256_file(checkpoint) if expected is None else expected,
    }
    return model, origin


def _parse(uri: str) -> tuple[str, str]:
    rest = uri.removeprefix("models:/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return name, "@" + alias
    name, version = rest.rsplit("/", 1)
    return name, version


def _same_task(uri: str, version: str, theirs: dict[str, Any], ours: Manifest) -> None:
    """The version must classify this data's classes from images prepared the same way."""
    checks = {
        "classes": (theirs.get("classes"), ours.classes),
        "input shape": (theirs.get("input_shape"), ours.input_shape),
        "pixel scale": (theirs.get("scale"), ours.scale),
    }
    for what, (a, b) in checks.items():
        if a != b:
            raise BaselineError(f"model.uri {uri} v{version} was trained on {what} {a}, this data has {b}")
    for what in ("mean", "std"):
        a, b = np.asarray(theirs.get(what), dtype=float), np.asarray(getattr(ours, what), dtype=float)
        if a.shape != b.shape or not np.allclose(a, b, atol=1e-4):
            raise BaselineError(
                f"model.uri {uri} v{version} normalises with {what} {a.round(4).tolist()}, this data with "
                f"{b.round(4).tolist()}; declare its input (model.input.mean/std) or prepare the same data"
            )


def lineage_tags(origin: dict[str, Any]) -> dict[str, str]:
    """Registry tags naming where a version's baseline came from (empty for our own baseline):
    ``baseline_source`` (torchvision name, factory, or ``models:/`` URI), the weights file's sha256,
    the registered model and version it was shrunk from."""
    keys = {
        "source": "baseline_source",
        "weights": "baseline_weights",
        "weights_sha256": "baseline_weights_sha256",
        "registered_model": "baseline_registered_model",
        "registered_version": "baseline_registered_version",
        "checkpoint_sha256": "baseline_checkpoint_sha256",
        "val_acc_as_given": "baseline_val_acc_as_given",
    }
    return {tag: str(origin[key]) for key, tag in keys.items() if key in origin}
