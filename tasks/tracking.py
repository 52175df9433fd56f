"""MLflow at the edges: runs, metrics, artefacts, the dataset input and the model registry.

Everything goes through an explicit :class:`mlflow.MlflowClient` and run ids rather than the
fluent API's thread-local "active run", so candidates logging from parallel threads or worker
processes never cross wires.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow import MlflowClient
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema, TensorSpec

from shrinkflow.models.arch.given import code_package
from shrinkflow.models.checkpoint import CheckpointError, load_checkpoint, sha256_file, user_factory
from shrinkflow.tasks.errors import ShrinkflowError
from shrinkflow.tasks.escape import markdown_text
from shrinkflow.tasks.export import ExportError, export_onnx, max_abs_diff, session
from shrinkflow.tasks.io import read_json
from shrinkflow.tasks.records import Manifest, ModelRecord
from shrinkflow.tasks.serving import probability_columns

log = logging.getLogger(__name__)

SERVING_CODE = Path(__file__).with_name("serving.py")
MODELS_PACKAGE = Path(__file__).resolve().parents[1] / "models"
CHECKSUM_FILE = "model.pt.sha256"


def serving_package(into: Path) -> Path:
    """``into/shrinkflow``: the package a registered model's code needs (``shrinkflow.models``),
    laid out as it is imported, for ``log_model(code_paths=...)``."""
    package = into / "shrinkflow"
    shutil.copytree(MODELS_PACKAGE, package / "models", ignore=shutil.ignore_patterns("__pycache__"))
    (package / "__init__.py").write_text('"""shrinkflow, as a registered model carries it."""\n')
    return package


def serving_code(into: Path, checkpoint: Path) -> list[str]:
    """What a registered model must carry to load anywhere: shrinkflow's ``models`` package and,
    for a network built by the user's own factory, the user's package (imported from there only)."""
    paths = [str(serving_package(into))]
    if factory := user_factory(checkpoint):
        paths.append(str(code_package(factory)))
    return paths


class TrackingUnavailable(ShrinkflowError, RuntimeError):
    """The MLflow tracking server cannot be reached (after MLflow's own retries)."""


PROJECT_ROOT = Path(__file__).resolve().parents[1]


# What a run itself rewrites: committed copies of these changing is not a change of code or params.
PIPELINE_OUTPUTS = ("reports", "dvc.lock", "dvc_plots", "data/prepared", "artifacts")


def code_version(root: str | Path = PROJECT_ROOT, outputs: tuple[str, ...] = PIPELINE_OUTPUTS) -> str:
    """The git commit of the code that runs, ``-dirty`` when code or params differ from it (the
    pipeline's own ``outputs`` do not count), or ``unknown`` outside git."""
    status = ["git", "status", "--porcelain", "--untracked-files=no", "--", "."]
    status += [f":(exclude){path}" for path in outputs]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(status, cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}-dirty" if dirty else head


def tracking_uri(root: str | Path) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else an sqlite database in the project root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def check_writable_store(uri: str) -> None:
    """Refuse, in one line and before MLflow opens it, an sqlite store that cannot be written:
    MLflow would otherwise fail deep inside its schema migration with a long traceback."""
    if not uri.startswith("sqlite:///") or uri.startswith("sqlite:///file:"):
        return  # a server, or an sqlite URI filename with its own options
    db = Path(uri.removeprefix("sqlite:///").split("?")[0]).resolve()  # sqlite:////abs or ///rel
    where = db.parent
    problem = None
    if not where.is_dir():
        problem = f"its directory {where} does not exist"
    elif db.exists() and not os.access(db, os.R_OK | os.W_OK):
        problem = "the file is read-only"
    elif not os.access(where, os.W_OK | os.X_OK):
        problem = f"its directory {where} is read-only (sqlite writes a journal beside it)"
    if problem:
        raise TrackingUnavailable(
            f"MLflow tracking store {db} cannot be written: {problem}; fix the permissions or point "
            "MLFLOW_TRACKING_URI elsewhere"
        )


class Tracker:
    def __init__(self, uri: str, experiment: str, artifact_root: Path | None = None) -> None:
        self.uri = uri
        location = artifact_root.resolve().as_uri() if artifact_root and uri.startswith("sqlite") else None
        check_writable_store(uri)
        try:  # creating the client already opens (and migrates) an sqlite store
            self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
            self.experiment_id = self._experiment(experiment, location)
        except Exception as exc:
            raise TrackingUnavailable(_unusable(uri, exc)) from None

    def _experiment(self, name: str, location: str | None) -> str:
        for _ in range(3):  # another process may create it between our get and create
            if (found := self.client.get_experiment_by_name(name)) is not None:
                return found.experiment_id
            try:
                return self.client.create_experiment(name, artifact_location=location)
            except mlflow.exceptions.MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
        raise TrackingUnavailable(f"experiment {name!r} could not be created or found")

    # Process and Dask runners ship the tracker to other processes: send the address, not the client.
    def __getstate__(self) -> dict[str, str]:
        return {"uri": self.uri, "experiment_id": self.experiment_id}

    def __setstate__(self, state: dict[str, str]) -> None:
        self.uri, self.experiment_id = state["uri"], state["experiment_id"]
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    def check(self) -> None:
        """Fail fast, before any work, when the tracking server is unreachable."""
        try:
            self.client.get_experiment(self.experiment_id)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise TrackingUnavailable(f"MLflow tracking at {self.uri} is unreachable: {first}") from None

    def identity(self) -> str:
        """The store and experiment runs go to, down to this copy of it (a store deleted and
        recreated at the same URI gets a new experiment creation time): a cached result's run ids
        are valid only where this is unchanged."""
        created = self.client.get_experiment(self.experiment_id).creation_time
        return f"{self.uri}#{self.experiment_id}@{created}"

    @classmethod
    def for_project(cls, root: str | Path, experiment: str) -> Tracker:
        tracker = cls(tracking_uri(root), experiment, artifact_root=Path(root) / "mlartifacts")
        if not os.environ.get("MLFLOW_TRACKING_URI"):  # the project's own mlflow.db
            tracker.follow_project(Path(root))
        return tracker

    def follow_project(self, root: Path) -> None:
        """Point the experiment's artefacts at ``<root>/mlartifacts`` when the project's own
        store names another directory: MLflow stores the location as an absolute path, so a
        copied (or moved) project would otherwise keep writing into the original's folder. Only
        runs created from now on follow; MLflow has no API for this, so the sqlite row is updated."""
        want = (root.resolve() / "mlartifacts").as_uri()
        have = self.client.get_experiment(self.experiment_id).artifact_location
        if have == want or not have.startswith("file:"):
            return
        db = self.uri.removeprefix("sqlite:///")
        with contextlib.closing(sqlite3.connect(db)) as con, con:
            con.execute(
                "UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?",
                (want, int(self.experiment_id)),
            )
        log.warning("MLflow artefacts of this project now go to %s (the store said %s)", want, have)

    # runs -------------------------------------------------------------------------------
    def start_run(self, name: str, parent_id: str | None = None, tags: dict[str, str] | None = None) -> str:
        tags = {PROCESS_TAG: this_process(), **(tags or {})}
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        try:
            return self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
        except Exception as exc:  # the first write a stage makes: a read-only store fails here
            raise TrackingUnavailable(_unusable(self.uri, exc)) from exc

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def close_orphaned_runs(self) -> list[str]:
        """Mark ``KILLED`` the runs still ``RUNNING`` whose process, on this machine, is gone (a
        killed run cannot end its own runs); returns their ids. Runs of live processes and of
        other machines are left alone."""
        running = self.client.search_runs(
            [self.experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=5000
        )
        closed = []
        for run in running:
            owner = run.data.tags.get(PROCESS_TAG, "")
            if owner and process_gone(owner):
                reason = f"its process {owner} ended without finishing it; closed by {this_process()}"
                self.client.set_tag(run.info.run_id, KILLED_TAG, reason)
                self.client.set_terminated(run.info.run_id, status="KILLED")
                closed.append(run.info.run_id)
        return closed

    def log(
        self,
        run_id: str,
        params: dict[str, Any] | None = None,
        metrics: dict[str, float] | None = None,
        tags: dict[str, Any] | None = None,
    ) -> None:
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), _now(), 0) for k, v in (metrics or {}).items() if _number(v)],
            params=[Param(k, str(v)) for k, v in (params or {}).items()],
            tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()],
        )

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_record(self, run_id: str, record: ModelRecord) -> None:
        """A trained model's options, per-epoch curves and summary."""
        params = {"strategy": record.strategy, **record.options, "epochs": record.epochs}
        params["precision"] = record.precision
        phase = record.sparsity_phase or {}
        curves = [
            Metric(f"{prefix}/{key}", float(row[key]), _now(), int(row["epoch"]))
            for prefix, history in (("epoch", record.history), ("sparsity_epoch", phase.get("history", [])))
            for row in history
            for key in ("train_loss", "val_acc", "lr")
        ]
        for start in range(0, len(curves), 900):  # log_batch takes at most 1000 metrics
            self.client.log_batch(run_id, metrics=curves[start : start + 900])
        summary = {
            k: v for k, v in asdict(record).items() if k in ("best_epoch", "best_val_acc", "train_seconds")
        }
        if phase:
            params |= {"sparsity_phase.epochs": phase["epochs"], "sparsity_phase.strength": phase["strength"]}
            summary |= {
                f"sparsity_phase.{k}": phase[k]
                for k in ("small_bn_scales_before", "small_bn_scales_after", "val_acc_after", "seconds")
            }
        for r in record.rounds:
            summary |= {f"round{r['round']}.ratio": r["ratio"], f"round{r['round']}.val_acc": r["val_acc"]}
        params |= {f"origin.{k}": v for k, v in record.origin.items()}  # a brought baseline's lineage
        if record.pruning:
            params |= {"pruning.groups": record.pruning["groups"]}
            params |= {"pruning.left_alone": ", ".join(record.pruning["left_alone"])[:500]}
        self.log(
            run_id,
            params=params,
            metrics=summary,
            tags={"shrinkflow.status": record.status, "shrinkflow.worker": record.worker},
        )
        if record.error:
            self.log(run_id, tags={"shrinkflow.error": record.error[:5000]})

    def log_candidates(self, run_id: str, table: pd.DataFrame, runs: dict[str, str]) -> None:
        """The candidates table as an MLflow table and as Markdown linking each model's run."""
        # MLflow scans object columns for images; pandas 3 strings go as object, as it expects.
        text = [
            c for c in table.columns if pd.api.types.is_string_dtype(table[c]) and table[c].dtype != object
        ]
        self.client.log_table(
            run_id, data=table.astype(dict.fromkeys(text, object)), artifact_file="candidates_table.json"
        )
        links = table[["name", "strategy", "status", "val_acc", "test_acc", "params"]].copy()
        links[["name", "strategy"]] = links[["name", "strategy"]].map(markdown_text)
        links["run"] = [
            f"[{runs[n][:8]}](#/experiments/{self.experiment_id}/runs/{runs[n]})" if n in runs else ""
            for n in links["name"]
        ]
        self.client.log_text(run_id, links.to_markdown(index=False), "candidates.md")

    def log_dataset(self, run_id: str, manifest: Manifest, train_x: np.ndarray, source: Path) -> None:
        """Record the prepared data as the run's dataset input, named by its fingerprint."""
        with warnings.catch_warnings():  # MLflow registers two identical resolvers for local paths
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_numpy(
                train_x,
                source=str(source),
                name=f"{manifest.source}-{manifest.fingerprint[:12]}",
                digest=manifest.fingerprint[:36],
            )
        entity = DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "train")])
        self.client.log_inputs(run_id, datasets=[entity])

    # registry ---------------------------------------------------------------------------
    def register_model(
        self,
        run_id: str,
        checkpoint: Path,
        name: str,
        manifest: Path,
        example: torch.Tensor,
        raw_example: np.ndarray,
        tags: dict[str, Any],
        description: str,
    ) -> str:
        """Log ``checkpoint`` as a pyfunc model that takes raw images, with the ``manifest`` that
        prepares them and its ONNX export, in ``run_id``; register it; return the version.
        ``example`` is normalised images as the pipeline feeds models (the ONNX parity check runs
        on them); ``raw_example`` is the same images as stored uint8 pixels (the input example)."""
        classes = read_json(manifest)["classes"]
        with tempfile.TemporaryDirectory(prefix="shrinkflow-register-") as tmp:
            recorded = Path(tmp) / CHECKSUM_FILE  # checked by the served model before it loads
            recorded.write_text(sha256_file(checkpoint) + "\n")
            artifacts = {
                "checkpoint": str(checkpoint),
                "checkpoint_sha256": str(recorded),
                "manifest": str(manifest),
            }
            onnx = _exported_onnx(checkpoint, example, Path(tmp) / "model.onnx")
            if isinstance(onnx, Path):
                artifacts["onnx"] = str(onnx)
            with _tracking(self.uri), mlflow.start_run(run_id=run_id):
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
        version = self.client.create_model_version(
            name=self._ensure_registered(name),
            source=info.model_uri,
            run_id=run_id,
            tags={k: str(v) for k, v in tags.items()},
            description=description,
            model_id=info.model_id,
        )
        return version.version

    def _ensure_registered(self, name: str) -> str:
        try:
            self.client.create_registered_model(name)
        except mlflow.exceptions.MlflowException as exc:  # a concurrent run may have created it
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        return name

    def version_by_alias(self, name: str, alias: str):
        """The model version ``alias`` points at, or None when the model or alias does not exist."""
        try:
            return self.client.get_model_version_by_alias(name, alias)
        except mlflow.exceptions.MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise

    def load_version(self, name: str, version: str, sha256: str | None = None) -> mlflow.pyfunc.PyFuncModel:
        """Download a version and load it; with ``sha256`` (the registry's record), the
        downloaded checkpoint itself must have that hash (``CheckpointError`` otherwise), whatever
        its tags or the files beside it say."""
        with _tracking(self.uri), tempfile.TemporaryDirectory(prefix="shrinkflow-version-") as tmp:
            local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=tmp))
            if sha256 is not None:
                checkpoint = downloaded_checkpoint(local)
                if (actual := sha256_file(checkpoint)) != sha256:
                    raise CheckpointError(
                        f"the checkpoint of {name} v{version} has sha256 {actual[:12]}..., but the "
                        f"registry recorded {sha256[:12]}... (swapped or damaged in the artefact store)"
                    )
            return mlflow.pyfunc.load_model(str(local))  # loads the checkpoint into memory

    def download_version(self, name: str, version: str, into: Path) -> Path:
        """A registered version's files (``MLmodel``, ``artifacts/``, ``code/``) under ``into``."""
        with _tracking(self.uri):
            return Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=str(into)))

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(name, alias, version)


