"""The model registry at the edges: register a checkpoint as a pyfunc model that takes raw
images, find a version by alias, load it back (checking its bytes), move an alias.

Run logging lives in :mod:`shrinkflow.tasks.store.tracking`; the registry's calls go through a
:class:`~shrinkflow.tasks.store.tracking.Tracker`'s ``registry``
(:class:`~shrinkflow.tasks.store.tracking.ModelRegistry`), never through the fluent API's globals
except where MLflow has no other way (logging and loading a pyfunc model).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema, TensorSpec

from shrinkflow.models.arch.given import code_packages
from shrinkflow.models.checkpoint import CheckpointError, sha256_file, user_factory
from shrinkflow.tasks.errors import ShrinkflowError, first_line
from shrinkflow.tasks.io import read_json
from shrinkflow.tasks.store.serving import probability_columns
from shrinkflow.tasks.store.tracking import ModelRegistry, Tracker

SERVING_CODE = Path(__file__).with_name("serving.py")
MODELS_PACKAGE = Path(__file__).resolve().parents[2] / "models"
CHECKSUM_FILE = "model.pt.sha256"
# Every figure of a version beyond the few tags a reviewer filters on, logged in its run.
RECORD_FILE = "version_record.json"
SHOWN_VERSIONS = 10  # a refusal names at most this many of the versions there are


class RegistryError(ShrinkflowError, LookupError):
    """A registered model or version that is not there (or a version that is not a number), or a
    registry that cannot be read: one line; MLflow's own error stays the cause, for the log."""


def serving_package(into: Path) -> Path:
    """``into/shrinkflow``: the package a registered model's code needs (``shrinkflow.models``),
    laid out as it is imported, for ``log_model(code_paths=...)``."""
    package = into / "shrinkflow"
    shutil.copytree(MODELS_PACKAGE, package / "models", ignore=shutil.ignore_patterns("__pycache__"))
    (package / "__init__.py").write_text('"""shrinkflow, as a registered model carries it."""\n')
    return package


def serving_code(into: Path, checkpoint: Path) -> list[str]:
    """What a registered model must carry to load anywhere: shrinkflow's ``models`` package and,
    for a network built by the user's own factory, the user's package and the packages of its
    code folder it imports (imported from there only)."""
    paths = [str(serving_package(into))]
    if factory := user_factory(checkpoint):
        paths += [str(path) for path in code_packages(factory)]
    return paths


def register_model(
    tracker: Tracker,
    run_id: str,
    checkpoint: Path,
    name: str,
    manifest: Path,
    onnx: Path | str,
    raw_example: np.ndarray,
    tags: dict[str, Any],
    description: str,
    record: dict[str, Any] | None = None,
) -> str:
    """Log ``checkpoint`` as a pyfunc model that takes raw images, with the ``manifest`` that
    prepares them and ``onnx``, the export evaluate checked against it (a string: why there is
    none), in ``run_id``; register it; return the version. ``raw_example`` is a few images as
    stored uint8 pixels (the input example); ``record`` (every figure that is not a tag) goes
    to the run as :data:`RECORD_FILE`."""
    classes = read_json(manifest)["classes"]
    with tempfile.TemporaryDirectory(prefix="shrinkflow-register-") as tmp:
        recorded = Path(tmp) / CHECKSUM_FILE  # checked by the served model before it loads
        recorded.write_text(sha256_file(checkpoint) + "\n")
        artifacts = {
            "checkpoint": str(checkpoint),
            "checkpoint_sha256": str(recorded),
            "manifest": str(manifest),
        }
        if isinstance(onnx, Path):  # under the name every registered version uses
            artifacts["onnx"] = str(shutil.copyfile(onnx, Path(tmp) / "model.onnx"))
        with _tracking(tracker.uri), mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(SERVING_CODE),
                artifacts=artifacts,
                code_paths=serving_code(Path(tmp), Path(checkpoint)),
                signature=serving_signature(classes),
                input_example=raw_example,
                pip_requirements=[
                    f"torch=={torch.__version__.split('+')[0]}",
                    f"mlflow=={mlflow.__version__}",
                    "numpy",
                    "pandas",
                ],
            )
    tags = {**tags, "onnx": "model.onnx" if isinstance(onnx, Path) else onnx}
    if record is not None:
        tracker.log_file(run_id, {k: str(v) for k, v in record.items()}, RECORD_FILE)
    version = tracker.registry.create_model_version(
        name=_ensure_registered(tracker.registry, name),
        source=info.model_uri,
        run_id=run_id,
        tags={k: str(v) for k, v in tags.items()},
        description=description,
        model_id=info.model_id,
    )
    return version.version


