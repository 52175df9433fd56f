"""Shared fixtures. Tracking state never touches the developer's files: MLflow and Prefect
point at a per-session temporary directory before either is imported."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd
import psutil
import pytest
import yaml

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="shrinkflow-tests-"))
os.environ["PREFECT_HOME"] = str(_SESSION_DIR / "prefect")
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_SESSION_DIR / 'mlflow.db'}"
os.environ.pop("PREFECT_API_URL", None)
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

from shrinkflow.tasks.config import apply_override, parse_params  # noqa: E402
from shrinkflow.tasks.layout import Layout  # noqa: E402

# A few epochs and two candidates (no ladder rung): enough for real training, small enough for CI.
SMALL = (
    "train.epochs=6",
    "shrink.epochs=4",
    "shrink.candidates={w50: {strategy: width, ratio: 0.5},"
    " l1-50: {strategy: prune_l1, ratio: 0.5, lr: 0.01}}",
    "shrink.ladder.rungs={}",
    "evaluate.latency_repeats=5",
    "evaluate.latency_warmup=1",
)


def small_raw(*extra: str) -> dict:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for item in (*SMALL, *extra):
        raw = apply_override(raw, item)
    return raw


def write_params(root: Path, *overrides: str, raw: dict | None = None) -> Path:
    """``root/params.yaml``: the small params with ``overrides`` (or ``raw`` as given)."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(raw if raw is not None else small_raw(*overrides), sort_keys=False))
    return path


@pytest.fixture
def small_params():
    return parse_params(small_raw())


@pytest.fixture
def project(tmp_path):
    """A temporary project root with the small params written to params.yaml."""
    write_params(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """prepare + baseline on the small params, done once and copied by the tests that need it."""
    from shrinkflow.tasks.data.prepare import prepare
    from shrinkflow.tasks.training.train import train_baseline

    root = tmp_path_factory.mktemp("trained")
    params = parse_params(small_raw())
    layout = Layout.from_params(params, root)
    prepare(params, layout)
    train_baseline(params, layout)
    return root


@pytest.fixture
def trained_layout(trained, tmp_path) -> Layout:
    """A private copy of the trained project (prepared data and baseline)."""
    return copy_project(trained, tmp_path)[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until ``url`` answers 200, failing early if the server process dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def stop(proc: subprocess.Popen, grace: float = 5) -> None:
    """Stop a server and every process it started: SIGTERM, then after ``grace`` seconds SIGKILL
    for what is left (``mlflow server`` alone can take 20 s to pass SIGTERM on to uvicorn)."""
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    proc.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    for each in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            each.kill()
    proc.wait()


@contextlib.contextmanager
def mlflow_server_at(root: Path, workers: int = 1) -> Iterator[str]:
    """A real ``mlflow server`` on a free port of 127.0.0.1, with its own sqlite store in ``root``
    and artefacts proxied into ``root/art``; yields its URL and stops it afterwards."""
    with mlflow_server_process(root, workers) as (url, _):
        yield url


@contextlib.contextmanager
def mlflow_server_process(root: Path, workers: int = 1) -> Iterator[tuple[str, subprocess.Popen]]:
    """:func:`mlflow_server_at`, with the server's process for a test that stops it early."""
    port = free_port()
    cmd = [
        str(BIN / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]
    cmd += [
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "art"),
    ]
    with (root / "server.log").open("w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", proc)
        yield url, proc
    finally:
        stop(proc)


def gate_refuses_all(layout: Layout) -> None:
    """Every candidate fails the gate (its gate predictions are all wrong), so a promotion from
    ``layout`` has the (big) baseline as its winner."""
    predictions = pd.read_csv(layout.predictions_csv)
    gate = predictions["split"] == "gate"
    for name in predictions.columns.drop(["split", "index", "label", "baseline"]):
        predictions.loc[gate, name] = (predictions.loc[gate, "label"] + 1) % 10
    predictions.to_csv(layout.predictions_csv, index=False)


def run_cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "shrinkflow"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", **(env or {})},
        timeout=600,
    )


@pytest.fixture(scope="session")
def prefect_server():
    """One ephemeral Prefect API for the whole session (it takes ~10 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def evaluated(trained, tmp_path_factory):
    """The small pipeline run up to and including evaluate (baseline, w50, l1-50), once."""
    from shrinkflow.tasks.measurement.evaluate import evaluate_models
    from shrinkflow.tasks.training.train import shrink_candidate

    params, layout = copy_project(trained, tmp_path_factory.mktemp("evaluated"))
    for name in params.shrink.candidates:
        shrink_candidate(params, layout, name)
    evaluate_models(params, layout)
    return layout.root


def copy_project(src: Path, dst: Path, *overrides: str):
    """A private copy of a prepared project, with its own params; returns (params, layout)."""
    for sub in ("data", "artifacts", "reports"):
        if (src / sub).exists():
            shutil.copytree(src / sub, dst / sub)
    params = parse_params(yaml.safe_load(write_params(dst, *overrides).read_text()))
    return params, Layout.from_params(params, dst)


# Helpers several test files share ------------------------------------------------------------


def promote_copy(evaluated: Path, root: Path, name: str, *overrides: str, force=False, tamper=None):
    """Run the promote stage in a copy of the evaluated project at ``root``, registering as
    ``name`` in the session's registry (``tamper`` edits the copy's layout first)."""
    from shrinkflow.tasks.pipeline.stages import Context, run_promote
    from shrinkflow.tasks.store.tracking import Tracker, tracking_uri

    params, layout = copy_project(evaluated, root, f"promote.model_name={name}", *overrides)
    if tamper:
        tamper(layout)
    ctx = Context(params, layout, Tracker(tracking_uri(root), params.tracking.experiment))
    return run_promote(ctx, force=force)


def aliases(name: str, client=None) -> dict[str, int]:
    """The registered model's aliases (alias -> version number); none when there is no such
    model. ``client``: another registry than the session's."""
    from mlflow import MlflowClient

    client = client or MlflowClient()
    if not client.search_registered_models(f"name='{name}'"):
        return {}
    return {alias: int(v) for alias, v in client.get_registered_model(name).aliases.items()}


