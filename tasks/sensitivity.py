"""Measured sensitivity of the baseline, which a budget candidate's allocation reads.

Each prunable group of the baseline is pruned alone at each ``sensitivity_ratios`` ratio by the
candidate's own strategy (its importance picks the channels), BatchNorm statistics are
re-estimated on the calibration images, and validation loss and accuracy, params, FLOPs and
batch-1 single-thread latency (``evaluate``'s timer) are measured. The table is cached in
``<paths.candidates>/sensitivity-<strategy>.json`` with the baseline checkpoint's sha256, the
prepared data's fingerprint and the ratios: every candidate of a run reuses it, and a changed
baseline (or data, or ratios) makes it measured again. A plot of every group's curve sits beside.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from shrinkflow.models import apply_strategy
from shrinkflow.models.allocation import (
    Sensitivity,
    has_batch_norm,
    interleaved_ms,
    loss_and_accuracy,
    measure_sensitivity,
    reestimate_batch_norm,
)
from shrinkflow.models.timing import median_latency_ms
from shrinkflow.tasks.io import atomic_path, read_json, write_json

log = logging.getLogger(__name__)

# The lookup table times the unpruned model and a group's pruned copies in turn, ROUNDS times
# (each time the median of REPEATS passes, evaluate's timer), and keeps each one's fastest round
# as a ratio to the unpruned model's: a machine under load (13 ms for a 1.85 ms baseline was
# seen) slows every model of a round alike, so the ratios hold where the milliseconds do not.
WARMUP, REPEATS, ROUNDS = 1, 3, 20
BN_BATCH = 64
_LOCKS: dict[Path, threading.Lock] = {}
_LOCKS_LOCK = threading.Lock()

Batch = tuple[Tensor, Tensor]


def latency_ms(model: nn.Module, example: Tensor, warmup: int = WARMUP, repeats: int = REPEATS) -> float:
    """Median single-thread CPU latency of one forward pass, timed as ``evaluate`` times models."""
    return median_latency_ms(model, example, warmup, repeats)


def timed_together(
    example: Tensor, rounds: int = ROUNDS, warmup: int = WARMUP, repeats: int = REPEATS
) -> Callable[[list[nn.Module]], list[float]]:
    """``models -> ms``: each model's fastest of ``rounds`` interleaved rounds (the first model
    is the reference the others are compared with)."""
    return lambda models: interleaved_ms(
        [m.eval() for m in models], lambda m: latency_ms(m, example, warmup, repeats), rounds
    )


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
            timed_together(calibration[0][:1].float()),
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