def _ensure_registered(client: ModelRegistry, name: str) -> str:
    try:
        client.create_registered_model(name)
    except mlflow.exceptions.MlflowException as exc:  # a concurrent run may have created it
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    return name


def version_record(client: ModelRegistry, name: str, version: str) -> dict[str, str]:
    """Everything a version records: its run's :data:`RECORD_FILE` overlaid with its tags (a tag
    edited in the registry wins). The record counts only when it names the version's own
    checkpoint (a version registered by hand from a shrinkflow run's model has none); a version
    registered before the record existed has it all in its tags."""
    found = client.get_model_version(name, str(version))
    record: dict[str, str] = {}
    if found.run_id and found.tags.get("checkpoint_sha256"):
        with tempfile.TemporaryDirectory(prefix="shrinkflow-record-") as tmp:
            try:
                record = read_json(Path(client.download_artifacts(found.run_id, RECORD_FILE, tmp)))
            except (OSError, ValueError, mlflow.exceptions.MlflowException):
                record = {}
    if not isinstance(record, dict) or record.get("checkpoint_sha256") != found.tags.get("checkpoint_sha256"):
        record = {}
    return {**record, **found.tags}


def open_registry(uri: str) -> ModelRegistry:
    """The registry's calls at ``uri``, for reading it without an experiment. An sqlite store
    that does not exist is refused: opening it would create an empty one wherever the command
    happened to run."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:///file:"):
        db = Path(uri.removeprefix("sqlite:///").split("?")[0])
        if not db.is_file():
            raise RegistryError(
                f"there is no MLflow registry at {db}: run in the project directory, or set "
                "MLFLOW_TRACKING_URI to the registry's store"
            )
    return ModelRegistry(MlflowClient(tracking_uri=uri, registry_uri=uri))


def registered_model(client: ModelRegistry, name: str, where: str):
    """The registered model ``name`` in the registry at ``where`` (its URI, for the message), or
    one line: no such model, a name MLflow refuses, or a registry that cannot be read."""
    try:
        return client.get_registered_model(name)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            message = f"there is no registered model {name!r} in {where}"
        elif exc.error_code == "INVALID_PARAMETER_VALUE":
            message = f"{name!r} is not a registered model name ({first_line(exc)})"
        else:
            message = f"could not read registered model {name!r} from {where}: {first_line(exc)}"
        raise RegistryError(message) from exc


def registered_version(client: ModelRegistry, name: str, version: str, where: str):
    """Version ``version`` of ``name``, or one line naming what is wrong: no such model, a version
    that is not a number, or no such version (naming those there are). Every registry command
    takes its version through here, so they all answer the same input the same way."""
    registered_model(client, name, where)
    if not re.fullmatch(r"[0-9]+", str(version)):
        raise RegistryError(f"version {str(version)!r} of {name} is not a version number (1, 2, ...)")
    try:
        return client.get_model_version(name, str(int(version)))
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(f"could not read {name} v{version} from {where}: {first_line(exc)}") from exc
        there = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
        shown = ", ".join(map(str, there[:SHOWN_VERSIONS])) + (", ..." if len(there) > SHOWN_VERSIONS else "")
        raise RegistryError(f"{name} has no version {int(version)} (it has {shown or 'none'})") from exc


def describe_registered_model(
    client: ModelRegistry, name: str, description: str, tags: dict[str, str]
) -> None:
    """The registered model's own page: what it classifies and how its versions are chosen."""
    client.update_registered_model(name, description=description)
    for key, value in tags.items():
        client.set_registered_model_tag(name, key, str(value))


