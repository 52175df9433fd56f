"""The compression benchmark: its parts on plain values (the Pareto front, the schedule, the paired
gap, the fronts by method, every figure of a run read beside an earlier one, the setups' params),
and its quick mode end to end (what it measures is reported, never asserted: timings depend on
the machine)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from benchmarks.compress import PREVIOUS_CIFAR, SETUPS, setup_params
from benchmarks.contenders import paired_gap
from benchmarks.efficiency import makespan
from benchmarks.figures import beside, named_figures
from benchmarks.pareto import METHOD_STYLES, method_of, pareto_front
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
FIRST_ROWS = ["baseline", "seed: AdjustedNet", "reference: l1-50"]
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


def test_each_model_falls_on_its_methods_front():
    assert method_of("baseline") == "baseline"
    assert method_of("torch-pruning global, params of x") == "torch-pruning global"
    assert method_of("torch-pruning uniform, FLOPs of x") == "torch-pruning uniform"
    assert method_of("lowrank-fc64-kd", "lowrank", "lowrank+distill") == "shrinkflow low-rank alone"
    joint = method_of("ladder-10", "prune_l1", "prune_l1+lowrank+distill")
    assert joint == "shrinkflow joint / ladder (pruning + low-rank)"
    assert method_of("l1-50-kd", "prune_l1", "prune_l1+distill") == "shrinkflow pruning only"
    assert method_of("width-50", "width", "width") == "AdjustedNet (width, fresh init)"
    assert {"baseline", joint, "torch-pruning uniform"} <= set(METHOD_STYLES)


def test_a_paired_gap_counts_only_the_images_the_two_models_disagree_on():
    labels = torch.arange(1000) % 10
    ours = labels.numpy().copy()
    theirs = ours.copy()
    theirs[:30] = (theirs[:30] + 1) % 10  # the peer wrong on 30 images we get right
    ours[500:510] = (ours[500:510] + 1) % 10  # and right on 10 we get wrong
    gap = paired_gap("params", "w", "p", ours, theirs, labels)
    assert gap.delta == pytest.approx(2.0)
    assert 0 < gap.low < 2.0 < gap.high, "40 discordant images of 1000: the interval excludes 0"
    same = paired_gap("params", "w", "p", ours, ours.copy(), labels)
    assert same.delta == 0 and same.low < 0 < same.high


def test_every_figure_of_2026_12_01_is_read_from_its_json():
    raw = json.loads(PREVIOUS_CIFAR.read_text())
    figures = named_figures(raw)
    assert figures["baseline: test acc %"] == pytest.approx(82.61, abs=0.01)
    assert figures["promoted by latency_ms: model"] == "l1-50-kd"
    assert figures["promoted by params: model"] == "alloc-p-search-kd"
    # its peers at the latency winner's size were named "same params" / "same FLOPs" then
    assert figures["promoted by latency_ms: gap to torch-pruning uniform at its params (pts)"] == (
        pytest.approx(82.10 - 82.04, abs=0.01)
    )
    assert figures["promoted by latency_ms: gap to torch-pruning uniform at its FLOPs (pts)"] == (
        pytest.approx(82.10 - 82.04, abs=0.01)
    )
    assert figures["orchestration overhead"] == pytest.approx(1.547, abs=0.001)
    assert figures["whole benchmark (min)"] == pytest.approx(148.2, abs=0.1)
    rows = beside(raw, raw)
    assert all(now == before for _, now, before in rows)
    assert ("candidate l1-50-kd: test acc %", 82.1, 82.1) in rows


def test_a_figure_only_one_run_has_is_shown_beside_nothing():
    raw = json.loads(PREVIOUS_CIFAR.read_text())
    newer = json.loads(json.dumps(raw))
    newer["candidates"] = [c for c in newer["candidates"] if c["name"] != "int8"]
    del newer["efficiency"]["dvc"]
    rows = {name: (now, before) for name, now, before in beside(newer, raw)}
    assert rows["dvc repro, nothing changed (s)"] == (None, pytest.approx(0.97, abs=0.01))
    assert "candidate int8: test acc %" not in rows, "a candidate only one run trained is not compared"


@pytest.mark.parametrize("name", sorted(SETUPS))
def test_every_setup_is_a_valid_pipeline_config(name):
    setup, params = setup_params(name)
    candidates = params.shrink.candidates
    assert setup.roles.reference in candidates
    assert setup.roles.adjusted is None or candidates[setup.roles.adjusted].strategy == "width"
    assert params.promote.objective == setup.objectives[0]
    assert any(c.strategy == "lowrank" for c in candidates.values()), "low-rank alone is a contender"
    assert {p.objective for p in setup.peers} <= set(setup.objectives)


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _table(lines: list[str], header: str) -> tuple[list[str], list[list[str]]]:
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(_cells(line))
    return _cells(lines[start]), rows


@pytest.mark.slow
@pytest.mark.scenario
@pytest.mark.large  # the whole benchmark's code on digits: `make test-large`
def test_quick_benchmark_writes_every_table_row_and_target(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            *("-m", "benchmarks.compress", "--quick", "--out", str(tmp_path)),
            *("--previous", str(PREVIOUS_CIFAR)),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    (md,) = tmp_path.glob("*.md")
    (raw,) = tmp_path.glob("*.json")
    lines = md.read_text().splitlines()
    data = json.loads(raw.read_text())
    assert lines[0].startswith("# Compression benchmark: quick-digits")
    assert any(line.startswith("Machine: ") and "torch" in line for line in lines)
    header, rows = _table(lines, "| model |")
    assert header == CONTENDER_COLUMNS
    assert [row[0] for row in rows][:3] == FIRST_ROWS
    assert all(len(row) == len(CONTENDER_COLUMNS) for row in rows)
    assert rows[0][6] == "1.00x"  # the baseline against itself
    low, high = (float(v) for v in rows[0][3].split("-"))
    assert low < float(rows[0][2]) < high, "the accuracy lies inside its 95% interval"
    winners = {o: d["winner"] for o, d in data["decisions"].items()}
    assert set(winners) == {"latency_ms", "params"}
    promoted = [row[0] for row in rows if row[0].startswith("shrinkflow (")]
    assert promoted == [f"shrinkflow ({o}): {w}" for o, w in winners.items()]
    peers = {row[0] for row in rows if row[0].startswith("torch-pruning")}
    for winner in set(winners.values()) - {"baseline"}:  # a pair at each winner's params
        assert {f"torch-pruning {k}, params of {winner}" for k in ("uniform", "global")} <= peers
    _, gaps = _table(lines, "| promoted by |")
    assert {(g[0], g[3]) for g in gaps} == {(g["objective"], g["peer"]) for g in data["gaps"]}
    assert all(g[3] in peers for g in gaps)
    figures = {_cells(line)[0] for line in lines if line.startswith("| ")}
    assert set(EFFICIENCY) <= figures
    assert any(f.startswith("training throughput, engine.fit (") for f in figures)
    targets = [line for line in lines if line.startswith(("- PASS: ", "- FAIL: "))]
    assert len(targets) == 10
    _, compared = _table(lines, "| figure | this run |")
    assert ["baseline: test acc %", rows[0][2], "82.61"] == compared[0][:3], "read from 2026-12-01's JSON"
    assert set(data["efficiency"]) == {"overhead", "speedup", "throughput", "dvc"}
    assert set(data["efficiency"]["overhead"]["work_s"]) >= {"prepare", "sensitivity", "evaluate"}
    speedup = data["efficiency"]["speedup"]
    assert set(speedup["runners"]) == {"thread", "process", "dask"}
    # Whether every runner trained the same candidates is reported, not asserted: one quick run
    # in three on a loaded machine reported a difference not yet explained (issue 23 notes).
    assert isinstance(speedup["identical"], bool)
    assert data["efficiency"]["throughput"]["val_images"] > 0, "the throughput epoch includes validation"
    (png,) = tmp_path.glob("*-pareto.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert data["machine"]["cores"] >= 1 and data["machine"]["torch"] == torch.__version__
    allocated = [c for c in data["candidates"] if c["name"].startswith("alloc-")]
    assert allocated and all(c["widths"] for c in allocated)
    assert np.isfinite([c["test_acc"] for c in data["contenders"]]).all()
