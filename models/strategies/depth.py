"""``depth``: fewer layers or blocks; the survivors keep their trained weights."""

from __future__ import annotations

from torch import nn

from shrinkflow.models.registry import model_spec
from shrinkflow.models.strategies.base import Batch, RatioOptions, Strategy


def depth(model: nn.Module, batch: Batch, *, ratio: float) -> nn.Module:
    """Drop ``ratio`` of the removable layers/blocks (at least one): BaseNet's hidden layers then
    conv stages, a ResNet's or MobileNetV2's trailing blocks per stage; survivors keep weights."""
    removable = type(model).removable_blocks(model_spec(model))
    return model.shallower(min(removable, max(1, round(ratio * removable))))


STRATEGY = Strategy("depth", depth, RatioOptions, warm_start=True, needs_depth=True, needs_parametric=True)
