"""A budget candidate's widths (and ranks), decided before its strategy runs.

The allocation is a value: the baseline's cost model, the measured sensitivity table and the
candidate's typed request go in, an :class:`~shrinkflow.models.allocation.Allocation` comes out,
and the pipeline then calls the strategy with its widths and, where ranks were allocated too,
the lowrank strategy with its ranks. A latency budget is then checked by measurement on the
pruned and factorised network, in steps that are each a function (measure, tighten, shrink),
each logged and each kept in the record, in a bounded loop that makes a new record per step.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from torch import Tensor, nn

from shrinkflow.models import STRATEGIES, apply_strategy
from shrinkflow.models.allocation import (
    Allocation,
    Budget,
    LatencyCheck,
    LatencyStep,
    Problem,
    RankPlan,
    Request,
    Sensitivity,
    Widths,
    allocate,
    cost_model,
    shrunk,
    tightened_keep,
    with_latency,
)
from shrinkflow.tasks.training.sensitivity import scorer, timed_together

log = logging.getLogger(__name__)

# A latency budget is checked on the allocated model, timed against the baseline as the lookup
# table was: a measured share above keep * (1 + LATENCY_NOISE) tightens the budget asked of the
# table and allocates again (or shrinks every group), at most TIGHTEN_STEPS times.
LATENCY_NOISE, TIGHTEN_STEPS = 0.05, 3

Batch = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class Measuring:
    """What the latency check times: the unpruned ``model``, ``shrink(widths, ranks)`` (a pruned
    and factorised copy) and ``time(models) -> ms`` (interleaved, the first model the reference)."""

    model: nn.Module
    shrink: Callable[[Widths, RankPlan], nn.Module]
    time: Callable[[list[nn.Module]], list[float]]


def shrinker(strategy: str, model: nn.Module, calibration: Batch) -> Callable[[Widths, RankPlan], nn.Module]:
    """``(widths, ranks) -> a copy of model`` pruned to ``widths`` by the candidate's own strategy,
    then factorised at ``ranks`` by the lowrank strategy (where there are any): what the
    candidate's steps build from an allocation."""

    def shrink(widths: Widths, ranks: RankPlan) -> nn.Module:
        pruned = apply_strategy(strategy, copy.deepcopy(model), calibration, widths=widths)
        return factorised(pruned, ranks, calibration)

    return shrink


def factorised(model: nn.Module, ranks: RankPlan, calibration: Batch) -> nn.Module:
    """``model`` factorised at ``ranks`` by the lowrank strategy (unchanged when there are none)."""
    if not ranks:
        return model
    return apply_strategy("lowrank", model, calibration, ranks={n: list(r) for n, r in ranks.items()})


def allocate_widths(
    strategy: str, request: Request, model: nn.Module, table: Sensitivity, calibration: Batch, val: Batch
) -> Allocation:
    """The widths (and, when ``request`` asks, the ranks) ``request`` allocates on ``model`` (the
    baseline, after any pre-phase), with the measured ``table``; a latency budget's checked by
    measurement."""
    example = calibration[0][:1].float()
    shrink, score = shrinker(strategy, model, calibration), scorer(calibration, val)
    problem = Problem(
        with_latency(cost_model(model, example), table),
        request,
        table,
        scores=STRATEGIES[strategy].scores(model, calibration) if request.method == "global" else None,
        evaluate=lambda widths: score(shrink(widths, {})),
    )
    chosen = allocate(problem)
    log.info(
        "%s allocation: widths %s, ranks %s, cost shares %s",
        request.method,
        chosen.widths,
        chosen.ranks or "none",
        chosen.cost,
    )
    if request.keep("latency_ms") is None:
        return chosen
    return checked_latency(problem, chosen, Measuring(model, shrink, timed_together(example)))


def measure(measuring: Measuring, chosen: Allocation, by: str, asked: float) -> LatencyStep:
    """``chosen``'s network (its widths, and its ranks) timed against the unpruned model."""
    base_ms, ms = measuring.time([measuring.model, measuring.shrink(chosen.widths, chosen.ranks)])
    step = LatencyStep(by, asked, chosen.cost["latency_ms"], ms / base_ms, base_ms)
    log.info(
        "latency check: widths from the %s (asked %.3f) predicted %.3f, measure %.3f of the baseline",
        by,
        asked,
        step.predicted,
        step.measured,
    )
    return step


def tighten(problem: Problem, keep: float) -> Allocation | None:
    """Allocated again with the latency budget asked of the table lowered to ``keep`` (never
    below what the floors and the cheapest ranks reach); ``None`` where the table cannot go there."""
    asked = problem.request.keep("latency_ms")
    if keep < asked:
        keep = max(keep, problem.least("latency_ms"))
    try:
        return allocate(replace(problem, request=problem.request.with_keep("latency_ms", keep)))
    except ValueError as exc:  # out of the table's reach
        log.info("latency budget %.3f: the table cannot go to %.3f (%s)", asked, keep, exc)
        return None


def shrink(problem: Problem, chosen: Allocation, factor: float) -> Allocation:
    """Every group of ``chosen`` narrowed by ``factor`` (no group below its floor): linear,
    though a middle layer's time goes as width squared, since fixed costs do not shrink."""
    log.info(
        "latency budget %.3f: the lookup table has no cheaper widths that measure cheaper; each "
        "group's width shrunk by %.2f instead (no group below its floor)",
        problem.request.keep("latency_ms"),
        factor,
    )
    return shrunk(problem, chosen, factor)


