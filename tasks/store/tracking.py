"""MLflow at the edges: runs, metrics, artefacts and the dataset input (the model registry is
:mod:`shrinkflow.tasks.store.registry`), and which process owns a run.

Everything goes through an explicit :class:`mlflow.MlflowClient` and run ids rather than the
fluent API's thread-local "active run", so candidates logging from parallel threads or worker
processes never cross wires. The client is the :class:`Tracker`'s own: the run calls are its
methods, the registry's calls its :class:`ModelRegistry`, and what a record becomes in MLflow
(:func:`log_record`, :func:`log_candidates`, :func:`log_dataset`) plain functions over it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import socket
import sqlite3
import subprocess
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import psutil
from mlflow import MlflowClient
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag

from shrinkflow.tasks.errors import ShrinkflowError, first_line, named_first_line
from shrinkflow.tasks.escape import markdown_text
from shrinkflow.tasks.records import Manifest, ModelRecord

log = logging.getLogger(__name__)


class TrackingUnavailable(ShrinkflowError, RuntimeError):
    """The MLflow tracking server cannot be reached (after MLflow's own retries)."""


def _answering(method):
    """A write (a :class:`Tracker` method, or a function whose first argument is the tracker) the
    tracking store stops answering mid-run (the server died, the network went, the
    database's disk filled) fails as one line naming the store and the call, not as MLflow's
    traceback; errors of ours (a value MLflow refuses) keep theirs."""

    @functools.wraps(method)
    def call(self: Tracker, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except TrackingUnavailable:
            raise
        except Exception as exc:
            if (lost := _lost(exc)) is None:
                raise
            raise TrackingUnavailable(
                f"MLflow tracking at {self.uri} stopped answering ({lost}); files already written stay, "
                "re-run once it answers"
            ) from exc

    return call


def _lost(exc: BaseException) -> str | None:
    """What a failure says about the store being gone (``None``: not that kind of failure)."""
    text = str(exc)
    if isinstance(exc, mlflow.exceptions.MlflowException) and text.startswith("API request to "):
        call = re.search(r"/api/[\d.]+/mlflow/(\S+?) failed", text)
        why = re.search(r"\[Errno \d+\] [^\"')]+|[Rr]ead timed out|\d{3} Server Error[^\n]*", text)
        return f"{call.group(1) if call else 'a request'}: {why.group(0) if why else first_line(exc, 120)}"
    while exc.__cause__ is not None:  # MLflow wraps the database's own error
        exc = exc.__cause__
    if isinstance(exc, sqlite3.OperationalError | OSError):
        return named_first_line(exc, 150)
    return None


PROJECT_ROOT = Path(__file__).resolve().parents[2]


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


# MLflow 3's UI opens an experiment without this tag in its GenAI (traces) view; this is the kind
# it shows with runs, metrics and models.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


class ModelRegistry:
    """The model registry's calls shrinkflow makes, in one place: registered models, their
    versions, aliases, tags and descriptions. The names are ``MlflowClient``'s own, so the
    registry's functions (:mod:`~shrinkflow.tasks.store.registry`, the registry lock) take this or
    a plain client alike."""

    def __init__(self, client: MlflowClient) -> None:
        self._client = client

    def create_registered_model(self, name: str, tags: dict | None = None, description: str | None = None):
        return self._client.create_registered_model(name, tags=tags, description=description)

    def get_registered_model(self, name: str):
        return self._client.get_registered_model(name)

    def delete_registered_model(self, name: str) -> None:
        self._client.delete_registered_model(name)

    def update_registered_model(self, name: str, description: str) -> None:
        self._client.update_registered_model(name, description=description)

    def set_registered_model_tag(self, name: str, key: str, value: str) -> None:
        self._client.set_registered_model_tag(name, key, value)

    def set_registered_model_alias(self, name: str, alias: str, version: str) -> None:
        self._client.set_registered_model_alias(name, alias, version)

    def delete_registered_model_alias(self, name: str, alias: str) -> None:
        self._client.delete_registered_model_alias(name, alias)

    def create_model_version(self, **fields):
        return self._client.create_model_version(**fields)

    def get_model_version(self, name: str, version: str):
        return self._client.get_model_version(name, version)

    def get_model_version_by_alias(self, name: str, alias: str):
        return self._client.get_model_version_by_alias(name, alias)

    def search_model_versions(self, filter_string: str):
        return self._client.search_model_versions(filter_string)

    def set_model_version_tag(self, name: str, version: str, key: str, value: str) -> None:
        self._client.set_model_version_tag(name, version, key, value)

    def update_model_version(self, name: str, version: str, description: str) -> None:
        self._client.update_model_version(name, version, description=description)

    def download_artifacts(self, run_id: str, path: str, dst_path: str) -> str:
        """A file of the run a version was logged from (its record)."""
        return self._client.download_artifacts(run_id, path, dst_path)


class Tracker:
    """One experiment's runs through an explicit client: the connection, the run lifecycle and
    the writes; the registry's calls are :attr:`registry`. What a record becomes in MLflow is
    the plain functions below the class."""

    def __init__(self, uri: str, experiment: str, artifact_root: Path | None = None) -> None:
        self.uri = uri
        if artifact_root is None and uri.startswith("sqlite:///"):
            # Beside the database, not MLflow's default ./mlruns under whatever directory we run in.
            artifact_root = Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts"
        location = artifact_root.resolve().as_uri() if artifact_root and uri.startswith("sqlite") else None
        check_writable_store(uri)
        try:  # creating the client already opens (and migrates) an sqlite store
            self._connect()
            self.experiment_id = self._experiment(experiment, location)
        except Exception as exc:
            raise TrackingUnavailable(_unusable(uri, exc)) from None

    def _connect(self) -> None:
        self._client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        self.registry = ModelRegistry(self._client)

    def _experiment(self, name: str, location: str | None) -> str:
        for _ in range(3):  # another process may create it between our get and create
            if (found := self._client.get_experiment_by_name(name)) is not None:
                if found.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:  # made by an older shrinkflow
                    self._client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
                return found.experiment_id
            try:
                return self._client.create_experiment(
                    name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
                )
            except mlflow.exceptions.MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
        raise TrackingUnavailable(f"experiment {name!r} could not be created or found")

    # Process and Dask runners ship the tracker to other processes: send the address, not the client.
    def __getstate__(self) -> dict[str, str]:
        return {"uri": self.uri, "experiment_id": self.experiment_id}

    def __setstate__(self, state: dict[str, str]) -> None:
        self.uri, self.experiment_id = state["uri"], state["experiment_id"]
        self._connect()

    def check(self) -> None:
        """Fail fast, before any work, when the tracking server is unreachable."""
        try:
            self.experiment()
        except Exception as exc:
            first = first_line(exc)
            raise TrackingUnavailable(f"MLflow tracking at {self.uri} is unreachable: {first}") from None

    def experiment(self):
        return self._client.get_experiment(self.experiment_id)

    def identity(self) -> str:
        """The store and experiment runs go to, down to this copy of it (a store deleted and
        recreated at the same URI gets a new experiment creation time): a cached result's run ids
        are valid only where this is unchanged."""
        return f"{self.uri}#{self.experiment_id}@{self.experiment().creation_time}"

    @classmethod
    def for_project(cls, root: str | Path, experiment: str) -> Tracker:
        tracker = cls(tracking_uri(root), experiment, artifact_root=Path(root) / "mlartifacts")
        if not os.environ.get("MLFLOW_TRACKING_URI"):  # the project's own mlflow.db
            have = tracker.experiment().artifact_location
            want = (Path(root).resolve() / "mlartifacts").as_uri()
            if have != want and have.startswith("file:"):
                repair_artifact_location(tracker.uri, tracker.experiment_id, want)
                log.warning("MLflow artefacts of this project now go to %s (the store said %s)", want, have)
        return tracker

    # runs -------------------------------------------------------------------------------
    def start_run(self, name: str, parent_id: str | None = None, tags: dict[str, str] | None = None) -> str:
        tags = {PROCESS_TAG: this_process(), **(tags or {})}
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        try:
            return self._client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
        except Exception as exc:  # the first write a stage makes: a read-only store fails here
            raise TrackingUnavailable(_unusable(self.uri, exc)) from exc

    @_answering
    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self._client.set_terminated(run_id, status=status)

    def run(self, run_id: str):
        return self._client.get_run(run_id)

    def rename_run(self, run_id: str, name: str) -> None:
        self._client.update_run(run_id, name=name)

    def search_runs(self, filter_string: str, max_results: int = 5000) -> list:
        return self._client.search_runs(
            [self.experiment_id], filter_string=filter_string, max_results=max_results
        )

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        self._client.set_tag(run_id, key, value)

    @_answering
    def log(
        self,
        run_id: str,
        params: dict[str, Any] | None = None,
        metrics: dict[str, float] | None = None,
        tags: dict[str, Any] | None = None,
        steps: list[Metric] = (),
    ) -> None:
        """Params, metrics and tags by name, and ``steps`` (per-epoch metrics, their step set)."""
        for start in range(0, len(steps), 900):  # log_batch takes at most 1000 metrics
            self._client.log_batch(run_id, metrics=steps[start : start + 900])
        if params or metrics or tags or not steps:
            self._client.log_batch(
                run_id,
                metrics=[Metric(k, float(v), _now(), 0) for k, v in (metrics or {}).items() if _number(v)],
                params=[Param(k, str(v)) for k, v in (params or {}).items()],
                tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()],
            )

    @_answering
    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        self._client.log_artifact(run_id, str(path), artifact_path)

    def log_file(self, run_id: str, content: str | dict | pd.DataFrame, artifact_file: str) -> None:
        """Text, a dict (as JSON) or a table (MLflow's table format) as one file of the run."""
        if isinstance(content, pd.DataFrame):
            self._client.log_table(run_id, data=content, artifact_file=artifact_file)
        elif isinstance(content, dict):
            self._client.log_dict(run_id, content, artifact_file)
        else:
            self._client.log_text(run_id, content, artifact_file)

    def log_inputs(self, run_id: str, datasets: list[DatasetInput]) -> None:
        self._client.log_inputs(run_id, datasets=datasets)


# What a record becomes in MLflow ----------------------------------------------------------------


@_answering
def close_orphaned_runs(tracker: Tracker) -> list[str]:
    """Mark ``KILLED`` the runs still ``RUNNING`` whose process, on this machine, is gone (a
    killed run cannot end its own runs); returns their ids. Runs of live processes and of
    other machines are left alone."""
    closed = []
    for run in tracker.search_runs("attributes.status = 'RUNNING'"):
        owner = run.data.tags.get(PROCESS_TAG, "")
        if owner and process_gone(owner):
            reason = f"its process {owner} ended without finishing it; closed by {this_process()}"
            tracker.set_tag(run.info.run_id, KILLED_TAG, reason)
            tracker.end_run(run.info.run_id, status="KILLED")
            closed.append(run.info.run_id)
    return closed


@_answering
def log_record(tracker: Tracker, run_id: str, record: ModelRecord) -> None:
    """A trained model's options, per-epoch curves and summary."""
    params, summary, curves = record_entries(record)
    tags = {"shrinkflow.status": record.status, "shrinkflow.worker": record.worker}
    tracker.log(run_id, params=params, metrics=summary, tags=tags, steps=curves)
    if record.error:
        tracker.log(run_id, tags={"shrinkflow.error": record.error[:5000]})


@_answering
def log_candidates(tracker: Tracker, run_id: str, table: pd.DataFrame, runs: dict[str, str]) -> None:
    """The candidates table as an MLflow table and as Markdown linking each model's run."""
    # MLflow scans object columns for images; pandas 3 strings go as object, as it expects.
    text = [c for c in table.columns if pd.api.types.is_string_dtype(table[c]) and table[c].dtype != object]
    tracker.log_file(run_id, table.astype(dict.fromkeys(text, object)), "candidates_table.json")
    tracker.log_file(run_id, candidates_markdown(table, runs, tracker.experiment_id), "candidates.md")


@_answering
def log_dataset(tracker: Tracker, run_id: str, manifest: Manifest, train_x: np.ndarray, source: Path) -> None:
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
    tracker.log_inputs(run_id, [entity])


def record_entries(record: ModelRecord) -> tuple[dict[str, Any], dict[str, Any], list[Metric]]:
    """What MLflow keeps of a trained model's record: its params, its summary metrics and its
    per-epoch curves (the sparsity phase's too)."""
    params = {"strategy": record.strategy, **record.options, "epochs": record.epochs}
    params["precision"] = record.precision
    phase = record.sparsity_phase or {}
    curves = [
        Metric(f"{prefix}/{key}", float(row[key]), _now(), int(row["epoch"]))
        for prefix, history in (("epoch", record.history), ("sparsity_epoch", phase.get("history", [])))
        for row in history
        for key in ("train_loss", "val_acc", "lr")
    ]
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
    return params, summary, curves


def candidates_markdown(table: pd.DataFrame, runs: dict[str, str], experiment_id: str) -> str:
    """The candidates table in Markdown, each model linked to its MLflow run."""
    links = table[["name", "strategy", "status", "val_acc", "test_acc", "params"]].copy()
    links[["name", "strategy"]] = links[["name", "strategy"]].map(markdown_text)
    links["run"] = [
        f"[{runs[n][:8]}](#/experiments/{experiment_id}/runs/{runs[n]})" if n in runs else ""
        for n in links["name"]
    ]
    return links.to_markdown(index=False)


def repair_artifact_location(sqlite_uri: str, experiment_id: str, location: str) -> None:
    """A repair of MLflow's own schema, the one place shrinkflow writes it: point an
    experiment's artefacts at ``location``. MLflow stores the location as an absolute path and
    has no API to change it, so a copied (or moved) project's own ``mlflow.db`` would keep
    writing into the original's folder. Only runs created from now on follow; only the project's
    own sqlite store is ever repaired (never a server, nor a store named by
    ``MLFLOW_TRACKING_URI``). Written against MLflow 3's ``experiments`` table."""
    db = sqlite_uri.removeprefix("sqlite:///")
    with contextlib.closing(sqlite3.connect(db)) as con, con:
        con.execute(
            "UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?",
            (location, int(experiment_id)),
        )


def _number(value: Any) -> bool:
    """Whether ``value`` can be logged as a metric (MLflow refuses None and NaN)."""
    return value is not None and value == value


def _unusable(uri: str, exc: Exception) -> str:
    """One line for a tracking store that failed: a server is unreachable, a file store unusable."""
    while exc.__cause__ is not None:  # MLflow wraps the database's own, clearer, error
        exc = exc.__cause__
    first = first_line(exc)
    how = "is unreachable" if uri.startswith(("http:", "https:")) else "cannot be used"
    return f"MLflow tracking at {uri} {how}: {first}"


PROCESS_TAG = "shrinkflow.process"  # host:pid:start-time of the process that opened the run
KILLED_TAG = "shrinkflow.killed"


def _started(pid: int) -> str:
    """When the process started (seconds since the epoch), so a reused pid is told apart."""
    try:
        return f"{psutil.Process(pid).create_time():.2f}"
    except psutil.Error:
        return ""


def this_process() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{_started(os.getpid())}"


def process_gone(owner: str) -> bool:
    """Whether the process ``host:pid:start`` has ended; unknowable (False) for another host."""
    host, _, rest = owner.partition(":")
    pid, _, started = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    if not psutil.pid_exists(int(pid)):
        return True
    return bool(started) and _started(int(pid)) not in ("", started)


def _now() -> int:
    return int(time.time() * 1000)
