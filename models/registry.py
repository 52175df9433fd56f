"""Architectures by name, and the spec <-> module round trip used by every checkpoint.

A factorised network (:mod:`shrinkflow.models.lowrank`) is described by its architecture's own
spec, read with each factorised layer standing in as the layer it replaced, plus the list of
factorised layers (``factorised``: name, kind, ranks). Building one builds the architecture
(pruned widths, or a replayed pruning history) and then swaps in empty factorised layers of those
ranks, so no architecture needs to know about factorisation.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from shrinkflow.models.arch import Architectures
from shrinkflow.models.lowrank import restore, standing_in

ARCHITECTURES: Architectures = Architectures()


def build_model(spec: dict[str, Any]) -> nn.Module:
    """Instantiate the architecture a spec names (``spec["arch"]``) with the rest as arguments,
    then the factorised layers it lists."""
    kwargs = dict(spec)
    arch = kwargs.pop("arch")
    factorised = kwargs.pop("factorised", [])
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    for key in ("channels", "hidden", "blocks"):
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    return restore(ARCHITECTURES[arch](**kwargs), factorised)


def model_spec(model: nn.Module) -> dict[str, Any]:
    """The spec that rebuilds ``model``'s exact shapes (JSON-serialisable primitives only)."""
    with standing_in(model) as factorised:
        spec = model.spec()
    return {**spec, "factorised": factorised} if factorised else spec