def _next(
    problem: Problem, chosen: Allocation, steps: list[LatencyStep]
) -> tuple[Allocation, str, float] | None:
    """After a missed measurement: the widths to measure next, how they were reached and what
    was asked of the table; ``None`` when every group is already at its floor."""
    keep, last = problem.request.keep("latency_ms"), steps[-1]
    tighter = tightened_keep(keep, last.asked, last.measured, chosen.cost["latency_ms"])
    log.info(
        "latency budget %.3f: the table predicted %.3f but the allocated model measures %.3f "
        "of the baseline; allocating again to %.3f (no lower than the groups' floors reach)",
        keep,
        chosen.cost["latency_ms"],
        last.measured,
        tighter,
    )
    # Once the table's last offer brought no real saving, only shrinking is left.
    saved = len(steps) < 2 or last.measured < steps[-2].measured * (1 - LATENCY_NOISE)
    helps = last.by == "table" and saved
    retry = tighten(problem, tighter) if helps else None
    if retry is not None and retry.widths != chosen.widths:
        return retry, "table", tighter
    retry = shrink(problem, chosen, keep / last.measured)
    if retry.widths == chosen.widths:
        log.warning(
            "latency budget %.3f missed: every group is at its floor (measured %.3f)", keep, last.measured
        )
        return None
    return retry, "shrink", tighter


def checked_latency(problem: Problem, chosen: Allocation, measuring: Measuring) -> Allocation:
    """``chosen`` (allocated to a latency budget from the lookup table) measured against the
    baseline; while it misses the budget by more than LATENCY_NOISE, the next widths are
    tightened or shrunk and measured (at most TIGHTEN_STEPS times). Returns the last widths
    measured, with every step in ``latency``.

    Measured here and now: unlike a params or FLOPs budget (exact, from the graph), a latency
    budget's widths can differ between machines, and between runs on a loaded one."""
    keep = problem.request.keep("latency_ms")
    steps: list[LatencyStep] = []
    by, asked = "table", keep
    for attempt in range(TIGHTEN_STEPS + 1):
        steps.append(measure(measuring, chosen, by, asked))
        if steps[-1].measured <= keep * (1 + LATENCY_NOISE):
            break
        if attempt == TIGHTEN_STEPS:
            log.warning(
                "latency budget %.3f missed: the allocated model measures %.3f of the baseline after "
                "%d tightenings (the lookup table predicted %.3f)",
                keep,
                steps[-1].measured,
                TIGHTEN_STEPS,
                chosen.cost["latency_ms"],
            )
            break
        moved = _next(problem, chosen, steps)
        if moved is None:
            break
        chosen, by, asked = moved
    met = steps[-1].measured <= keep * (1 + LATENCY_NOISE)
    return replace(chosen, latency=LatencyCheck(keep, met, tuple(steps)))


def summary(allocation: Allocation, request: Request, table: Sensitivity, path: str) -> dict[str, Any]:
    """What a candidate's record (and so MLflow) keeps of its allocation: the widths (and the
    ranks, where allocated), the cost shares they predict, every budget with its predicted (and,
    for latency, measured) share, the predicted validation loss, each group's (and layer's)
    measured loss curve and the table's file; a ``sample`` allocation's scored vectors; a
    latency budget's measured check."""
    # The latency table adds single-group savings, which overlap: a prediction below zero is none.
    cost = {o: None if o == "latency_ms" and v < 0 else v for o, v in allocation.cost.items()}
    found = {
        "widths": allocation.widths,
        **({"ranks": {n: list(r) for n, r in allocation.ranks.items()}} if request.ranks else {}),
        "allocated": {
            "method": allocation.method,
            "cost": cost,
            "budgets": [_budget(b, cost, allocation.latency) for b in request.budgets],
        },
        "sensitivity": {
            "file": path,
            "ratios": table.ratios,
            "base_loss": round(table.base["loss"], 4),
            "loss": {g: [round(v, 4) for v in row["loss"]] for g, row in table.groups.items()},
        },
    }
    if request.ranks:
        found["sensitivity"]["rank_loss"] = {
            name: {"ranks": row["ranks"], "loss": [round(v, 4) for v in row["loss"]]}
            for name, row in table.layers.items()
        }
    if allocation.predicted_loss is not None:
        found["allocated"]["predicted_val_loss"] = round(allocation.predicted_loss, 4)
    if allocation.latency is not None:
        found["allocated"]["latency"] = allocation.latency.as_dict(cost["latency_ms"])
    if allocation.samples:
        found["allocated"]["samples"] = [
            {"loss": round(s["loss"], 4), "acc": round(s["acc"], 2)} for s in allocation.samples
        ]
    return found


def _budget(budget: Budget, cost: dict[str, float | None], latency: LatencyCheck | None) -> dict[str, Any]:
    """One budget as the record keeps it: params and FLOPs are exact, so met when predicted
    within it; latency is met when measured within it (and its noise)."""
    entry = {"objective": budget.objective, "keep": budget.keep, "predicted": cost[budget.objective]}
    if budget.objective == "latency_ms" and latency is not None:
        return entry | {"measured": round(latency.steps[-1].measured, 4), "met": latency.met}
    return entry | {"met": cost[budget.objective] <= budget.keep + 1e-6}
