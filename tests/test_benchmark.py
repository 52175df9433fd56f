"""The compression benchmark's quick mode runs end to end and writes its tables (what it measures
is reported, never asserted: timings depend on the machine)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from benchmarks.compress import makespan, pareto_front
from tests.conftest import REPO

CONTENDER_COLUMNS = [
    "model",
    "how",
    "test acc %",
    "95% interval",
    "drop (pts)",
    "params",
    "params /",
    "FLOPs",
    "FLOPs /",
    "size (KB)",
    "size /",
    "latency b1 (ms)",
    "latency /",
    "throughput b64 (img/s)",
    "throughput x",
]
CONTENDERS = [
    "baseline",
    "seed: AdjustedNet",
    "torch-pruning 0.5",
    "torch-pruning same FLOPs",
    "torch-pruning uniform, same params",
    "torch-pruning global, same params",
    "shrinkflow (latency_ms): ",
    "shrinkflow (params): ",
]
EFFICIENCY = [
    "orchestration overhead",
    "fan-out scaling, 2 single-thread workers vs 1, thread runner",
    "fan-out scaling, 2 single-thread workers vs 1, process runner",
    "fan-out scaling, 2 single-thread workers vs 1, dask runner",
    "training throughput, engine.fit / bare loop at the same precision",
    "`dvc repro`, nothing changed",
]


def test_pareto_front_keeps_only_the_undominated_points():
    points = [(1.0, 80.0), (2.0, 85.0), (2.5, 84.0), (3.0, 90.0), (0.5, 70.0), (1.5, 79.0)]
    assert pareto_front(points) == [(0.5, 70.0), (1.0, 80.0), (2.0, 85.0), (3.0, 90.0)]


def test_makespan_is_a_thread_pool_schedule():
    assert makespan([3.0, 1.0, 1.0, 1.0], 2) == 3.0
    assert makespan([2.0, 2.0, 2.0], 1) == 6.0
    assert makespan([], 2) == 0.0


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


@pytest.mark.slow
@pytest.mark.scenario
def test_quick_benchmark_writes_every_column_row_and_target(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.compress", "--quick", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    (md,) = tmp_path.glob("*.md")
    (raw,) = tmp_path.glob("*.json")
    lines = md.read_text().splitlines()
    assert lines[0].startswith("# Compression benchmark: quick-digits")
    assert any(line.startswith("Machine: ") and "torch" in line for line in lines)
    header = next(i for i, line in enumerate(lines) if line.startswith("| model |"))
    assert _cells(lines[header]) == CONTENDER_COLUMNS
    rows = [_cells(line) for line in lines[header + 2 : header + 2 + len(CONTENDERS)]]
    assert [row[0] for row in rows][:6] == CONTENDERS[:6]
    assert all(row[0].startswith(prefix) for row, prefix in zip(rows, CONTENDERS, strict=True))
    assert all(len(row) == len(CONTENDER_COLUMNS) for row in rows)
    assert rows[0][6] == "1.00x"  # the baseline against itself
    low, high = (float(v) for v in rows[0][3].split("-"))
    assert low < float(rows[0][2]) < high, "the accuracy lies inside its 95% interval"
    figures = {_cells(line)[0] for line in lines if line.startswith("| ")}
    assert set(EFFICIENCY) <= figures
    assert any(f.startswith("training throughput, engine.fit (") for f in figures)
    targets = [line for line in lines if line.startswith(("- PASS: ", "- FAIL: "))]
    assert len(targets) == 8
    data = json.loads(raw.read_text())
    assert [c["name"] for c in data["contenders"]][:6] == CONTENDERS[:6]
    assert set(data["efficiency"]) == {"overhead", "speedup", "throughput", "dvc"}
    speedup = data["efficiency"]["speedup"]
    assert set(speedup["runners"]) == {"thread", "process", "dask"}
    # Whether every runner trained the same candidates is reported, not asserted: one quick run
    # in three on a loaded machine reported a difference not yet explained (issue 23 notes).
    assert isinstance(speedup["identical"], bool)
    assert set(speedup["runs"]) == {f"{r}-{w}" for r in ("thread", "process", "dask") for w in (1, 2)}
    assert speedup["best_runner"] in speedup["runners"]
    assert set(speedup["results"]) == set(speedup["candidates"])
    throughput = data["efficiency"]["throughput"]
    assert throughput["val_images"] > 0, "the throughput epoch includes its validation"
    assert set(data["decisions"]) == {"latency_ms", "params"}
    promoted = {c["name"].split(": ")[1] for c in data["contenders"][6:]}
    assert promoted == {d["winner"] for d in data["decisions"].values()}
    (png,) = tmp_path.glob("*-pareto.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert data["machine"]["cores"] >= 1 and data["machine"]["torch"] == torch.__version__
    allocated = [c for c in data["candidates"] if c["name"].startswith("alloc-")]
    assert len(allocated) == 2 and all(c["widths"] for c in allocated)
    header = next(line for line in lines if line.startswith("| candidate |"))
    assert _cells(header)[-1] == "widths kept (allocated)"
