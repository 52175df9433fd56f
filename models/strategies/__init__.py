"""Shrink strategies by name. Every module here that defines ``STRATEGY`` (a
:class:`~shrinkflow.models.strategies.base.Strategy`) is one strategy; adding a file adds a strategy, and
the config, the pipeline and the tests pick it up from :data:`STRATEGIES`."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

import torch
from torch import nn

from shrinkflow.models.strategies.base import Batch, Strategy


def _discover() -> dict[str, Strategy]:
    found = {}
    for module in pkgutil.iter_modules(__path__):
        strategy = getattr(importlib.import_module(f"{__name__}.{module.name}"), "STRATEGY", None)
        if isinstance(strategy, Strategy):
            found[strategy.name] = strategy
    return dict(sorted(found.items()))


STRATEGIES: dict[str, Strategy] = _discover()


def apply_strategy(name: str, model: nn.Module, batch: Batch, **options: Any) -> nn.Module:
    """Run strategy ``name``; the result is always in eval mode with no gradients attached."""
    try:
        strategy = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}") from None
    with torch.enable_grad():
        shrunk = strategy(model, batch, **options)
    return shrunk.eval()
