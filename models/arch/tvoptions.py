"""The ``model`` options of the networks built from torchvision's blocks (:mod:`.tvnets`,
:mod:`.resnet56`), apart from them so that validating any config does not import torchvision."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from shrinkflow.models.architecture import ArchOptions

WidthMult = Annotated[float, Field(gt=0, le=4)]


class ResNet18Options(ArchOptions):
    arch: Literal["resnet18"] = "resnet18"
    width_mult: WidthMult = 1.0


class MobileNetV2Options(ArchOptions):
    arch: Literal["mobilenet_v2"] = "mobilenet_v2"
    width_mult: WidthMult = 1.0


class ResNet56Options(ArchOptions):
    arch: Literal["resnet56"] = "resnet56"
    width_mult: WidthMult = 1.0
