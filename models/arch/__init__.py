"""The architectures the pipeline builds, by name: each a class with an ``ARCH`` name and its
``Options`` (see :class:`shrinkflow.models.architecture.Architecture`).

The table is written out rather than discovered so that naming an architecture imports only its
module: torchvision loads torch._dynamo (about 2 s at every start of ``shrinkflow``), which a run
of BaseNet never needs. Every config validation needs all the options, so those live in modules
without torchvision. A new architecture is one line here.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping

from torch import nn

from shrinkflow.models.arch.basenet import BaseNetOptions
from shrinkflow.models.arch.given import FactoryOptions, TorchvisionOptions
from shrinkflow.models.arch.tvoptions import MobileNetV2Options, ResNet18Options, ResNet56Options
from shrinkflow.models.architecture import ArchOptions

# name -> (its options in params.yaml, "module:class" of the network in this package)
TABLE: dict[str, tuple[type[ArchOptions], str]] = {
    "basenet": (BaseNetOptions, "basenet:BaseNet"),
    "factory": (FactoryOptions, "given:FactoryNet"),
    "mobilenet_v2": (MobileNetV2Options, "tvnets:SmallMobileNetV2"),
    "resnet18": (ResNet18Options, "tvnets:SmallResNet"),
    "resnet56": (ResNet56Options, "resnet56:CifarResNet56"),
    "torchvision": (TorchvisionOptions, "given:TorchvisionNet"),
}
OPTIONS: dict[str, type[ArchOptions]] = {name: options for name, (options, _) in TABLE.items()}


class Architectures(Mapping[str, type[nn.Module]]):
    """``{arch name: class}``, each class imported when it is first looked up."""

    def __getitem__(self, name: str) -> type[nn.Module]:
        module, cls = TABLE[name][1].split(":")
        return getattr(importlib.import_module(f"{__name__}.{module}"), cls)

    def __iter__(self) -> Iterator[str]:
        return iter(TABLE)

    def __len__(self) -> int:
        return len(TABLE)
