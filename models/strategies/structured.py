"""The one structured pruner: torch-pruning's dependency graph removes whole channels/neurons,
ranked by a pluggable importance. ``prune_l1``, ``prune_taylor``, ``prune_fpgm`` and ``slim`` are
this pruner with different importances (each in its own module, via :func:`structured`).

How many channels each layer keeps is planned here, not by torch-pruning's own thresholding:
torch-pruning's ``round_to`` rounds the kept count *down* (30 -> 12 -> 8 kept at ratio 0.6 with
multiples of 8), and its ``max_pruning_ratio`` only bars a layer from *later* iterative steps, so
one global step still cuts a layer whose scores are all small to one channel (both checked with
torch-pruning 1.6.0). The plan (global ranking with a
per-layer floor, rounding to the nearest multiple) is handed to torch-pruning as per-layer ratios
(``pruning_ratio_dict``); within each layer torch-pruning removes the lowest-ranked channels, the
same channels a global threshold would pick there.

With a ``budget`` the kept counts come from :mod:`shrinkflow.models.allocation` instead (per-layer
widths meeting a params, FLOPs or latency budget), and ``widths`` (kept channels by group root
name) replays a recorded allocation exactly: the same widths on the same baseline remove the same
channels.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Annotated, Any, Literal

import torch
import torch_pruning as tp
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from shrinkflow.models.allocation import Allocation, allocate, cost_model, global_plan, round_kept
from shrinkflow.models.architecture import classifier_layers, record_pruning
from shrinkflow.models.strategies.base import Batch, RatioOptions, Strategy

_EPS = 1e-6  # float slack when a ratio times a width should land on an integer (0.75 * 64)


class Budget(BaseModel):
    """Keep ``keep`` of the baseline's ``objective`` (``None`` when a search sets it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    objective: Literal["params", "flops", "latency_ms"] = "params"
    keep: Annotated[float, Field(gt=0, lt=1)] | None = None


class StructuredOptions(RatioOptions):
    """``global_pruning``: rank channels across layers rather than within each (then no layer
    gives up more than ``max_layer_ratio`` of its original channels; ignored when local, where
    every layer gives up exactly ``ratio``); ``iterative_steps``: reach the ratio in equal steps,
    re-scoring the survivors after each; ``round_to``: round each layer's kept channels to the
    nearest multiple of this (at least one multiple). Default None: on CPU (AMD EPYC, one thread,
    float32) rounding the seed BaseNet to multiples of 8 or 16 changed batch-64 latency by no
    more than the width it added or removed, see benchmarks/results/round-to-2026-11-29.md.

    ``budget`` (instead of ``ratio``): per-layer widths whose params, FLOPs or batch-1 latency are
    ``keep`` of the baseline's, chosen by ``allocation`` (see :mod:`shrinkflow.models.allocation`):
    ``uniform``, ``global`` (channels ranked across layers), ``sensitivity`` (least predicted loss
    from each group pruned alone at ``sensitivity_ratios``) or ``sample`` (the best of ``samples``
    random width vectors, each scored after BatchNorm re-estimation). No layer gives up more than
    ``max_layer_ratio``."""

    global_pruning: bool = False
    iterative_steps: Annotated[int, Field(ge=1, le=20)] = 1
    round_to: Annotated[int, Field(ge=2, le=256)] | None = None
    max_layer_ratio: Annotated[float, Field(gt=0, lt=1)] = 0.9
    budget: Budget | None = None
    allocation: Literal["uniform", "global", "sensitivity", "sample"] = "uniform"
    sensitivity_ratios: tuple[Annotated[float, Field(gt=0, lt=1)], ...] = (0.25, 0.5, 0.75, 0.9)
    samples: Annotated[int, Field(ge=1, le=200)] = 16

    @model_validator(mode="after")
    def _reachable(self) -> StructuredOptions:
        if self.global_pruning and self.ratio is not None and self.ratio > self.max_layer_ratio:
            raise ValueError(_unreachable(self.ratio, self.max_layer_ratio))
        if self.budget is None:
            if "allocation" in self.model_fields_set:
                raise ValueError("allocation applies to a budget; give budget: {objective, keep}")
            return self
        if self.ratio is not None:
            raise ValueError("set ratio or budget, not both")
        if "global_pruning" in self.model_fields_set and self.global_pruning:
            raise ValueError("with a budget, choose allocation: global instead of global_pruning")
        if self.iterative_steps > 1:
            raise ValueError("a budget is allocated in one step; iterative_steps must be 1")
        if sorted(set(self.sensitivity_ratios)) != list(self.sensitivity_ratios):
            raise ValueError("sensitivity_ratios must be increasing and distinct")
        if self.max_layer_ratio > self.sensitivity_ratios[-1] + _EPS:
            raise ValueError(
                f"max_layer_ratio {self.max_layer_ratio} is above the largest sensitivity ratio "
                f"{self.sensitivity_ratios[-1]}: no layer's loss would be measured that far"
            )
        return self


