"""``magnitude``: unstructured global magnitude pruning; shapes stay, weights become zeros."""

from __future__ import annotations

from torch import nn
from torch.nn.utils import prune

from shrinkflow.models.strategies.base import Batch, RatioOptions, Strategy


def _prunable_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def magnitude(model: nn.Module, batch: Batch, *, ratio: float) -> nn.Module:
    """Global unstructured L1 pruning of ``ratio`` of all conv/linear weights
    (``torch.nn.utils.prune``), made permanent: the zeros are plain weights, no masks or hooks."""
    targets = _prunable_weights(model)
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=ratio)
    for module, name in targets:
        prune.remove(module, name)
    return model


STRATEGY = Strategy(
    "magnitude",
    magnitude,
    RatioOptions,
    warm_start=True,
    keeps_zeros=True,
    changes_shapes=False,
    note="unstructured zeros: dense size, FLOPs and latency do not fall; see sparsity and compressed_bytes",
)
