"""``int8``: post-training static int8 quantisation (see :mod:`models.quantize`)."""

from __future__ import annotations

from torch import nn

from models.quantize import Int8Net, quantize_int8
from models.registry import model_spec
from models.strategies.base import Batch, Strategy, StrategyOptions


def int8(model: nn.Module, batch: Batch) -> nn.Module:
    """Weights per channel, activations observed on the calibration batch; CPU only, never
    trained further."""
    spec = model_spec(model)
    return Int8Net(spec, qmodel=quantize_int8(model, spec, batch[0]))


STRATEGY = Strategy(
    "int8",
    int8,
    StrategyOptions,
    warm_start=True,
    trains=False,
    exclusive=True,
    changes_shapes=False,
    note="int8 kernels; params and FLOPs are those of the float network",
)
