"""Architectures by name, and the spec <-> module round trip used by every checkpoint."""

from __future__ import annotations

from typing import Any

from torch import nn

from models.basenet import BaseNet
from models.tvnets import SmallMobileNetV2, SmallResNet

# Each class declares OPTIONS (the model-config keys it reads), has_batch_norm(options) and
# removable_blocks(options), which config validation uses to refuse strategies up front.
ARCHITECTURES: dict[str, type[nn.Module]] = {
    "basenet": BaseNet,
    "resnet18": SmallResNet,
    "mobilenet_v2": SmallMobileNetV2,
}


def build_model(spec: dict[str, Any]) -> nn.Module:
    """Instantiate the architecture a spec names (``spec["arch"]``) with the rest as arguments;
    ``arch: int8`` wraps a float spec in its quantised form."""
    kwargs = dict(spec)
    arch = kwargs.pop("arch")
    if arch == "int8":
        from models.quantize import Int8Net

        return Int8Net(**kwargs)
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    for key in ("channels", "hidden", "blocks"):
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    return ARCHITECTURES[arch](**kwargs)


def model_spec(model: nn.Module) -> dict[str, Any]:
    """The spec that rebuilds ``model``'s exact shapes (JSON-serialisable primitives only)."""
    return model.spec()
