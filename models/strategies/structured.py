"""The one structured pruner: torch-pruning's dependency graph removes whole channels/neurons,
ranked by a pluggable importance. ``prune_l1``, ``prune_taylor``, ``prune_fpgm`` and ``slim`` are
this pruner with different importances (each in its own module, via :func:`structured`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import torch_pruning as tp
from pydantic import Field
from torch import nn

from models.strategies.base import Batch, RatioOptions, Strategy


class StructuredOptions(RatioOptions):
    """``global_pruning``: rank channels across layers rather than within each;
    ``iterative_steps``: reach the ratio in equal steps, re-scoring the survivors after each."""

    global_pruning: bool = False
    iterative_steps: Annotated[int, Field(ge=1, le=20)] = 1


def prune(
    model: nn.Module,
    batch: Batch,
    importance: tp.importance.Importance,
    ratio: float,
    global_pruning: bool,
    needs_grad: bool,
    iterative_steps: int = 1,
) -> nn.Module:
    """Remove whole channels/neurons with torch-pruning's dependency graph; the classifier's
    outputs are kept so the class count never changes."""
    inputs, targets = batch
    pruner = tp.pruner.BasePruner(
        model,
        example_inputs=inputs[:1],
        importance=importance,
        pruning_ratio=ratio,
        global_pruning=global_pruning,
        iterative_steps=iterative_steps,
        ignored_layers=[model.classifier_layer()],
    )
    for _ in range(iterative_steps):
        if needs_grad:
            model.zero_grad()
            nn.functional.cross_entropy(model(inputs), targets).backward()
        pruner.step()
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

    default_global = options.model_fields["global_pruning"].default

    def shrink(
        model: nn.Module,
        batch: Batch,
        *,
        ratio: float,
        global_pruning: bool = default_global,
        iterative_steps: int = 1,
    ) -> nn.Module:
        return prune(model, batch, importance(), ratio, global_pruning, needs_grad, iterative_steps)

    shrink.__name__ = shrink.__qualname__ = name
    return Strategy(name, shrink, options, warm_start=True, **facts)


def step_ratios(ratio: float, steps: int) -> list[float]:
    """Per-round ratios, each relative to the width left by the rounds before, that remove
    ``ratio`` of the original width in ``steps`` equal decrements of the kept fraction."""
    kept = [1 - ratio * i / steps for i in range(steps + 1)]
    return [1 - kept[i] / kept[i - 1] for i in range(1, steps + 1)]
