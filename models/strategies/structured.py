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
widths meeting params, FLOPs or latency budgets), allocated by the pipeline before the strategy
runs and handed to it as ``widths`` (kept channels by group root name), which also replays a
recorded allocation exactly: the same widths on the same baseline remove the same channels.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal

import torch
import torch_pruning as tp
from pydantic import Discriminator, Field, Tag, model_validator
from torch import nn

from shrinkflow.models.allocation import ALLOCATORS, Budget, Request, global_plan, round_kept
from shrinkflow.models.architecture import classifier_layers, record_pruning
from shrinkflow.models.strategies.base import Batch, RatioOptions, Strategy

_EPS = 1e-6  # float slack when a ratio times a width should land on an integer (0.75 * 64)
AllocationMethod = Literal[tuple(ALLOCATORS)]  # the config offers every registered allocator
# One objective, or a list of them that must all hold: told apart by the value's shape, so that a
# bad one is reported against the shape it has.
BUDGET_SHAPES = ("one", "list")
Budgets = Annotated[
    Annotated[Budget, Tag("one")] | Annotated[tuple[Budget, ...], Field(min_length=1), Tag("list")],
    Discriminator(lambda value: "list" if isinstance(value, list | tuple) else "one"),
]


class StructuredOptions(RatioOptions):
    """``global_pruning``: rank channels across layers rather than within each (then no layer
    gives up more than ``max_layer_ratio`` of its original channels; ignored when local, where
    every layer gives up exactly ``ratio``); ``iterative_steps``: reach the ratio in equal steps,
    re-scoring the survivors after each; ``round_to``: round each layer's kept channels to the
    nearest multiple of this (at least one multiple). Default None: on CPU (AMD EPYC, one thread,
    float32) rounding the seed BaseNet to multiples of 8 or 16 changed batch-64 latency by no
    more than the width it added or removed, see benchmarks/results/round-to-2026-11-29.md.

    ``budget`` (instead of ``ratio``): per-layer widths whose params, FLOPs or batch-1 latency are
    ``keep`` of the baseline's, or a list of such objectives that must all hold, chosen by
    ``allocation`` (see :mod:`shrinkflow.models.allocation`): ``uniform``, ``global`` (channels
    ranked across layers), ``sensitivity`` (least predicted loss from each group pruned alone at
    ``sensitivity_ratios``, solved exactly as a multiple-choice knapsack) or ``sample`` (the best
    of ``samples`` random width vectors, each scored after BatchNorm re-estimation). No layer gives
    up more than ``max_layer_ratio``."""

    global_pruning: bool = False
    iterative_steps: Annotated[int, Field(ge=1, le=20)] = 1
    round_to: Annotated[int, Field(ge=2, le=256)] | None = None
    max_layer_ratio: Annotated[float, Field(gt=0, lt=1)] = 0.9
    budget: Budgets | None = None
    allocation: AllocationMethod = "uniform"
    sensitivity_ratios: tuple[Annotated[float, Field(gt=0, lt=1)], ...] = (0.25, 0.5, 0.75, 0.9)
    samples: Annotated[int, Field(ge=1, le=200)] = 16
    # Read by the pipeline to allocate widths before the strategy runs, never passed to it.
    ALLOCATION_KEYS: ClassVar[frozenset[str]] = frozenset(
        {"budget", "allocation", "sensitivity_ratios", "samples"}
    )

    @property
    def budgets(self) -> tuple[Budget, ...]:
        """Every objective the budget sets (one, or the list given); empty without a budget."""
        return (
            () if self.budget is None else self.budget if isinstance(self.budget, tuple) else (self.budget,)
        )

    @property
    def searched(self) -> Budget | None:
        """The budget whose ``keep`` a search sets (the one given without it), if any."""
        return next((b for b in self.budgets if b.keep is None), None)

    def allocation_request(self, seed: int, keep: float | None = None) -> Request:
        """The budgets and how to allocate them, as the allocator reads them; ``keep``: a search's
        trial, for the budget whose ``keep`` the search sets."""
        budgets = tuple(
            b.model_copy(update={"keep": keep}) if b.keep is None and keep is not None else b
            for b in self.budgets
        )
        return Request(self.allocation, budgets, self.max_layer_ratio, self.round_to, self.samples, seed)

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
        objectives = [b.objective for b in self.budgets]
        if twice := next((o for o in objectives if objectives.count(o) > 1), None):
            raise ValueError(f"budget gives {twice} twice; give each objective once")
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


def structured(
    name: str,
    importance: Callable[[], tp.importance.Importance],
    options: type[StructuredOptions] = StructuredOptions,
    needs_grad: bool = False,
    **facts: Any,
) -> Strategy:
    """A structured-pruning strategy ranking channels by ``importance()`` (made fresh per call:
    importances may keep state). A budget's widths are allocated before it runs (see
    :mod:`shrinkflow.models.allocation`) and reach it as ``widths``; ``scores`` gives each
    group's channel importance, which a ``global`` allocation ranks."""

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
        widths: dict[str, int] | None = None,
    ) -> nn.Module:
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

    def scores(model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        with torch.enable_grad():  # a Taylor importance needs the loss's gradients
            return group_scores(model, batch, importance, needs_grad)

    shrink.__name__ = shrink.__qualname__ = name
    return Strategy(name, shrink, options, warm_start=True, needs_graph=True, scores=scores, **facts)
