"""The shrink fan-out on other engines: Prefect's process pool and real Dask clusters on
127.0.0.1. Every engine must give the candidates table of the thread runner."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from shrinkflow.tasks.config import parse_params
from shrinkflow.tasks.layout import Layout
from shrinkflow.tasks.measurement.evaluate import MACHINE_COLUMNS, load_table
from shrinkflow.tasks.records import load_record
from tests.conftest import BIN, free_port, small_raw, write_params

pytestmark = [pytest.mark.slow, pytest.mark.scenario]


def _run(root, *overrides):
    from shrinkflow.flows.pipeline import run

    root.mkdir(parents=True, exist_ok=True)
    # Fewer epochs than the suite's small params: the runners must agree, not the models excel.
    raw = small_raw(
        "promote.model_name=scale", "shrink.workers=2", "train.epochs=3", "shrink.epochs=2", *overrides
    )
    write_params(root, raw=raw)
    run(root / "params.yaml", root=root)
    table = load_table(root / "reports/candidates.csv").drop(columns=list(MACHINE_COLUMNS))
    layout = Layout.from_params(parse_params(raw), root)
    workers = {name: load_record(layout, name).worker for name in raw["shrink"]["candidates"]}
    return table, workers


@pytest.fixture(scope="module")
def thread_reference(tmp_path_factory, prefect_server):
    table, workers = _run(tmp_path_factory.mktemp("thread"), "shrink.runner=thread")
    assert {w.split(":")[1] for w in workers.values()} == {str(os.getpid())}  # threads of this process
    return table


def _pids(workers: dict[str, str]) -> set[int]:
    return {int(w.rsplit(":", 1)[1]) for w in workers.values()}


def test_process_pool_runner_matches_the_thread_runner(tmp_path, thread_reference):
    table, workers = _run(tmp_path, "shrink.runner=process")
    assert os.getpid() not in _pids(workers)
    assert table.equals(thread_reference)


def test_without_an_address_the_flow_starts_its_own_dask_cluster(tmp_path, thread_reference):
    """``shrink.dask_address: null``: prefect-dask starts a local cluster of ``workers`` processes
    for the fan-out and closes it after the flow."""
    table, workers = _run(tmp_path, "shrink.runner=dask", "shrink.dask_address=null")
    assert os.getpid() not in _pids(workers), "the candidates ran in the cluster's worker processes"
    assert table.equals(thread_reference)


def test_dask_scheduler_and_workers_started_from_the_command_line(tmp_path, thread_reference):
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    log = (tmp_path / "dask.log").open("w")
    scheduler = subprocess.Popen(
        [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    workers = [
        subprocess.Popen(
            [
                str(BIN / "dask"),
                "worker",
                address,
                "--nthreads",
                "1",
                "--host",
                "127.0.0.1",
                "--no-dashboard",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        for _ in range(2)
    ]
    try:
        from distributed import Client

        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
            worker_pids = set(client.run(os.getpid).values())
        table, ran_on = _run(tmp_path / "run", "shrink.runner=dask", f"shrink.dask_address={address}")
    finally:
        for proc in [*workers, scheduler]:
            proc.terminate()
        for proc in [*workers, scheduler]:
            proc.wait(timeout=30)
        time.sleep(0.1)
    assert _pids(ran_on) <= worker_pids and len(worker_pids) == 2
    assert table.equals(thread_reference)
