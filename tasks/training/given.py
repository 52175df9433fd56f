"""A baseline the user brings: a torchvision model by name or a factory of their own with a weights
file, or a version this pipeline registered (``models:/<name>@<alias>``). It is checked before
anything trains (what it returns, that it answers the same images the same way twice, its class
order, its accuracy, its BatchNorm statistics) and taken as it is, unless ``model.finetune`` asks
for epochs; its lineage (where it came from, the file's sha256) goes in its record.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import logging
import pickle
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from scipy.optimize import linear_sum_assignment
from scipy.stats import binomtest
from torch import nn

from shrinkflow.models.allocation import has_batch_norm
from shrinkflow.models.arch import given as arch_given
from shrinkflow.models.arch.given import FactoryOptions, GivenError, GivenOptions
from shrinkflow.models.architecture import classifier_layers
from shrinkflow.models.checkpoint import CheckpointError, load_checkpoint, sha256_file
from shrinkflow.models.determinism import nondeterminism
from shrinkflow.models.registry import build_model
from shrinkflow.tasks.config import Params, RegisteredOptions
from shrinkflow.tasks.decision.stats import discordant
from shrinkflow.tasks.errors import ShrinkflowError, first_line
from shrinkflow.tasks.layout import Layout
from shrinkflow.tasks.records import Manifest
from shrinkflow.tasks.store.registry import download_version, version_by_alias
from shrinkflow.tasks.store.tracking import Tracker
from shrinkflow.tasks.training.engine import (
    BN_IMAGES,
    Images,
    Split,
    accuracy,
    predict,
    reestimate_statistics,
)

log = logging.getLogger(__name__)

# A model whose validation accuracy is not above chance at this significance is refused.
CHANCE_P = 1e-3
# A declared class order is refused when another assignment of outputs to classes is better at
# this significance (one-sided exact McNemar test, each image scored with an assignment chosen on
# other images). The two errors are not alike: a false refusal costs the user one look at the
# model and a rerun (the line gives both accuracies), while a swapped order that is served
# labels every image of the swapped classes wrongly, silently, for every client. So the level
# is loose: a correct order is refused at most 1% of the time, and a two-class swap is found as
# soon as 7 images of those classes are on validation (all of them discordant: p = 0.0078).
ORDER_P = 0.01
# The user's BatchNorm statistics are replaced when statistics recomputed on training images are
# better on validation at this significance (one-sided exact McNemar test). Both are estimates of
# the same quantities; the test only keeps noise from replacing what the user trained.
BATCH_NORM_P = 0.05
# Images two evaluations are compared on (identical answers required).
DETERMINISM_IMAGES = 32
# Wrappers a checkpoint keeps its state dict under: Lightning and many training scripts,
# PyTorch's saving tutorial, timm and DeiT.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
# Key prefixes a training setup adds to every key of the network's own state dict.
PREFIXES = {
    "module.": "DataParallel/DistributedDataParallel",
    "model.": "a LightningModule's `model` attribute",
    "_orig_mod.": "torch.compile",
}


class BaselineError(ShrinkflowError, ValueError):
    """A brought model that cannot be the baseline: it does not build, load, fit the data or work."""


def is_given(params: Params) -> bool:
    return isinstance(params.model, GivenOptions | RegisteredOptions)


@contextlib.contextmanager
def user_code(params: Params, layout: Layout) -> Iterator[None]:
    """Inside the block the user's package (``model.code_path``) imports, from that folder only
    and without shadowing any installed module (see :func:`shrinkflow.models.arch.given.user_code`);
    nothing for every other model section. A stage that builds or loads a model runs inside it."""
    if not isinstance(params.model, FactoryOptions):
        yield
        return
    with contextlib.ExitStack() as scope:
        try:
            code = scope.enter_context(arch_given.user_code(layout.root / params.model.code_path))
        except GivenError as exc:
            raise BaselineError(str(exc)) from None
        top = params.model.factory.partition(":")[0].split(".")[0]
        if top in code.shadowing:
            raise BaselineError(
                f"model.factory {params.model.factory}: the package {top!r} in model.code_path "
                f"{params.model.code_path} has the name of an installed or standard module, so it is "
                "never imported from there; rename the package"
            )
        _say_shadowing(code.root, code.shadowing)
        yield


@functools.cache
def _say_shadowing(root: Path, names: tuple[str, ...]) -> None:
    if names:
        log.warning(
            "model.code_path %s: %s not imported from there (installed or standard modules have these names)",
            root,
            ", ".join(names),
        )


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
    """A state dict (``torch.save(model.state_dict())`` or safetensors, bare or under a usual
    checkpoint key, with a training wrapper's key prefix) into ``net``; one line naming what does
    not fit."""
    own = net.state_dict()
    state = _unprefixed(_unwrapped(_read_weights(path), path), own, path)
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


def _read_weights(path: Path) -> Any:
    """The file's contents, read without running any of its code."""
    if not path.is_file():
        raise BaselineError(f"model.weights {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # what weights_only raises for any object but tensors and containers
        raise BaselineError(
            f"model.weights {path} holds pickled Python objects (a whole model?), which are never "
            "unpickled here; save the network's state dict instead: torch.save(model.state_dict(), path)"
        ) from None
    except Exception as exc:
        raise BaselineError(f"model.weights {path} cannot be read: {first_line(exc, 300)}") from None


def _is_state_dict(value: Any) -> bool:
    return (
        bool(value) and isinstance(value, dict) and all(isinstance(v, torch.Tensor) for v in value.values())
    )


def _unwrapped(state: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state dict itself, or the one a checkpoint keeps under a usual key."""
    if _is_state_dict(state):
        return state
    if isinstance(state, dict):
        for key in WRAPPER_KEYS:
            if _is_state_dict(state.get(key)):
                log.info("model.weights %s: the state dict under the checkpoint's key %r", path, key)
                return state[key]
        inner = [str(k) for k, v in state.items() if _is_state_dict(v)]
        if inner:
            raise BaselineError(
                f"model.weights {path} is a checkpoint with state dicts under {inner[:4]}, none under "
                f"{list(WRAPPER_KEYS)}; save the one to use alone: "
                f"torch.save(checkpoint[{inner[0]!r}], path)"
            )
    raise BaselineError(
        f"model.weights {path} is not a state dict (a mapping of names to tensors), nor a checkpoint "
        f"holding one under {list(WRAPPER_KEYS)}"
    )


def _unprefixed(state: dict[str, torch.Tensor], own: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    """``state`` less the key prefixes a training wrapper adds (``module.`` from DataParallel,
    ``model.`` from a LightningModule, ``_orig_mod.`` from torch.compile, nested ones too): every
    key has it, or the keys under it are exactly the network's (a LightningModule's loss or
    metrics beside the network are then left out)."""
    taken, before = [], len(state)
    while set(state) != set(own):
        found = next(
            (
                (prefix, under)
                for prefix in PREFIXES
                if (under := {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
                and (len(under) == len(state) or set(under) == set(own))
            ),
            None,
        )
        if found is None:
            break
        taken.append(found[0])
        state = found[1]
    if taken:
        left_out = before - len(state)
        log.warning(
            "model.weights %s: removed the key prefix %r (%s)%s",
            path,
            "".join(taken),
            ", ".join(PREFIXES[p] for p in taken),
            f"; {left_out} tensors outside it left out" if left_out else "",
        )
    return state


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


def check_given(
    model: nn.Module, train: Images, val: Split, classes: list[str], declared: tuple[str, ...] | None = None
) -> dict[str, Any]:
    """Refuse, in one line, a model that cannot be the baseline: one that does not return one
    tensor of one logit per class, answers the same images differently between calls, has its
    outputs in an order other than the data's (``declared``: the ``model.classes`` it was
    reordered by), or is no better than chance. Its BatchNorm statistics are recomputed on
    ``train`` first when the stored ones are significantly worse on validation. Returns what goes
    in the baseline's origin: its validation accuracy and what was done to its statistics."""
    x, y = val
    check_runs(model, x, len(classes))
    settled = _settle_batch_norm(model, train, val)
    predicted = predict(model, x).numpy()
    _check_class_order(predicted, y.numpy(), classes, declared)
    correct, n, k = int((predicted == y.numpy()).sum()), len(y), len(classes)
    if binomtest(correct, n, 1 / k, alternative="greater").pvalue >= CHANCE_P:
        raise BaselineError(
            f"the model is not accurate on the validation images: {100 * correct / n:.1f}% "
            f"(chance {100 / k:.1f}%, {n} images); is it trained for these classes and this input?"
        )
    return settled | {"val_acc_as_given": 100 * correct / n}


def check_runs(model: nn.Module, x: Images, k: int) -> None:
    """Refuse a model that does not return one tensor of ``k`` logits per image of ``x`` in eval
    mode, or does not answer the same images the same way twice (see
    :func:`shrinkflow.models.determinism.nondeterminism`): before anything trains."""
    _check_outputs(model, x, k)
    if reason := nondeterminism(model, x[:DETERMINISM_IMAGES]):
        raise BaselineError(f"the model does not answer the same images the same way twice: {reason}")


def _check_outputs(model: nn.Module, x: Images, k: int) -> None:
    with torch.inference_mode():
        try:
            logits = model.eval()(x[:2])
        except GivenError as exc:
            raise BaselineError(f"model: {exc}") from None
        except Exception as exc:
            raise BaselineError(
                f"the model fails on the prepared images (shape {list(x.shape[1:])}): {first_line(exc, 300)}"
            ) from None
    if logits.ndim != 2 or logits.shape[1] != k:
        raise BaselineError(
            f"the model outputs {list(logits.shape[1:])} per image but the data has {k} "
            "classes; size its classifier to them (or point data at the classes it was trained on)"
        )


def _assignment(predicted: np.ndarray, truth: np.ndarray, k: int) -> np.ndarray:
    """The assignment of outputs to classes that gets most images right: ``a[output] = class``."""
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (predicted, truth), 1)
    rows, cols = linear_sum_assignment(-confusion)
    assignment = np.empty(k, dtype=np.int64)
    assignment[rows] = cols
    return assignment