def _unreachable(ratio: float, limit: float) -> str:
    return (
        f"ratio {ratio} is above max_layer_ratio {limit}: with global_pruning no layer gives up"
        " more than max_layer_ratio, so the total cannot reach ratio"
    )


def step_ratios(ratio: float, steps: int) -> list[float]:
    """Per-application ratios for pruning in ``steps`` applications (e.g. with fine-tuning in
    between), each relative to the width the model has *then*: the kept fraction falls in equal
    decrements, ``keep_i = 1 - ratio * i / steps``, so ``r_i = 1 - keep_i / keep_(i-1)`` and the
    last application leaves ``(1 - ratio)`` of the original width. ``step_ratios(0.5, 2) ==
    [0.25, 1/3]``."""
    if not 0 < ratio < 1:
        raise ValueError(f"ratio must be in (0, 1), got {ratio}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    keep = [1 - ratio * i / steps for i in range(steps + 1)]
    return [1 - keep[i] / keep[i - 1] for i in range(1, steps + 1)]


def _scores(pruner: tp.pruner.BasePruner) -> dict[nn.Module, tuple[Any, torch.Tensor]]:
    """Each prunable group's per-channel importance, keyed by its root module, as torch-pruning
    itself scores them (channel-grouped layers averaged over their groups)."""
    found = {}
    for group in pruner.DG.get_all_groups(
        ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types
    ):
        if not pruner._check_pruning_ratio(group):  # a one-channel layer: nothing to remove
            continue
        imp = pruner.estimate_importance(group)
        if imp is None:
            continue
        ch_groups = pruner._get_channel_groups(group)
        imp = imp.view(ch_groups, -1).mean(dim=0) if ch_groups > 1 else imp
        found[group[0].dep.target.module] = (group, imp.detach().float().cpu())
    return found


def _plan(
    scores: dict[nn.Module, torch.Tensor],
    original: dict[nn.Module, int],
    keep: float,
    global_pruning: bool,
    max_layer_ratio: float,
    round_to: int | None,
) -> dict[nn.Module, int]:
    """How many channels each layer keeps so that ``keep`` of the original width survives:
    per layer (local), or across layers by rank with each layer keeping at least
    ``1 - max_layer_ratio`` of its original width (global)."""
    width = {m: len(s) for m, s in scores.items()}
    if not global_pruning:
        kept = {m: max(1, min(width[m], math.floor(original[m] * keep + _EPS))) for m in scores}
    else:
        floor = {m: max(1, math.ceil(original[m] * (1 - max_layer_ratio) - _EPS)) for m in scores}
        kept = global_plan(scores, original, keep, floor)
    return {m: round_kept(k, width[m], round_to) for m, k in kept.items()}


def channel_groups(model: nn.Module) -> dict[str, dict[nn.Module, int]]:
    """torch-pruning's channel groups for ``model``, fresh dicts every call (its defaults are
    shared, mutable, and keep every model they saw alive). Fused attention (torch's
    ``nn.MultiheadAttention``, as in torchvision's ViT) is grouped by head: every head loses the
    same offsets, so ``num_heads`` stays what the weights hold and each head keeps its own
    dimensions. torch-pruning's own ``num_heads`` option expects separate q/k/v layers and skips a
    fused layer's group altogether (1.6.1, checked on vit_b_16)."""
    heads = {m: m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    return {"in_channel_groups": dict(heads), "out_channel_groups": heads}


def _scorer(
    model: nn.Module, batch: Batch, importance: Callable[[], tp.importance.Importance], needs_grad: bool
) -> tp.pruner.BasePruner:
    inputs, targets = batch
    if needs_grad:
        model.zero_grad()
        nn.functional.cross_entropy(model(inputs), targets).backward()
    return tp.pruner.BasePruner(
        model,
        example_inputs=inputs[:1],
        importance=importance(),
        pruning_ratio=0.0,
        ignored_layers=classifier_layers(model),
        **channel_groups(model),
    )


def group_scores(
    model: nn.Module, batch: Batch, importance: Callable[[], tp.importance.Importance], needs_grad: bool
) -> dict[str, torch.Tensor]:
    """Each prunable group's per-channel importance, by its root module's name."""
    names = {m: n for n, m in model.named_modules()}
    scores = {names[m]: s for m, (_, s) in _scores(_scorer(model, batch, importance, needs_grad)).items()}
    model.zero_grad(set_to_none=True)
    return scores


def _named_plan(
    model: nn.Module, scored: dict[nn.Module, Any], widths: dict[str, int]
) -> dict[nn.Module, int]:
    """``widths`` (kept channels by root module name; a group not named keeps all) as a plan."""
    names = {m: n for n, m in model.named_modules()}
    known = {names[m] for m in scored}
    unknown = sorted(set(widths) - known)
    if unknown:
        raise ValueError(f"widths name {unknown[0]!r}, not a prunable group; the groups are {sorted(known)}")
    plan = {}
    for m, (_, s) in scored.items():
        kept = widths.get(names[m], len(s))
        if not 1 <= kept <= len(s):
            raise ValueError(f"widths[{names[m]!r}] = {kept}: keep between 1 and {len(s)} channels")
        plan[m] = kept
    return plan


def prune(
    model: nn.Module,
    batch: Batch,
    importance: Callable[[], tp.importance.Importance],
    ratio: float | None,
    global_pruning: bool,
    needs_grad: bool,
    iterative_steps: int = 1,
    round_to: int | None = None,
    max_layer_ratio: float = 0.9,
    widths: dict[str, int] | None = None,
) -> nn.Module:
    """Remove whole channels/neurons with torch-pruning's dependency graph; the classifier's
    outputs are kept so the class count never changes. Each of ``iterative_steps`` steps
    re-scores the survivors and removes another ``ratio / iterative_steps`` of the original
    width. ``widths`` (instead of ``ratio``): the channels each group keeps, by its root module's
    name, in one step (what an allocation chose, or a record to rebuild)."""
    if widths is None and ratio is None:
        raise ValueError("give ratio or widths")
    if global_pruning and widths is None and ratio > max_layer_ratio:
        raise ValueError(_unreachable(ratio, max_layer_ratio))
    original: dict[nn.Module, int] = {}
    steps = 1 if widths is not None else iterative_steps
    for step in range(1, steps + 1):
        scored = _scores(_scorer(model, batch, importance, needs_grad))
        for m, (_, s) in scored.items():
            original.setdefault(m, len(s))
        if widths is not None:
            plan = _named_plan(model, scored, widths)
        else:
            keep = 1 - ratio * step / iterative_steps
            plan = _plan(
                {m: s for m, (_, s) in scored.items()},
                original,
                keep,
                global_pruning,
                max_layer_ratio,
                round_to,
            )
        # Kept k of n: ratio (n - k - 0.5) / n makes torch-pruning's int(n * (1 - r)) exactly k.
        ratios = {m: max(0.0, (len(s) - plan[m] - 0.5) / len(s)) for m, (_, s) in scored.items()}
        pruner = tp.pruner.BasePruner(
            model,
            example_inputs=batch[0][:1],
            importance=importance(),
            pruning_ratio=0.0,
            pruning_ratio_dict=ratios,
            ignored_layers=classifier_layers(model),
            **channel_groups(model),
        )
        pruner.step()
        record_pruning(model, pruner.DG.pruning_history())
    model.zero_grad(set_to_none=True)
    return model


Allocator = Callable[[nn.Module, dict[str, torch.Tensor]], Allocation]


def budget_widths(
    model: nn.Module,
    batch: Batch,
    scores: dict[str, torch.Tensor],
    budget: Budget,
    allocation: str,
    round_to: int | None,
    max_layer_ratio: float,
) -> Allocation:
    """The allocation a budget needs when nothing was measured: ``uniform`` or ``global`` on
    params or FLOPs (latency and the other allocations need the pipeline's measurements, see
    :mod:`shrinkflow.tasks.sensitivity`)."""
    if budget.objective == "latency_ms" or allocation not in ("uniform", "global"):
        raise ValueError(
            f"allocation {allocation} with objective {budget.objective} needs measured sensitivity; "
            "run the candidate through shrinkflow.tasks.train or pass allocate="
        )
    costs = cost_model(model, batch[0][:1])
    return allocate(
        allocation,
        budget.objective,
        budget.keep,
        costs,
        max_layer_ratio=max_layer_ratio,
        round_to=round_to,
        scores=scores,
    )


def structured(
    name: str,
    importance: Callable[[], tp.importance.Importance],
    options: type[StructuredOptions] = StructuredOptions,
    needs_grad: bool = False,
    **facts: Any,
) -> Strategy:
    """A structured-pruning strategy ranking channels by ``importance()`` (made fresh per call:
    importances may keep state). With a ``budget``, the widths come from ``allocate(model,
    scores)`` (the pipeline passes one built from measured sensitivity; without it, see
    :func:`budget_widths`); ``on_allocation`` hears the chosen :class:`Allocation`."""

    defaults = {k: f.default for k, f in options.model_fields.items()}

    def shrink(
        model: nn.Module,
        batch: Batch,
        *,
        ratio: float | None = None,
        global_pruning: bool = defaults["global_pruning"],
        iterative_steps: int = defaults["iterative_steps"],
        round_to: int | None = defaults["round_to"],
        max_layer_ratio: float = defaults["max_layer_ratio"],
        budget: Budget | dict | None = None,
        allocation: str = defaults["allocation"],
        sensitivity_ratios: tuple[float, ...] = defaults["sensitivity_ratios"],  # read by the allocator
        samples: int = defaults["samples"],  # read by the allocator
        widths: dict[str, int] | None = None,
        allocate: Allocator | None = None,
        on_allocation: Callable[[Allocation], None] | None = None,
    ) -> nn.Module:
        if budget is not None and widths is None:
            budget = Budget.model_validate(budget)
            if budget.keep is None:
                raise ValueError("budget.keep is not set (a search sets it)")
            scores = group_scores(model, batch, importance, needs_grad)
            chosen = (
                allocate(model, scores)
                if allocate is not None
                else budget_widths(model, batch, scores, budget, allocation, round_to, max_layer_ratio)
            )
            if on_allocation is not None:
                on_allocation(chosen)
            widths = chosen.widths
        return prune(
            model,
            batch,
            importance,
            ratio,
            global_pruning,
            needs_grad,
            iterative_steps,
            round_to,
            max_layer_ratio,
            widths,
        )

    shrink.__name__ = shrink.__qualname__ = name
    return Strategy(name, shrink, options, warm_start=True, needs_graph=True, **facts)
