"""Measured sensitivity of the baseline, and the allocator a budget candidate prunes with.

Each prunable group of the baseline is pruned alone at each ``sensitivity_ratios`` ratio by the
candidate's own strategy (its importance picks the channels), BatchNorm statistics are
re-estimated on the calibration images, and validation loss and accuracy, params, FLOPs and
batch-1 single-thread latency (``evaluate``'s timer) are measured. The table is cached in
``<paths.candidates>/sensitivity-<strategy>.json`` with the baseline checkpoint's sha256, the
prepared data's fingerprint and the ratios: every candidate of a run reuses it, and a changed
baseline (or data, or ratios) makes it measured again. A plot of every group's curve sits beside.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from shrinkflow.models import apply_strategy
from shrinkflow.models.allocation import (
    Allocation,
    Sensitivity,
    Widths,
    allocate,
    cost_model,
    has_batch_norm,
    loss_and_accuracy,
    measure_sensitivity,
    reestimate_batch_norm,
    with_latency,
)
from shrinkflow.models.timing import median_latency_ms
from shrinkflow.tasks.io import atomic_path, read_json, write_json

log = logging.getLogger(__name__)

# The lookup table times each pruned copy a little less than evaluate does (12 copies of
# BaseNet); the allocation uses differences between medians, not one figure.
WARMUP, REPEATS = 5, 30
BN_BATCH = 64
_LOCKS: dict[Path, threading.Lock] = {}
_LOCKS_LOCK = threading.Lock()

Batch = tuple[Tensor, Tensor]


def latency_ms(model: nn.Module, example: Tensor, warmup: int = WARMUP, repeats: int = REPEATS) -> float:
    """Median single-thread CPU latency of one forward pass, timed as ``evaluate`` times models."""
    return median_latency_ms(model, example, warmup, repeats)


def sensitivity_path(candidates_dir: Path, strategy: str) -> Path:
    return candidates_dir / f"sensitivity-{strategy}.json"


def scorer(calibration: Batch, val: Batch) -> Callable[[nn.Module], tuple[float, float]]:
    """Validation loss and accuracy after BatchNorm re-estimation on the calibration images."""
    batches = [calibration[0][i : i + BN_BATCH].float() for i in range(0, len(calibration[0]), BN_BATCH)]

    def score(model: nn.Module) -> tuple[float, float]:
        if has_batch_norm(model):
            reestimate_batch_norm(model, batches)
        return loss_and_accuracy(model, val[0], val[1])

    return score


def load_or_measure(
    path: Path,
    baseline: nn.Module,
    key: dict[str, Any],
    strategy: str,
    calibration: Batch,
    val: Batch,
    ratios: tuple[float, ...],
) -> Sensitivity:
    """The cached table at ``path`` when its ``key`` (baseline sha256, data fingerprint,
    strategy, ratios) matches, else measured now and written there (one thread at a time)."""
    with _LOCKS_LOCK:
        lock = _LOCKS.setdefault(path.resolve(), threading.Lock())
    with lock:
        if path.exists():
            cached = read_json(path)
            if cached.get("key") == key:
                return Sensitivity(**cached["table"])
            log.info("%s was measured for another baseline or settings; measuring again", path.name)
        table = measure_sensitivity(
            baseline,
            calibration[0][:1].float(),
            lambda model, widths: apply_strategy(strategy, model, calibration, widths=widths),
            scorer(calibration, val),
            lambda model: latency_ms(model.eval(), calibration[0][:1].float()),
            ratios,
        )
        write_json(path, {"key": key, "table": asdict(table)})
        plot_sensitivity(table, path.with_suffix(".png"))
        return table


def plot_sensitivity(table: Sensitivity, path: Path) -> Path:
    """Every group's validation accuracy and batch-1 latency against the share it keeps."""
    from matplotlib.figure import Figure  # a second to import: only when a plot is drawn

    fig = Figure(figsize=(10, 4), layout="constrained")  # not pyplot: candidates run in threads
    acc_ax, lat_ax = fig.subplots(1, 2)
    for group, row in table.groups.items():
        shares = [1.0, *(k / row["width"][0] for k in row["kept"])]
        acc_ax.plot(
            shares, [table.base["acc"], *row["acc"]], marker="o", label=f"{group} ({row['width'][0]})"
        )
        lat_ax.plot(shares, [table.base["latency_ms"], *row["latency_ms"]], marker="o", label=group)
    acc_ax.set(xlabel="share of the group's channels kept", ylabel="val accuracy % (BN re-estimated)")
    lat_ax.set(xlabel="share of the group's channels kept", ylabel="batch-1 latency, ms (1 thread)")
    acc_ax.invert_xaxis()
    lat_ax.invert_xaxis()
    acc_ax.legend(fontsize=7)
    fig.suptitle("Each prunable group pruned alone")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


def allocator(
    strategy: str,
    options: dict[str, Any],
    table: Sensitivity,
    calibration: Batch,
    val: Batch,
    seed: int,
) -> Callable[[nn.Module, dict[str, Tensor]], Allocation]:
    """``allocate(model, scores)`` for the structured pruner: the candidate's budget and
    allocation on ``model``'s costs with the measured latency table."""
    budget = options["budget"]
    score = scorer(calibration, val)

    def evaluate(model: nn.Module) -> Callable[[Widths], tuple[float, float]]:
        return lambda widths: score(
            apply_strategy(strategy, copy.deepcopy(model), calibration, widths=widths)
        )

    def run(model: nn.Module, scores: dict[str, Tensor]) -> Allocation:
        costs = with_latency(cost_model(model, calibration[0][:1].float()), table)
        return allocate(
            options["allocation"],
            budget.objective,
            budget.keep,
            costs,
            max_layer_ratio=options["max_layer_ratio"],
            round_to=options["round_to"],
            sensitivity=table,
            scores=scores,
            evaluate=evaluate(model),
            samples=options["samples"],
            seed=seed,
        )

    return run


def summary(allocation: Allocation, table: Sensitivity, path: str) -> dict[str, Any]:
    """What a candidate's record (and so MLflow) keeps of its allocation: the widths, the cost
    shares they predict, the predicted validation loss, each group's measured loss curve and the
    cached table's file; a ``sample`` allocation's scored vectors."""
    found = {
        "widths": allocation.widths,
        "allocated": {"method": allocation.method, "cost": allocation.cost},
        "sensitivity": {
            "file": path,
            "ratios": table.ratios,
            "base_loss": round(table.base["loss"], 4),
            "loss": {g: [round(v, 4) for v in row["loss"]] for g, row in table.groups.items()},
        },
    }
    if allocation.predicted_loss is not None:
        found["allocated"]["predicted_val_loss"] = round(allocation.predicted_loss, 4)
    if allocation.samples:
        found["allocated"]["samples"] = [
            {"loss": round(s["loss"], 4), "acc": round(s["acc"], 2)} for s in allocation.samples
        ]
    return found
