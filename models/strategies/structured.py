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
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Annotated, Any

import torch
import torch_pruning as tp
from pydantic import Field, model_validator
from torch import nn

from shrinkflow.models.architecture import classifier_layers, record_pruning
from shrinkflow.models.strategies.base import Batch, RatioOptions, Strategy

_EPS = 1e-6  # float slack when a ratio times a width should land on an integer (0.75 * 64)


class StructuredOptions(RatioOptions):
    """``global_pruning``: rank channels across layers rather than within each (then no layer
    gives up more than ``max_layer_ratio`` of its original channels; ignored when local, where
    every layer gives up exactly ``ratio``); ``iterative_steps``: reach the ratio in equal steps,
    re-scoring the survivors after each; ``round_to``: round each layer's kept channels to the
    nearest multiple of this (at least one multiple). Default None: on CPU (AMD EPYC, one thread,
    float32) rounding the seed BaseNet to multiples of 8 or 16 changed batch-64 latency by no
    more than the width it added or removed, see benchmarks/results/round-to-2026-11-29.md."""

    global_pruning: bool = False
    iterative_steps: Annotated[int, Field(ge=1, le=20)] = 1
    round_to: Annotated[int, Field(ge=2, le=256)] | None = None
    max_layer_ratio: Annotated[float, Field(gt=0, lt=1)] = 0.9

    @model_validator(mode="after")
    def _reachable(self) -> StructuredOptions:
        if self.global_pruning and self.ratio is not None and self.ratio > self.max_layer_ratio:
            raise ValueError(_unreachable(self.ratio, self.max_layer_ratio))
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


def _round(kept: int, width: int, multiple: int | None) -> int:
    """``kept`` to the nearest multiple of ``multiple`` (halves up), at least one multiple, never
    more than ``width``."""
    if multiple is None:
        return kept
    return min(width, max(multiple, multiple * math.floor(kept / multiple + 0.5)))


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
        to_remove = sum(width.values()) - math.floor(sum(original[m] for m in scores) * keep + _EPS)
        kept = dict(width)
        modules = list(scores)
        owner = torch.cat([torch.full((width[m],), i) for i, m in enumerate(modules)])
        order = torch.argsort(torch.cat([scores[m] for m in modules]), stable=True)
        for i in owner[order].tolist():  # lowest score first; a layer at its floor gives no more
            if to_remove <= 0:
                break
            m = modules[i]
            if kept[m] > floor[m]:
                kept[m] -= 1
                to_remove -= 1
    return {m: _round(k, width[m], round_to) for m, k in kept.items()}


def prune(
    model: nn.Module,
    batch: Batch,
    importance: Callable[[], tp.importance.Importance],
    ratio: float,
    global_pruning: bool,
    needs_grad: bool,
    iterative_steps: int = 1,
    round_to: int | None = None,
    max_layer_ratio: float = 0.9,
) -> nn.Module:
    """Remove whole channels/neurons with torch-pruning's dependency graph; the classifier's
    outputs are kept so the class count never changes. Each of ``iterative_steps`` steps
    re-scores the survivors and removes another ``ratio / iterative_steps`` of the original
    width."""
    if global_pruning and ratio > max_layer_ratio:
        raise ValueError(_unreachable(ratio, max_layer_ratio))
    inputs, targets = batch
    original: dict[nn.Module, int] = {}
    for step in range(1, iterative_steps + 1):
        if needs_grad:
            model.zero_grad()
            nn.functional.cross_entropy(model(inputs), targets).backward()
        scorer = tp.pruner.BasePruner(
            model,
            example_inputs=inputs[:1],
            importance=importance(),
            pruning_ratio=0.0,
            ignored_layers=classifier_layers(model),
        )
        scored = _scores(scorer)
        for m, (_, s) in scored.items():
            original.setdefault(m, len(s))
        keep = 1 - ratio * step / iterative_steps
        plan = _plan(
            {m: s for m, (_, s) in scored.items()}, original, keep, global_pruning, max_layer_ratio, round_to
        )
        # Kept k of n: ratio (n - k - 0.5) / n makes torch-pruning's int(n * (1 - r)) exactly k.
        ratios = {m: max(0.0, (len(s) - plan[m] - 0.5) / len(s)) for m, (_, s) in scored.items()}
        pruner = tp.pruner.BasePruner(
            model,
            example_inputs=inputs[:1],
            importance=importance(),
            pruning_ratio=0.0,
            pruning_ratio_dict=ratios,
            ignored_layers=classifier_layers(model),
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
    importances may keep state)."""

    defaults = {k: f.default for k, f in options.model_fields.items()}

    def shrink(
        model: nn.Module,
        batch: Batch,
        *,
        ratio: float,
        global_pruning: bool = defaults["global_pruning"],
        iterative_steps: int = defaults["iterative_steps"],
        round_to: int | None = defaults["round_to"],
        max_layer_ratio: float = defaults["max_layer_ratio"],
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
        )

    shrink.__name__ = shrink.__qualname__ = name
    return Strategy(name, shrink, options, warm_start=True, **facts)
