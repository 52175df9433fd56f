"""Against real servers on 127.0.0.1: `mlflow server` (sqlite backend, over HTTP) and
`prefect server start` with the flow served as a scheduled deployment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import BIN, free_port, mlflow_server_at, stop, wait_http, write_params

pytestmark = [pytest.mark.slow, pytest.mark.scenario]


def _log(path: Path):
    return path.open("w")  # noqa: SIM115 - handed to a server process that outlives this frame


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    with mlflow_server_at(tmp_path_factory.mktemp("mlflow-server")) as url:
        yield url


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
    }
    env.pop("PREFECT_API_URL", None)
    cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=_log(home / "server.log"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_http(f"{url}/health", proc)
        yield url
    finally:
        stop(proc)


def _project(root: Path, *overrides: str) -> Path:

    root.mkdir(parents=True, exist_ok=True)
    write_params(root, *overrides)
    return root / "params.yaml"


def _cli(*args: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "shrinkflow"), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600
    )


TRIGGER = """
import asyncio, json, sys
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment

async def wait_for_deployment():
    async with get_client() as client:
        for _ in range(240):
            try:
                return await client.read_deployment_by_name("shrinkflow/weekly")
            except Exception:
                await asyncio.sleep(0.5)
    sys.exit("deployment never appeared")

deployment = asyncio.run(wait_for_deployment())
print("schedule", json.dumps([s.schedule.cron for s in deployment.schedules]))
for overrides in json.loads(sys.argv[1]):
    run = run_deployment("shrinkflow/weekly", parameters={"overrides": overrides}, timeout=600)
    print("run", run.state.type.value, run.id)
"""


def test_scheduled_retraining_twice_against_real_servers(prefect_api, mlflow_server, tmp_path):
    """`shrinkflow serve` registers a cron deployment; two runs triggered through the Prefect
    server track to a real MLflow server over HTTP. The first winner (a small candidate) becomes
    champion; the second run's winner (the bigger baseline: tolerance 0 leaves w50 short of it)
    only challenger."""
    only_w50 = "shrink.candidates={w50: {strategy: width, ratio: 0.5}}"
    # The small run's w50 loses tens of points on one class: only without the guard is it certified.
    guard_off = "promote.max_class_drop=null"
    params = _project(tmp_path, "promote.model_name=served", "shrink.workers=1", only_w50, guard_off)
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "MLFLOW_TRACKING_URI": mlflow_server}
    serve = subprocess.Popen(
        [
            str(BIN / "shrinkflow"),
            "serve",
            "--cron",
            "0 3 * * 0",
            "--name",
            "weekly",
            "-p",
            str(params),
            "--root",
            str(tmp_path),
        ],
        env=env,
        cwd=tmp_path,
        stdout=_log(tmp_path / "serve.log"),
        stderr=subprocess.STDOUT,
    )
    runs = json.dumps([["promote.tolerance=50"], ["promote.tolerance=0"]])
    try:
        out = subprocess.run(
            [sys.executable, "-c", TRIGGER, runs],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=900,
        )
    finally:
        stop(serve)
    log = (tmp_path / "serve.log").read_text()[-4000:]
    assert out.returncode == 0, out.stderr[-3000:] + log
    assert 'schedule ["0 3 * * 0"]' in out.stdout
    finished = [line.split() for line in out.stdout.splitlines() if line.startswith("run ")]
    assert [state for _, state, _ in finished] == ["COMPLETED", "COMPLETED"], log

    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    versions = {int(v.version): v for v in client.search_model_versions("name='served'")}
    assert sorted(versions) == [1, 2]
    aliases = {k: int(v) for k, v in client.get_registered_model("served").aliases.items()}
    assert aliases == {"champion": 1, "challenger": 2}
    assert versions[1].tags["prefect_flow_run_id"] == finished[0][2]
    assert versions[2].tags["prefect_flow_run_id"] == finished[1][2]
    assert versions[1].tags["candidate"] != "baseline" and versions[2].tags["candidate"] == "baseline"
    assert "not better than champion v1" in versions[2].description
    assert not (tmp_path / "mlflow.db").exists(), "everything was tracked on the server"
