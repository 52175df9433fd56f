"""``lowrank``: linear layers factorised by truncated SVD, convolutions by Tucker-2 (see
:mod:`shrinkflow.models.lowrank`), starting from the baseline's weights; fine-tuning,
distillation and int8 follow as for any candidate. A pruned network can be factorised (a
registered pruned champion taken as the baseline); a factorised one is never pruned after."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Annotated, Any, ClassVar

from pydantic import Field, model_validator
from torch import nn

from shrinkflow.models.lowrank import (
    Factorisable,
    Ranks,
    Skipped,
    Survey,
    check_ranks,
    energy_ranks,
    factorise,
    layer_cost,
    ratio_ranks,
    survey,
)
from shrinkflow.models.strategies.base import Batch, RatioOptions, Strategy

log = logging.getLogger(__name__)

Rank = Annotated[int, Field(ge=1)]


class LowRankOptions(RatioOptions):
    """Each layer's rank from one of: ``ratio`` (the share of the layer's params removed),
    ``energy`` (the smallest rank keeping that share of its squared singular values; per channel
    mode for a k x k convolution) or ``ranks`` (``{layer name: rank}``, ``[r_in, r_out]`` for a
    k x k convolution; layers not named stay whole)."""

    energy: Annotated[float, Field(gt=0, lt=1)] | None = None
    ranks: Annotated[dict[str, Rank | tuple[Rank, Rank]], Field(min_length=1)] | None = None
    RATIO_ALTERNATIVES: ClassVar[tuple[str, ...]] = ("energy", "ranks")

    @model_validator(mode="after")
    def _one_rule(self) -> LowRankOptions:
        given = [k for k in ("ratio", "energy", "ranks") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"set one of ratio, energy and ranks, not {' and '.join(given)}")
        return self


# How a rule turns its value into one layer's ranks (explicit ranks are checked instead).
_RULES: dict[str, Callable[[nn.Module, Factorisable, Any], Ranks]] = {
    "ratio": lambda model, layer, ratio: ratio_ranks(layer, ratio),
    "energy": lambda model, layer, energy: energy_ranks(
        layer, model.get_submodule(layer.name).weight, energy
    ),
}


def _named(layers: tuple[Factorisable, ...], skipped: tuple[Skipped, ...], ranks: dict) -> dict[str, Ranks]:
    by_name, left = {layer.name: layer for layer in layers}, {s.name: s.reason for s in skipped}
    for name in ranks:
        if name in left:
            raise ValueError(f"ranks name {name!r}, which cannot be factorised: {left[name]}")
        if name not in by_name:
            shown = ", ".join(list(by_name)[:8]) + (", ..." if len(by_name) > 8 else "")
            raise ValueError(f"ranks name {name!r}, not a factorisable layer; the layers are {shown}")
    return {name: check_ranks(by_name[name], r) for name, r in ranks.items()}


def _chosen(
    model: nn.Module, found: Survey, ratio: float | None, energy: float | None, ranks: dict | None
) -> dict[str, Ranks]:
    if ranks is not None:
        return _named(found.layers, found.skipped, ranks)
    rules = {k: v for k, v in (("ratio", ratio), ("energy", energy)) if v is not None}
    if len(rules) != 1:
        raise ValueError("lowrank: give one of ratio, energy and ranks")
    ((rule, value),) = rules.items()
    return {layer.name: _RULES[rule](model, layer, value) for layer in found.layers}


def lowrank(
    model: nn.Module,
    batch: Batch,
    *,
    ratio: float | None = None,
    energy: float | None = None,
    ranks: dict[str, int | tuple[int, int]] | None = None,
) -> nn.Module:
    """Factorise every linear and ungrouped conv layer at the ranks ``ratio``, ``energy`` or
    ``ranks`` give, except where that would not lower both its params and its FLOPs (each layer
    left whole is logged with why). The classifier is factorised too; its outputs stay the
    classes."""
    found = survey(model, batch[0][:1])
    chosen = _chosen(model, found, ratio, energy, ranks)
    plan, skipped = {}, list(found.skipped)
    for layer in found.layers:
        if layer.name not in chosen:
            continue
        if layer_cost(layer, chosen[layer.name]).below(layer_cost(layer)):
            plan[layer.name] = chosen[layer.name]
        else:
            skipped.append(Skipped(layer.name, f"ranks {list(chosen[layer.name])} would not lower its cost"))
    for s in skipped:
        log.info("lowrank: %s left whole: %s", s.name, s.reason)
    log.info("lowrank: factorised %s", ", ".join(f"{n} at {list(r)}" for n, r in plan.items()) or "nothing")
    return factorise(model, plan)


STRATEGY = Strategy("lowrank", lowrank, LowRankOptions, warm_start=True, after_lowrank=True)