def version_by_alias(tracker: Tracker, name: str, alias: str):
    """The model version ``alias`` points at, or None when the model or alias does not exist."""
    try:
        return tracker.registry.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def load_version(
    tracker: Tracker, name: str, version: str, sha256: str | None = None
) -> mlflow.pyfunc.PyFuncModel:
    """Download a version and load it; with ``sha256`` (the registry's record), the
    downloaded checkpoint itself must have that hash (``CheckpointError`` otherwise), whatever
    its tags or the files beside it say."""
    with _tracking(tracker.uri), tempfile.TemporaryDirectory(prefix="shrinkflow-version-") as tmp:
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=tmp))
        if sha256 is not None:
            checkpoint = downloaded_checkpoint(local)
            if (actual := sha256_file(checkpoint)) != sha256:
                raise CheckpointError(
                    f"the checkpoint of {name} v{version} has sha256 {actual[:12]}..., but the "
                    f"registry recorded {sha256[:12]}... (swapped or damaged in the artefact store)"
                )
        return mlflow.pyfunc.load_model(str(local))  # loads the checkpoint into memory


def download_version(tracker: Tracker, name: str, version: str, into: Path) -> Path:
    """A registered version's files (``MLmodel``, ``artifacts/``, ``code/``) under ``into``."""
    with _tracking(tracker.uri):
        return Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=str(into)))


def set_alias(tracker: Tracker, name: str, alias: str, version: str) -> None:
    tracker.registry.set_registered_model_alias(name, alias, version)


def downloaded_checkpoint(model_dir: Path) -> Path:
    """The checkpoint file inside a downloaded pyfunc model directory."""
    flavor = mlflow.models.Model.load(str(model_dir)).flavors.get("python_function", {})
    relative = flavor.get("artifacts", {}).get("checkpoint", {}).get("path")
    if not relative:
        raise CheckpointError(f"{model_dir} is not a shrinkflow model (no checkpoint artefact)")
    return model_dir / relative


def predicted_classes(
    model: mlflow.pyfunc.PyFuncModel, images: np.ndarray, normalised: np.ndarray, classes: list[str]
) -> np.ndarray:
    """A registered version's predicted class indices for ``images`` (uint8, as stored). Versions
    registered before models took raw images take the ``normalised`` floats and return
    probabilities."""
    inputs = model.metadata.get_input_schema()
    if inputs is not None and inputs.inputs[0].type == np.dtype(np.uint8):
        labels = model.predict(images)["label"]
        return np.array([classes.index(label) for label in labels])
    return np.asarray(model.predict(normalised)).argmax(1)


def serving_signature(classes: list[str]) -> ModelSignature:
    """uint8 images of any batch, layout and size in; the class name and its probabilities out."""
    probabilities = [ColSpec("double", column) for column in probability_columns(classes)]
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, -1))]),
        outputs=Schema([ColSpec("string", "label"), *probabilities]),
    )


_URI_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@contextlib.contextmanager
def _tracking(uri: str) -> Iterator[None]:
    """Point the fluent API at ``uri`` for a block (``log_model`` and ``load_model`` need it).

    MLflow's setters also write ``MLFLOW_TRACKING_URI``/``MLFLOW_REGISTRY_URI`` into the
    environment, so restoring the URIs read before would pin the registry to the store of that
    moment for the rest of the process and its children (a later store's models then "not found").
    What is restored is the environment as it was, with no URI set in code."""
    saved = {key: os.environ.get(key) for key in _URI_ENV}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)  # unset: resolved from the environment again
        mlflow.set_registry_uri(None)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
