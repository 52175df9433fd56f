"""Shrink strategies, registered by name with one signature.

A strategy takes the trained baseline and a calibration batch and returns a smaller model;
the candidate is then trained with the same loop as the baseline. Strategies never train.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn

from models.registry import build_model, model_spec

Strategy = Callable[..., nn.Module]
STRATEGIES: dict[str, Strategy] = {}

# Whether a strategy starts from the baseline's weights (fine-tune) or from a fresh init.
WARM_START: dict[str, bool] = {}


def register(name: str, *, warm_start: bool) -> Callable[[Strategy], Strategy]:
    def wrap(fn: Strategy) -> Strategy:
        STRATEGIES[name] = fn
        WARM_START[name] = warm_start
        return fn

    return wrap


def _scaled(widths: list[int], keep: float) -> list[int]:
    return [max(1, round(w * keep)) for w in widths]


@register("width", warm_start=False)
def width(model: nn.Module, batch: tuple[Tensor, Tensor], *, ratio: float) -> nn.Module:
    """The seed's ``AdjustedNet``: the same architecture with every width cut by ``ratio``,
    freshly initialised (the caller seeds the RNG)."""
    spec = model_spec(model)
    spec["channels"] = _scaled(spec["channels"], 1 - ratio)
    spec["hidden"] = _scaled(spec["hidden"], 1 - ratio)
    return build_model(spec)


def _structured_prune(
    model: nn.Module,
    batch: tuple[Tensor, Tensor],
    importance: tp.importance.Importance,
    ratio: float,
    global_pruning: bool,
    needs_grad: bool,
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
        ignored_layers=[model.classifier_layer()],
    )
    if needs_grad:
        model.zero_grad()
        nn.functional.cross_entropy(model(inputs), targets).backward()
    pruner.step()
    model.zero_grad(set_to_none=True)
    return model


@register("prune_l1", warm_start=True)
def prune_l1(
    model: nn.Module, batch: tuple[Tensor, Tensor], *, ratio: float, global_pruning: bool = False
) -> nn.Module:
    """Structured L1-magnitude channel pruning."""
    imp = tp.importance.GroupMagnitudeImportance(p=1)
    return _structured_prune(model, batch, imp, ratio, global_pruning, needs_grad=False)


@register("prune_taylor", warm_start=True)
def prune_taylor(
    model: nn.Module, batch: tuple[Tensor, Tensor], *, ratio: float, global_pruning: bool = False
) -> nn.Module:
    """Structured channel pruning scored by first-order Taylor importance on a calibration batch."""
    imp = tp.importance.GroupTaylorImportance()
    return _structured_prune(model, batch, imp, ratio, global_pruning, needs_grad=True)


def apply_strategy(name: str, model: nn.Module, batch: tuple[Tensor, Tensor], **options: Any) -> nn.Module:
    """Run strategy ``name``; the result is always in eval mode with no gradients attached."""
    try:
        fn = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}") from None
    with torch.enable_grad():
        shrunk = fn(model, batch, **options)
    return shrunk.eval()