def stored_checkpoint(name: str, version: str, client=None, artifacts: Path | None = None) -> Path:
    """The version's model.pt as it lies in the artefact store: the session's own, or the folder
    ``artifacts`` of a server whose ``client`` is given."""
    from mlflow import MlflowClient

    client = client or MlflowClient()
    model_id = client.get_model_version(name, version).source.removeprefix("models:/")
    if artifacts is None:
        logged = client.get_logged_model(model_id)
        (found,) = Path(urlparse(logged.artifact_location).path).rglob("model.pt")
    else:
        (found,) = (p for p in artifacts.rglob("model.pt") if model_id in p.parts)
    return found


@pytest.fixture
def model_name(request) -> str:
    """A registered model name of the test's own: its file's name and a random suffix."""
    return f"{request.module.__name__.rpartition('.')[2].removeprefix('test_')}-{uuid.uuid4().hex[:8]}"


def batch(n: int = 16, channels: int = 1, size: int = 8, seed: int = 0, mean: float = 0, std: float = 1):
    """A seeded batch: ``n`` random images (``channels`` x ``size`` x ``size``, normal with
    ``mean`` and ``std``) and their labels among 10 classes."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, size, size, generator=g)
    if (mean, std) != (0, 1):
        x = mean + std * x
    return x, torch.randint(0, 10, (n,), generator=g)


@pytest.fixture
def one_thread():
    """One torch thread for the test: on a loaded two-core machine (two xdist workers) two
    threads made these networks' training steps ten to twenty times slower, not faster."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_network(arch: str):
    """A seeded 8x8 one-channel ``basenet`` (BatchNorm on, 16/32 channels, 48 hidden) or
    ``resnet56`` (one block a stage) in eval mode: what the allocation tests count and measure."""
    import torch

    from shrinkflow.models import build_model

    torch.manual_seed(0)
    spec = {"arch": arch, "in_channels": 1, "image_size": 8, "num_classes": 10}
    spec |= (
        {"channels": [16, 32], "hidden": [48], "batch_norm": True}
        if arch == "basenet"
        else {"blocks": [1, 1, 1]}
    )
    return build_model(spec).eval()
