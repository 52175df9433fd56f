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
import math
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
    floors,
    has_batch_norm,
    interleaved_ms,
    loss_and_accuracy,
    measure_sensitivity,
    reestimate_batch_norm,
    round_kept,
    with_latency,
)
from shrinkflow.models.timing import median_latency_ms
from shrinkflow.tasks.io import atomic_path, read_json, write_json

log = logging.getLogger(__name__)

# The lookup table times the unpruned model and a group's pruned copies in turn, ROUNDS times
# (each time the median of REPEATS passes, evaluate's timer), and keeps each one's fastest round
# as a ratio to the unpruned model's: a machine under load (13 ms for a 1.85 ms baseline was
# seen) slows every model of a round alike, so the ratios hold where the milliseconds do not.
WARMUP, REPEATS, ROUNDS = 1, 3, 20
# A latency budget is checked on the allocated model, timed the same way against the baseline:
# a measured ratio above keep * (1 + LATENCY_NOISE) tightens the budget and allocates again, at
# most TIGHTEN_STEPS times.
LATENCY_NOISE, TIGHTEN_STEPS = 0.05, 3
_SMALL = 1e-3
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

    def once(model: nn.Module, scores: dict[str, Tensor], keep: float) -> Allocation:
        costs = with_latency(cost_model(model, calibration[0][:1].float()), table)
        if keep < budget.keep:  # a tightened latency budget: never below what the floors reach
            least = costs.fraction(
                budget.objective, floors(costs.widths, options["max_layer_ratio"], options["round_to"])
            )
            keep = max(keep, least)
        return allocate(
            options["allocation"],
            budget.objective,
            keep,
            costs,
            max_layer_ratio=options["max_layer_ratio"],
            round_to=options["round_to"],
            sensitivity=table,
            scores=scores,
            evaluate=evaluate(model),
            samples=options["samples"],
            seed=seed,
        )

    def run(model: nn.Module, scores: dict[str, Tensor]) -> Allocation:
        chosen = once(model, scores, budget.keep)
        if budget.objective != "latency_ms":
            return chosen
        return checked_latency(
            model, scores, chosen, budget.keep, once, prune_to, shrink, calibration[0][:1].float()
        )

    def shrink(model: nn.Module, chosen: Allocation, factor: float) -> Allocation:
        costs = with_latency(cost_model(model, calibration[0][:1].float()), table)
        low = floors(costs.widths, options["max_layer_ratio"], options["round_to"])
        widths = {
            g: max(low[g], round_kept(math.floor(kept * factor), costs.widths[g], options["round_to"]))
            for g, kept in chosen.widths.items()
        }
        return Allocation(
            chosen.method,
            widths,
            {o: round(costs.fraction(o, widths), 6) for o in ("params", "flops", "latency_ms")},
            table.predicted_loss(widths, costs.widths),
        )

    def prune_to(model: nn.Module, widths: Widths) -> nn.Module:
        return apply_strategy(strategy, copy.deepcopy(model), calibration, widths=widths)

    return run


def checked_latency(
    model: nn.Module,
    scores: dict[str, Tensor],
    chosen: Allocation,
    keep: float,
    allocate_at: Callable[[nn.Module, dict[str, Tensor], float], Allocation],
    prune_to: Callable[[nn.Module, Widths], nn.Module],
    shrink: Callable[[nn.Module, Allocation, float], Allocation],
    example: Tensor,
) -> Allocation:
    """``chosen`` (allocated to a ``keep`` latency budget from the lookup table) timed against
    ``model`` in interleaved rounds; while the measured ratio misses the budget by more than
    LATENCY_NOISE, the budget the table is asked for is tightened by the miss and allocated
    again, or, where the table offers nothing cheaper, every group's width is ``shrink``-ed (at
    most TIGHTEN_STEPS steps in all). The last allocation carries, in ``measured``, the
    predicted and measured ratios and each step.

    Measured here and now: unlike a params or FLOPs budget (exact, from the graph), a latency
    budget's widths can differ between machines, and between runs on a loaded one."""
    time = timed_together(example)
    asked, steps, by = keep, [], "table"
    while True:
        base_ms, ms = time([model, prune_to(model, chosen.widths)])
        measured = ms / base_ms
        steps.append(
            {
                "by": by,
                "asked": round(asked, 4),
                "predicted": chosen.cost["latency_ms"],
                "measured": round(measured, 4),
            }
        )
        if measured <= keep * (1 + LATENCY_NOISE):
            break
        if len(steps) > TIGHTEN_STEPS:
            log.warning(
                "latency budget %.3f missed: the allocated model measures %.3f of the baseline "
                "after %d tightenings (the lookup table predicted %.3f)",
                keep,
                measured,
                TIGHTEN_STEPS,
                chosen.cost["latency_ms"],
            )
            break
        tighter = asked * keep / measured
        if measured < 1:  # the share of the predicted saving that was real, asked for the whole saving
            real = (1 - measured) / max(1 - chosen.cost["latency_ms"], _SMALL)
            tighter = max(_SMALL, min(tighter, 1 - (1 - keep) / max(real, _SMALL)))
        log.info(
            "latency budget %.3f: the table predicted %.3f but the allocated model measures %.3f "
            "of the baseline; allocating again to %.3f (no lower than the groups' floors reach)",
            keep,
            chosen.cost["latency_ms"],
            measured,
            tighter,
        )
        # The table's last offer brought no real saving: shrink from here on
        helps = by == "table" and (len(steps) < 2 or measured < steps[-2]["measured"] * (1 - LATENCY_NOISE))
        retry = None
        if helps:
            try:
                retry = allocate_at(model, scores, tighter)
            except ValueError as exc:  # out of the table's reach
                log.info("latency budget %.3f: the table cannot go to %.3f (%s)", keep, tighter, exc)
        if retry is None or retry.widths == chosen.widths:  # the table has nothing cheaper to offer
            # linear, though a middle layer's time goes as width squared: fixed costs do not shrink
            factor = keep / measured
            retry, by = shrink(model, chosen, factor), "shrink"
            log.info(
                "latency budget %.3f: the lookup table has no cheaper widths that measure cheaper; "
                "each group's width shrunk by %.2f instead (no group below its floor)",
                keep,
                factor,
            )
            if retry.widths == chosen.widths:
                log.warning(
                    "latency budget %.3f missed: every group is at its floor (measured %.3f)", keep, measured
                )
                break
        asked, chosen = tighter, retry
    chosen.measured = {
        "budget": keep,
        "predicted_ratio": chosen.cost["latency_ms"],
        "measured_ratio": round(measured, 4),
        "baseline_ms": round(base_ms, 4),
        "met": measured <= keep * (1 + LATENCY_NOISE),
        "steps": steps,
    }
    return chosen


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
    if allocation.measured:
        found["allocated"]["latency"] = allocation.measured
    if allocation.samples:
        found["allocated"]["samples"] = [
            {"loss": round(s["loss"], 4), "acc": round(s["acc"], 2)} for s in allocation.samples
        ]
    return found
