"""Every module here defines architectures (classes with an ``ARCH`` name, see
:class:`shrinkflow.models.architecture.Architecture`); :mod:`shrinkflow.models.registry` collects them."""

from __future__ import annotations

import importlib
import pkgutil

from torch import nn


def discover() -> dict[str, type[nn.Module]]:
    """``{arch name: class}`` for every architecture defined in this package's modules."""
    found: dict[str, type[nn.Module]] = {}
    for module in pkgutil.iter_modules(__path__):
        for obj in vars(importlib.import_module(f"{__name__}.{module.name}")).values():
            if isinstance(obj, type) and issubclass(obj, nn.Module) and "ARCH" in vars(obj):
                found[obj.ARCH] = obj
    return dict(sorted(found.items()))
