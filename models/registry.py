"""Architectures by name, and the spec <-> module round trip used by every checkpoint."""

from __future__ import annotations

from typing import Any

from torch import nn

from shrinkflow.models.arch import Architectures

ARCHITECTURES: Architectures = Architectures()


def build_model(spec: dict[str, Any]) -> nn.Module:
    """Instantiate the architecture a spec names (``spec["arch"]``) with the rest as arguments."""
    kwargs = dict(spec)
    arch = kwargs.pop("arch")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    for key in ("channels", "hidden", "blocks"):
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    return ARCHITECTURES[arch](**kwargs)


def model_spec(model: nn.Module) -> dict[str, Any]:
    """The spec that rebuilds ``model``'s exact shapes (JSON-serialisable primitives only)."""
    return model.spec()
