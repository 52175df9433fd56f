"""``width``: the seed's AdjustedNet, the same architecture with every width cut, trained afresh."""

from __future__ import annotations

from torch import nn

from shrinkflow.models.registry import build_model, model_spec
from shrinkflow.models.strategies.base import Batch, RatioOptions, Strategy


def _scaled(widths: list[int], keep: float) -> list[int]:
    return [max(1, round(w * keep)) for w in widths]


def width(model: nn.Module, batch: Batch, *, ratio: float) -> nn.Module:
    """The same architecture with every width cut by ``ratio``, freshly initialised (the caller
    seeds the RNG)."""
    spec = model_spec(model)
    if "width_mult" in spec:  # torchvision nets: one multiplier; fresh widths, not pruned ones
        spec["width_mult"] *= 1 - ratio
        spec.pop("layers", None)
    else:
        spec["channels"] = _scaled(spec["channels"], 1 - ratio)
        spec["hidden"] = _scaled(spec["hidden"], 1 - ratio)
    return build_model(spec)


STRATEGY = Strategy("width", width, RatioOptions, warm_start=False, needs_parametric=True)
