"""``int8``: post-training static int8 quantisation through torchao's PT2E flow (see
:mod:`shrinkflow.models.quantize`). Smaller on disk (about 4x); on one CPU thread faster than float only at
large batches: at batch 1, what the pipeline measures and serves, it is slower."""

from __future__ import annotations

from torch import nn

from shrinkflow.models.quantize import Int8Net, quantize_int8
from shrinkflow.models.registry import model_spec
from shrinkflow.models.strategies.base import Batch, Strategy, StrategyOptions


def int8(model: nn.Module, batch: Batch) -> nn.Module:
    """Weights per channel, activations observed on the calibration batch; CPU only, never
    trained further. Compare its ``latency_ms`` with ``dense_twin(model)``'s before promoting."""
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
    note=(
        "oneDNN int8 kernels, 4x smaller; params and FLOPs are those of the float network; "
        "slower than float at batch 1 on one thread, faster at batch 64"
    ),
)