def downloaded_checkpoint(model_dir: Path) -> Path:
    """The checkpoint file inside a downloaded pyfunc model directory."""
    flavor = mlflow.models.Model.load(str(model_dir)).flavors.get("python_function", {})
    relative = flavor.get("artifacts", {}).get("checkpoint", {}).get("path")
    if not relative:
        raise CheckpointError(f"{model_dir} is not a shrinkflow model (no checkpoint artefact)")
    return model_dir / relative


def _number(value: Any) -> bool:
    """Whether ``value`` can be logged as a metric (MLflow refuses None and NaN)."""
    return value is not None and value == value


def _unusable(uri: str, exc: Exception) -> str:
    """One line for a tracking store that failed: a server is unreachable, a file store unusable."""
    while exc.__cause__ is not None:  # MLflow wraps the database's own, clearer, error
        exc = exc.__cause__
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    how = "is unreachable" if uri.startswith(("http:", "https:")) else "cannot be used"
    return f"MLflow tracking at {uri} {how}: {first}"


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


def _exported_onnx(checkpoint: Path, example: torch.Tensor, path: Path) -> Path | str:
    """The checkpoint as ONNX checked against PyTorch, or why there is none."""
    model = load_checkpoint(checkpoint)[0].eval()
    try:
        export_onnx(model, example, path)
        max_abs_diff(model, session(path), example)
    except ExportError as exc:
        log.info("registering without ONNX: %s", exc)
        return f"unavailable: {exc}"[:250]
    return path


PROCESS_TAG = "shrinkflow.process"  # host:pid:start-time of the process that opened the run
KILLED_TAG = "shrinkflow.killed"


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), so a reused pid is told apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def this_process() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{_start_time(os.getpid())}"


def process_gone(owner: str) -> bool:
    """Whether the process ``host:pid:start`` has ended; unknowable (False) for another host."""
    host, _, rest = owner.partition(":")
    pid, _, started = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return bool(started) and _start_time(int(pid)) != started


def _now() -> int:
    return int(time.time() * 1000)


@contextlib.contextmanager
def _tracking(uri: str) -> Iterator[None]:
    """Point the fluent API at ``uri`` for a block (``log_model`` and ``load_model`` need it)."""
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])
