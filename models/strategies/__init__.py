"""Shrink strategies by name. Every module here that defines ``STRATEGY`` (a
:class:`~shrinkflow.models.strategies.base.Strategy`) is one strategy; adding a file adds a strategy, and
the config, the pipeline and the tests pick it up from :data:`STRATEGIES`."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

import torch
from torch import nn

from shrinkflow.models.allocation import has_batch_norm, reestimate_batch_norm
from shrinkflow.models.strategies.base import Batch, Strategy


def _discover() -> dict[str, Strategy]:
    found = {}
    for module in pkgutil.iter_modules(__path__):
        strategy = getattr(importlib.import_module(f"{__name__}.{module.name}"), "STRATEGY", None)
        if isinstance(strategy, Strategy):
            found[strategy.name] = strategy
    return dict(sorted(found.items()))


STRATEGIES: dict[str, Strategy] = _discover()


# Images per forward pass when BatchNorm statistics are recomputed (as the sensitivity table's
# scorer does, so both give the same statistics for the same batch).
BN_BATCH = 64


def apply_strategy(name: str, model: nn.Module, batch: Batch, **options: Any) -> nn.Module:
    """Run strategy ``name``; the result is always in eval mode with no gradients attached. After a
    strategy that changes shapes, BatchNorm statistics are recomputed on the calibration batch
    (training images): the stored ones describe channels that were removed or merged, and a
    pruned MobileNetV3 scored with them is at chance."""
    try:
        strategy = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}") from None
    with torch.enable_grad():
        shrunk = strategy(model, batch, **options)
    shrunk.eval()
    if strategy.changes_shapes:  # only a removed channel or layer can leave a network that no longer runs
        _still_runs(name, shrunk, batch[0][:2])
        if has_batch_norm(shrunk):
            x = batch[0]
            reestimate_batch_norm(shrunk, [x[i : i + BN_BATCH].float() for i in range(0, len(x), BN_BATCH)])
    return shrunk


class ShrinkError(RuntimeError):
    """A strategy left a network that no longer runs (a layer it could not follow)."""


def _still_runs(name: str, model: nn.Module, x: torch.Tensor) -> None:
    """Run the shrunk network once; if it fails, say in one line which module (and op) broke, so
    the candidate fails alone with a reason rather than a traceback deep in torch."""
    active: list[str] = []  # the modules whose forward is running, innermost last
    names = {module: module_name for module_name, module in model.named_modules()}

    def enter(module: nn.Module, _inputs: object) -> None:
        active.append(names[module])

    def leave(*_: object) -> None:  # returns None: a forward hook's value would replace the output
        active.pop()

    hooks = [
        hook
        for m in model.modules()
        for hook in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))
    ]
    try:
        with torch.no_grad():
            model(x)
    except Exception as exc:
        where = active[-1] if active else ""
        kind = type(model.get_submodule(where)).__name__
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ShrinkError(
            f"{name} left the network unable to run: module {where!r} ({kind}) fails: {first}; "
            "torch-pruning cannot follow this layer's channels (add it to a custom pruner, or use "
            "another strategy)"
        ) from None
    finally:
        for hook in hooks:
            hook.remove()