def _check_class_order(
    predicted: np.ndarray, truth: np.ndarray, classes: list[str], declared: tuple[str, ...] | None
) -> None:
    """Refuse the declared order when the best assignment of outputs to classes is significantly
    better. An assignment chosen and scored on the same images would look better by chance, so
    each half of validation is scored with the assignment chosen on the other half (cross-fitted),
    and the images where that and the declared order disagree, from both halves, are tested
    together; the order to set comes from the whole of validation."""
    k, n = len(classes), len(truth)
    shuffled = np.random.default_rng(0).permutation(n)
    halves = (shuffled[: n // 2], shuffled[n // 2 :])
    gain = loss = 0
    for choose, test in (halves, halves[::-1]):
        chosen = _assignment(predicted[choose], truth[choose], k)
        won, lost = discordant(chosen[predicted[test]] == truth[test], predicted[test] == truth[test])
        gain, loss = gain + won, loss + lost
    p = binomtest(gain, gain + loss, 0.5, alternative="greater").pvalue if gain > loss else 1.0
    best = _assignment(predicted, truth, k)
    if p >= ORDER_P or (best == np.arange(k)).all():
        return
    row = next(r for r in range(k) if best[r] != r)
    order = [classes[c] for c in best]  # output i (as reordered) is class order[i]
    output = f"{row}"
    if declared is not None:  # in the model's own output order
        output = f"{declared.index(classes[row])} (declared {classes[row]!r})"
        order = [order[classes.index(name)] for name in declared]
    as_ordered, reassigned = 100 * (predicted == truth).mean(), 100 * (best[predicted] == truth).mean()
    raise BaselineError(
        f"the model's output {output} looks like class {classes[best[row]]!r} ({as_ordered:.1f}% as "
        f"ordered, {reassigned:.1f}% with the outputs reassigned; paired test on {n} validation "
        f"images, p = {p:.2g}); set model.classes: {order}"
    )


def _settle_batch_norm(model: nn.Module, train: Images, val: Split) -> dict[str, str]:
    """Keep the model's BatchNorm statistics, or replace them, in place, by statistics recomputed
    on training images when those are significantly better on validation (paired on the same
    images); what was done, for the baseline's origin."""
    if not has_batch_norm(model):
        return {}
    x, y = val
    recomputed = copy.deepcopy(model)
    reestimate_statistics(recomputed, train)
    stored, fresh = predict(model, x), predict(recomputed, x)
    gain, loss = discordant((fresh == y).numpy(), (stored == y).numpy())
    p = binomtest(gain, gain + loss, 0.5, alternative="greater").pvalue if gain > loss else 1.0
    figures = (
        f"{accuracy(stored, y):.2f}% on validation as stored, {accuracy(fresh, y):.2f}% recomputed on "
        f"{min(BN_IMAGES, len(train))} training images, p = {p:.2g}"
    )
    if p >= BATCH_NORM_P:
        return {"batch_norm": f"stored ({figures})"}
    model.load_state_dict(recomputed.state_dict())
    log.warning("baseline: its BatchNorm statistics do not reproduce its accuracy (%s); recomputed", figures)
    return {"batch_norm": f"recomputed ({figures})"}


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
            else tracker.registry.get_model_version(name, version_ref)
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
        "batch_norm": "baseline_batch_norm",
    }
    return {tag: str(origin[key]) for key, tag in keys.items() if key in origin}
