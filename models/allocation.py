"""Per-layer widths and ranks allocated to budgets (issues #23, #31): which share of each
prunable group a structured pruner keeps, and at which rank each factorisable layer is then
factorised (:mod:`shrinkflow.models.lowrank`), so that the network costs at most ``keep`` of the
baseline's params, FLOPs or batch-1 latency, for every budget at once.

The pieces are pure torch and plain numbers, so they are tested on crafted nets:

- :func:`prunable_groups`: the groups torch-pruning's dependency graph finds (coupled layers
  together, e.g. every convolution feeding one residual sum), by the name of their root module.
- :class:`CostModel`: params and FLOPs of any width vector, read off the graph (each weight
  scales with the kept share of the group that prunes its outputs times that of the group that
  prunes its inputs, so it is exact for conv, linear and BatchNorm layers), a factorisable
  layer's change at any rank and widths (:class:`Wired`, exact from
  :func:`~shrinkflow.models.lowrank.layer_cost`), and batch-1 latency from per-group and
  per-rank lookup tables measured by :func:`measure_sensitivity` (additive, as NetAdapt).
- :func:`measure_sensitivity`: each group pruned alone at several ratios, and each factorisable
  layer factorised alone at several ranks, its validation loss and accuracy (after BatchNorm
  re-estimation, as EagleEye) and its cost.
- :func:`allocate`: a :class:`Problem` (the costs, the typed :class:`Request` and what the
  method needs) to an :class:`Allocation` record, by one of :data:`ALLOCATORS`: ``uniform`` (one
  ratio for all), ``global`` (channels ranked across groups), ``sensitivity`` (the least
  predicted loss on a grid of widths and, when asked, ranks: a multiple-choice knapsack with one
  row per budget solved exactly by HiGHS, see :class:`Knapsack`) or ``sample`` (EagleEye: random
  width vectors on the budgets, each scored, the best kept). The pipeline allocates first and
  then calls the strategies with the widths and ranks; nothing here calls back into it.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, Literal

import numpy as np
import torch
import torch_pruning as tp
from pydantic import BaseModel, ConfigDict, Field
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp
from torch import Tensor, nn

from shrinkflow.models.architecture import classifier_layers
from shrinkflow.models.lowrank import Factorisable, Ranks, layer_cost, survey

log = logging.getLogger(__name__)

Objective = Literal["params", "flops", "latency_ms"]
Widths = dict[str, int]  # root module name of a group -> channels it keeps
Prune = Callable[[nn.Module, Widths], nn.Module]  # prunes a model in place to these widths
RankPlan = dict[str, Ranks]  # factorised layer name -> its ranks ((r,), or (r_in, r_out) for Tucker-2)
Factor = Callable[[nn.Module, RankPlan], nn.Module]  # factorises a model in place at these ranks
Dim = tuple[str, str]  # one choice an allocation makes: ("width", group) or ("rank", layer)
Score = Callable[[nn.Module], tuple[float, float]]  # model -> (val loss, val accuracy %)

_EPS = 1e-6
_SMALL = 1e-3  # the least latency share the check asks for, and its divisions' floor


def round_kept(kept: int, width: int, multiple: int | None) -> int:
    """``kept`` to the nearest multiple of ``multiple`` (halves up), at least one multiple, never
    more than ``width``."""
    if multiple is None:
        return kept
    return min(width, max(multiple, multiple * math.floor(kept / multiple + 0.5)))


def _graph(model: nn.Module, example: Tensor) -> tuple[tp.pruner.BasePruner, dict[nn.Module, str]]:
    pruner = tp.pruner.BasePruner(
        model,
        example_inputs=example,
        importance=tp.importance.GroupMagnitudeImportance(p=1),
        pruning_ratio=0.0,
        ignored_layers=classifier_layers(model),
    )
    return pruner, {module: name for name, module in model.named_modules()}


def _groups(pruner: tp.pruner.BasePruner) -> list:
    return [
        g
        for g in pruner.DG.get_all_groups(
            ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types
        )
        if pruner._check_pruning_ratio(g)  # a one-channel layer: nothing to remove
    ]


def _width(module: nn.Module) -> int:
    return int(getattr(module, "out_channels", None) or module.out_features)


def prunable_groups(model: nn.Module, example: Tensor) -> Widths:
    """Every prunable group's root module name and width (its output channels or features)."""
    pruner, names = _graph(model, example)
    return {names[g[0].dep.target.module]: _width(g[0].dep.target.module) for g in _groups(pruner)}


def floors(widths: Widths, max_layer_ratio: float, round_to: int | None) -> Widths:
    """The fewest channels each group may keep: ``1 - max_layer_ratio`` of it, at least one."""
    low = {g: max(1, math.ceil(n * (1 - max_layer_ratio) - _EPS)) for g, n in widths.items()}
    if round_to is None:
        return low
    return {g: min(n, round_to * math.ceil(low[g] / round_to)) for g, n in widths.items()}


# The ranks a factorisable layer may be given beside its width: these shares of its maximum rank
# (each mode's, for a Tucker-2 convolution), plus whole. A level that would not lower the layer's
# params and FLOPs even at full width is never offered: pruning only makes a factorisation dearer
# against the whole layer, whose cost falls with both its widths.
RANK_SHARES = (0.5, 0.25, 0.125, 0.0625)


def rank_levels(layer: Factorisable, shares: tuple[float, ...] = RANK_SHARES) -> tuple[Ranks, ...]:
    """The ranks ``layer`` may be factorised at, largest first: ``shares`` of its maximum rank
    (at least 1), each cheaper than the whole layer in both params and FLOPs."""
    whole = layer_cost(layer)
    found = {tuple(max(1, round(m * share)) for m in layer.max_ranks) for share in shares}
    return tuple(sorted((r for r in found if layer_cost(layer, r).below(whole)), reverse=True))


@dataclass(frozen=True)
class Wired:
    """A factorisable layer (at the baseline's widths) and the groups that prune its outputs and
    its inputs (``None``: never pruned, e.g. the classes or the image's channels)."""

    layer: Factorisable
    out: str | None
    into: str | None

    def at(self, share: Mapping[str, float]) -> Factorisable:
        """The layer with the kept shares of its groups (its channels, or features, times each)."""
        return replace(
            self.layer,
            in_channels=round(self.layer.in_channels * (share[self.into] if self.into else 1.0)),
            out_channels=round(self.layer.out_channels * (share[self.out] if self.out else 1.0)),
        )

    def fits(self, share: Mapping[str, float], ranks: Ranks) -> bool:
        """Whether ``ranks`` are within what the kept widths allow and cheaper than the whole
        layer there (what the lowrank strategy factorises rather than leaves whole). A Tucker-2
        mode on a pruned side stays below its width: at the width it would drop its factor, a
        cost that changes with the width in a way the allocation's program does not model."""
        shaped = self.at(share)
        if any(r > m for r, m in zip(ranks, shaped.max_ranks, strict=True)):
            return False
        if shaped.kind == "tucker2" and (
            (self.into and ranks[0] >= shaped.in_channels) or (self.out and ranks[1] >= shaped.out_channels)
        ):
            return False
        return layer_cost(shaped, ranks).below(layer_cost(shaped))

    def change(self, objective: str, share: Mapping[str, float], ranks: Ranks) -> float:
        """What factorising at ``ranks`` adds to ``objective`` (params or FLOPs; negative: saves)
        at the kept shares."""
        shaped = self.at(share)
        return float(getattr(layer_cost(shaped, ranks), objective) - getattr(layer_cost(shaped), objective))


@dataclass
class CostModel:
    """Params, FLOPs and batch-1 latency of a width vector and, where ``ranks`` are given, of its
    factorised layers. ``terms``: per objective, rows of (baseline amount, group pruning the
    outputs, group pruning the inputs); ``latency``: per group, (kept fraction, measured ms)
    points, interpolated, summed as differences from the baseline's ``base_latency_ms``;
    ``layers``: the factorisable layers with their groups; ``rank_latency``: per layer, the ms
    measured at each rank (a difference from the baseline's, added as the groups' are)."""

    widths: Widths
    terms: dict[str, list[tuple[float, str | None, str | None]]]
    base_latency_ms: float | None = None
    latency: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    layers: dict[str, Wired] = field(default_factory=dict)
    rank_latency: dict[str, dict[Ranks, float]] = field(default_factory=dict)

    def shares(self, kept: Widths) -> dict[str, float]:
        return {g: kept.get(g, n) / n for g, n in self.widths.items()}

    def cost(self, objective: Objective, kept: Widths, ranks: RankPlan | None = None) -> float:
        share, ranks = self.shares(kept), ranks or {}
        if objective == "latency_ms":
            if self.base_latency_ms is None:
                raise ValueError("a latency_ms budget needs the measured per-group latency table")
            base = self.base_latency_ms
            return float(
                base
                + sum(_interp(share[g], pts) - base for g, pts in self.latency.items())
                + sum(self.rank_latency[name][tuple(r)] - base for name, r in ranks.items())
            )
        widths_only = sum(
            amount * (share[o] if o else 1.0) * (share[i] if i else 1.0)
            for amount, o, i in self.terms[objective]
        )
        return widths_only + sum(self.layers[n].change(objective, share, tuple(r)) for n, r in ranks.items())

    def fraction(self, objective: Objective, kept: Widths, ranks: RankPlan | None = None) -> float:
        """The cost of ``kept`` (and ``ranks``) as a share of the unpruned network's."""
        return self.cost(objective, kept, ranks) / self.cost(objective, self.widths)


def _interp(x: float, points: list[tuple[float, float]]) -> float:
    xs, ys = zip(*sorted(points), strict=True)
    return float(np.interp(x, xs, ys))


def cost_model(model: nn.Module, example: Tensor) -> CostModel:
    """Params and FLOPs (2 x multiply-accumulates of conv and linear layers, as torch's flop
    counter) of ``model`` at any widths of its prunable groups, and of its factorisable layers at
    any ranks."""
    pruner, names = _graph(model, example)
    out_of: dict[nn.Module, str] = {}
    in_of: dict[nn.Module, str] = {}
    widths: Widths = {}
    for group in _groups(pruner):
        root = names[group[0].dep.target.module]
        widths[root] = _width(group[0].dep.target.module)
        for item in group:
            side = out_of if item.dep.handler.__name__ == "prune_out_channels" else in_of
            side.setdefault(item.dep.target.module, root)
    macs = _macs(model, example)
    params, flops = [], []
    for module in model.modules():
        o, i = out_of.get(module), in_of.get(module)
        depthwise = getattr(module, "groups", 1) > 1
        for p in module.parameters(recurse=False):
            if p.dim() >= 2:
                params.append((float(p.numel()), o, None if depthwise else i))
            elif isinstance(module, nn.Conv2d | nn.Linear):  # a bias: one value per output
                params.append((float(p.numel()), o, None))
            else:  # a norm's scales: per channel, whichever side the graph prunes it from
                params.append((float(p.numel()), o or i, None))
        if module in macs:
            flops.append((2.0 * macs[module], o, None if depthwise else i))
    modules = dict(model.named_modules())
    layers = {
        layer.name: Wired(layer, out_of.get(modules[layer.name]), in_of.get(modules[layer.name]))
        for layer in survey(model, example).layers
    }
    return CostModel(widths, {"params": params, "flops": flops}, layers=layers)


def _macs(model: nn.Module, example: Tensor) -> dict[nn.Module, int]:
    found: dict[nn.Module, int] = {}

    def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            per_output = module.in_channels // module.groups * kh * kw
        else:
            per_output = module.in_features
        found[module] = found.get(module, 0) + output.numel() // output.shape[0] * per_output

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    try:
        with torch.inference_mode():
            model.eval()(example[:1])
    finally:
        for h in handles:
            h.remove()
    return found


# --- sensitivity -------------------------------------------------------------------------------


def has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def reestimate_batch_norm(model: nn.Module, batches: list[Tensor]) -> nn.Module:
    """Recompute BatchNorm running statistics of a pruned net as plain averages over ``batches``
    of training images (EagleEye's adaptive BN); other weights are untouched."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model
    saved = [(m, m.momentum) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    for x in batches:
        model(x)
    for m, momentum in saved:
        m.momentum = momentum
    return model.eval()


@torch.no_grad()
def loss_and_accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (%) of ``model`` on ``(x, y)``."""
    model.eval()
    loss, correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        logits = model(x[start : start + batch_size].float())
        target = y[start : start + batch_size]
        loss += float(nn.functional.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(1) == target).sum())
    return loss / max(len(x), 1), 100.0 * correct / max(len(x), 1)


@dataclass
class Sensitivity:
    """Each group pruned alone at each of ``ratios``: its kept channels and the pruned net's
    validation loss and accuracy and its params, FLOPs and batch-1 latency; ``base``: the same for
    the unpruned net; ``layers``: each factorisable layer factorised alone at each of its
    :func:`rank_levels` (``ranks``, largest first, and ``max_ranks``), measured alike (empty when
    no candidate allocates ranks). JSON-ready (``dataclasses.asdict``)."""

    ratios: list[float]
    base: dict[str, float]
    groups: dict[str, dict[str, list[float]]]
    layers: dict[str, dict[str, list[Any]]] = field(default_factory=dict)

    def predicted_loss(self, kept: Widths, widths: Widths, ranks: RankPlan | None = None) -> float:
        """Baseline loss plus each group's loss increase at its kept share and each factorised
        layer's at its ranks (additive)."""
        return (
            self.base["loss"]
            + sum(self._curve(g, "loss", kept.get(g, n) / n) - self.base["loss"] for g, n in widths.items())
            + sum(self.rank_loss(name)[tuple(r)] for name, r in (ranks or {}).items())
        )

    def _curve(self, group: str, key: str, share: float) -> float:
        row = self.groups[group]
        values = [self.base[key], *row[key]]
        if key == "loss":  # noise aside, pruning more never helps: make the curve monotone
            values = list(np.maximum.accumulate(values))
        shares = [1.0, *(k / row["width"][0] for k in row["kept"])]
        return _interp(share, list(zip(shares, values, strict=True)))

    def latency_points(self) -> dict[str, list[tuple[float, float]]]:
        """Per group, (kept share, ms) with latency made non-increasing as channels go."""
        points = {}
        for g, row in self.groups.items():
            ms = list(np.minimum.accumulate([self.base["latency_ms"], *row["latency_ms"]]))
            shares = [1.0, *(k / row["width"][0] for k in row["kept"])]
            points[g] = list(zip(shares, ms, strict=True))
        return points

    def rank_levels(self, layer: str) -> tuple[Ranks, ...]:
        """The ranks ``layer`` was measured at, largest first."""
        return tuple(tuple(r) for r in self.layers[layer]["ranks"])

    def rank_loss(self, layer: str) -> dict[Ranks, float]:
        """``layer``'s validation loss increase at each measured rank, made non-decreasing as the
        rank falls (noise aside, a lower rank never helps)."""
        row = self.layers[layer]
        values = np.maximum.accumulate([self.base["loss"], *row["loss"]])[1:] - self.base["loss"]
        return dict(zip(self.rank_levels(layer), values.tolist(), strict=True))

    def rank_latency(self) -> dict[str, dict[Ranks, float]]:
        """Per factorisable layer, the ms measured at each rank: as measured, since a factorised
        layer can run slower than the whole one (three small products for one)."""
        return {
            name: dict(zip(self.rank_levels(name), row["latency_ms"], strict=True))
            for name, row in self.layers.items()
        }


def interleaved_ms(
    models: list[nn.Module], time_one: Callable[[nn.Module], float], rounds: int
) -> list[float]:
    """Each of ``models`` timed once per round by ``time_one``, all in turn and the order reversed
    every other round, the fastest round kept: a load that comes and goes hits every model alike,
    and the minimum is what the model costs when nothing else runs."""
    best = [math.inf] * len(models)
    for r in range(rounds):
        order = range(len(models)) if r % 2 == 0 else reversed(range(len(models)))
        for i in order:
            best[i] = min(best[i], time_one(models[i]))
    return best


def measure_sensitivity(
    model: nn.Module,
    example: Tensor,
    prune: Prune,
    score: Score,
    latency: Callable[[list[nn.Module]], list[float]],
    ratios: tuple[float, ...],
    factor: Factor | None = None,
    rank_shares: tuple[float, ...] = (),
) -> Sensitivity:
    """Prune each group alone (a copy of ``model``) at each ratio and, with ``factor``, factorise
    each factorisable layer alone at each of its :func:`rank_levels` of ``rank_shares``, and
    measure every copy: ``score`` (which re-estimates BatchNorm where there is any) and
    ``latency``, which times a list of models together (ms at batch 1, see
    :func:`interleaved_ms`): per group or layer, the unchanged model first and its copies after
    it. Each copy's latency is kept as its ratio to the unchanged model timed in the same rounds,
    times the fastest unchanged figure of all, so a load that changes between groups does not
    tilt one group against another."""
    costs = cost_model(model, example)
    loss, acc = score(copy.deepcopy(model))
    base = {"loss": loss, "acc": acc, **{o: costs.cost(o, costs.widths) for o in ("params", "flops")}}
    rows, base_ms, relative = {}, [], {}
    for g, n in costs.widths.items():
        kept = [max(1, math.floor(n * (1 - r) + _EPS)) for r in ratios]
        rows[g] = {"width": [n] * len(kept), "kept": kept}
        copies = [prune(copy.deepcopy(model), {g: k}) for k in kept]
        plans = [({g: k}, {}) for k in kept]
        base_ms.append(
            _measured(rows[g], relative, ("width", g), model, copies, plans, costs, score, latency)
        )
    layers = {}
    for name, wired in costs.layers.items() if factor is not None else ():
        levels = rank_levels(wired.layer, rank_shares)
        if not levels:
            continue
        layers[name] = {"max_ranks": list(wired.layer.max_ranks), "ranks": [list(r) for r in levels]}
        copies = [factor(copy.deepcopy(model), {name: r}) for r in levels]
        plans = [({}, {name: r}) for r in levels]
        base_ms.append(
            _measured(layers[name], relative, ("rank", name), model, copies, plans, costs, score, latency)
        )
    base["latency_ms"] = min(base_ms) if base_ms else latency([model])[0]
    measured = {("width", g): row for g, row in rows.items()} | {
        ("rank", n): row for n, row in layers.items()
    }
    for label, row in measured.items():
        row["latency_ms"] = [base["latency_ms"] * share for share in relative[label]]
    return Sensitivity(list(ratios), base, rows, layers)


def _measured(
    row: dict[str, list],
    relative: dict[Dim, list[float]],
    label: Dim,
    model: nn.Module,
    copies: list[nn.Module],
    plans: list[tuple[Widths, RankPlan]],
    costs: CostModel,
    score: Score,
    latency: Callable[[list[nn.Module]], list[float]],
) -> float:
    """Fill ``row`` with each copy's validation loss and accuracy and its params and FLOPs (from
    its plan: widths and ranks), time the copies after ``model`` and keep each one's share of its
    time in ``relative[label]``; returns ``model``'s ms in those rounds."""
    scored = [score(c) for c in copies]
    row["loss"], row["acc"] = [s[0] for s in scored], [s[1] for s in scored]
    for objective in ("params", "flops"):
        row[objective] = [costs.cost(objective, widths, ranks) for widths, ranks in plans]
    timed = latency([model, *(c.eval() for c in copies)])
    relative[label] = [ms / timed[0] for ms in timed[1:]]
    return timed[0]


def with_latency(costs: CostModel, sensitivity: Sensitivity) -> CostModel:
    """``costs`` with the latency lookup tables of ``sensitivity`` (per group, per rank)."""
    return replace(
        costs,
        base_latency_ms=sensitivity.base["latency_ms"],
        latency=sensitivity.latency_points(),
        rank_latency=sensitivity.rank_latency(),
    )


# --- allocation ---------------------------------------------------------------------------------


class Budget(BaseModel):
    """Keep ``keep`` of the baseline's ``objective`` (``None`` when a search sets it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    objective: Objective = "params"
    keep: Annotated[float, Field(gt=0, lt=1)] | None = None


@dataclass(frozen=True)
class Request:
    """What a candidate asks of an allocator, typed: ``method`` (a name in :data:`ALLOCATORS`),
    the ``budgets`` that must all hold (each with its ``keep``), the floors (no group gives up
    more than ``max_layer_ratio`` of its channels), ``round_to`` (kept channels rounded to the
    nearest multiple), the ``samples`` and ``seed`` of a ``sample`` allocation, and ``ranks``:
    whether each factorisable layer's rank is allocated beside the widths (``sensitivity``)."""

    method: str
    budgets: tuple[Budget, ...]
    max_layer_ratio: float = 0.9
    round_to: int | None = None
    samples: int = 16
    seed: int = 0
    ranks: bool = False

    def keep(self, objective: Objective) -> float | None:
        """The share of ``objective`` a budget keeps, or ``None`` when no budget names it."""
        return next((b.keep for b in self.budgets if b.objective == objective), None)

    def with_keep(self, objective: Objective, keep: float) -> Request:
        """The same request with ``objective``'s budget keeping ``keep``."""
        budgets = tuple(
            b.model_copy(update={"keep": keep}) if b.objective == objective else b for b in self.budgets
        )
        return replace(self, budgets=budgets)


@dataclass(frozen=True)
class Problem:
    """Everything an allocator reads: the baseline's ``costs``, the ``request``, and what some
    allocations need besides: the measured sensitivity ``table`` (``sensitivity``), the channels'
    importance ``scores`` by group (``global``), and ``evaluate(widths) -> (val loss, val acc)``,
    which prunes a copy to ``widths`` and scores it (``sample``)."""

    costs: CostModel
    request: Request
    table: Sensitivity | None = None
    scores: Mapping[str, Tensor] | None = None
    evaluate: Callable[[Widths], tuple[float, float]] | None = None

    @property
    def low(self) -> Widths:
        """The fewest channels each group may keep."""
        return floors(self.costs.widths, self.request.max_layer_ratio, self.request.round_to)

    @property
    def rank_choices(self) -> dict[str, tuple[Ranks, ...]]:
        """Per factorisable layer, the ranks it may take besides whole: those the table measured
        (none unless the request asks for ranks); under a latency budget, none that measured
        slower than the whole network, so a layer too small to gain is never factorised."""
        if not self.request.ranks or self.table is None:
            return {}
        timed, base = self.request.keep("latency_ms") is not None, self.table.base["latency_ms"]
        found = {}
        for name, ms in self.table.rank_latency().items():
            levels = tuple(r for r in ms if name in self.costs.layers and not (timed and ms[r] > base))
            if levels:
                found[name] = levels
        return found

    def limit(self, budget: Budget) -> float:
        """``budget`` in its objective's units (params, FLOPs, ms)."""
        return budget.keep * self.costs.cost(budget.objective, self.costs.widths)

    def meets(self, widths: Widths, ranks: RankPlan | None = None) -> bool:
        """Whether ``widths`` (and the layers factorised at ``ranks``) hold every budget."""
        return all(self.costs.cost(b.objective, widths, ranks) <= self.limit(b) for b in self.request.budgets)

    def fitting(self, widths: Widths, ranks: RankPlan) -> RankPlan:
        """``ranks`` less those the kept ``widths`` no longer allow (or where whole is cheaper)."""
        share = self.costs.shares(widths)
        return {n: r for n, r in ranks.items() if self.costs.layers[n].fits(share, tuple(r))}

    def least(self, objective: Objective) -> float | None:
        """The least share of ``objective`` within reach: every group at its floor; with ranks, a
        bound below it for latency (each layer at its fastest rank, whatever the widths allow),
        and none for params or FLOPs (which rank fits depends on the widths: the solver says)."""
        low = self.low
        if not self.rank_choices:
            return self.costs.fraction(objective, low)
        if objective != "latency_ms":
            return None
        base, gains = self.costs.base_latency_ms, 0.0
        for name, levels in self.rank_choices.items():
            gains += min(0.0, *(self.costs.rank_latency[name][r] - base for r in levels))
        return (self.costs.cost(objective, low) + gains) / self.costs.cost(objective, self.costs.widths)


@dataclass(frozen=True)
class Pick:
    """What an allocator chose: the ``widths``, the ``ranks`` of the layers it factorises, and
    (``sample``) every scored vector."""

    widths: Widths
    samples: tuple[dict[str, Any], ...] = ()
    ranks: RankPlan = field(default_factory=dict)


@dataclass(frozen=True)
class LatencyStep:
    """One measurement of the latency check: how the widths were reached (``table``: allocated
    from the lookup table asked for ``asked``; ``shrink``: every group narrowed), the share the
    table predicted, and the share measured against the baseline (``baseline_ms``)."""

    by: str
    asked: float
    predicted: float
    measured: float
    baseline_ms: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "by": self.by,
            "asked": round(self.asked, 4),
            "predicted": self.predicted,
            "measured": round(self.measured, 4),
        }


@dataclass(frozen=True)
class LatencyCheck:
    """A latency budget's measured check: the ``budget``, whether it was ``met`` (within the
    timer's noise) and every step, in order; the last step measured the widths kept."""

    budget: float
    met: bool
    steps: tuple[LatencyStep, ...]

    def as_dict(self, predicted: float) -> dict[str, Any]:
        last = self.steps[-1]
        return {
            "budget": self.budget,
            "predicted_ratio": predicted,
            "measured_ratio": round(last.measured, 4),
            "baseline_ms": round(last.baseline_ms, 4),
            "met": self.met,
            "steps": [s.as_dict() for s in self.steps],
        }


@dataclass(frozen=True)
class Allocation:
    """What :func:`allocate` chose: ``widths`` per group, the cost share it predicts for each
    objective, the predicted validation loss (sensitivity table), for ``sample`` every sampled
    vector's score, for a latency budget the check that measured it (a new record per step: a
    decided allocation is never changed), and the ``ranks`` of the layers it factorises after
    pruning (empty unless ranks were allocated)."""

    method: str
    widths: Widths
    cost: dict[str, float]
    predicted_loss: float | None = None
    samples: tuple[dict[str, Any], ...] = ()
    latency: LatencyCheck | None = None
    ranks: RankPlan = field(default_factory=dict)


def _uniform(problem: Problem) -> Pick:
    """One share for every group: the smallest ratio that holds the budgets."""
    costs, low, round_to = problem.costs, problem.low, problem.request.round_to

    def at(ratio: float) -> Widths:
        return {
            g: max(low[g], round_kept(max(1, math.floor(n * (1 - ratio) + _EPS)), n, round_to))
            for g, n in costs.widths.items()
        }

    return Pick(at(_smallest(lambda r: problem.meets(at(r)), 0.0, 1.0)))


def _smallest(ok: Callable[[float], bool], lo: float, hi: float) -> float:
    """The smallest ``t`` in ``[lo, hi]`` with ``ok(t)`` (monotone), to 1e-7."""
    if ok(lo):
        return lo
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
        if hi - lo < 1e-7:
            break
    return hi


def global_plan(
    scores: Mapping[Any, Tensor], original: Mapping[Any, int], keep: float, low: Mapping[Any, int]
) -> dict[Any, int]:
    """Channels each group keeps when ``keep`` of all channels survive, lowest scores across
    groups removed first, no group below its floor ``low``."""
    width = {m: len(s) for m, s in scores.items()}
    to_remove = sum(width.values()) - math.floor(sum(original[m] for m in scores) * keep + _EPS)
    kept = dict(width)
    modules = list(scores)
    owner = torch.cat([torch.full((width[m],), i) for i, m in enumerate(modules)])
    order = torch.argsort(torch.cat([scores[m] for m in modules]), stable=True)
    for i in owner[order].tolist():  # lowest score first; a group at its floor gives no more
        if to_remove <= 0:
            break
        m = modules[i]
        if kept[m] > low[m]:
            kept[m] -= 1
            to_remove -= 1
    return kept


def _global(problem: Problem) -> Pick:
    """Channels ranked across groups by their importance: the smallest share of all channels
    dropped that holds the budgets."""
    if problem.scores is None:
        raise ValueError("global allocation needs the channels' importance scores")
    costs, low, round_to = problem.costs, problem.low, problem.request.round_to

    def at(drop: float) -> Widths:
        plan = global_plan(problem.scores, costs.widths, 1 - drop, low)
        return {g: max(low[g], round_kept(k, costs.widths[g], round_to)) for g, k in plan.items()}

    return Pick(at(_smallest(lambda d: problem.meets(at(d)), 0.0, 1.0)))


def _random_vectors(problem: Problem) -> list[Widths]:
    """``samples`` random width vectors on the budgets: each group's share falls at its own
    random rate ``u_g`` (``1 - t * u_g``, clipped at its floor), ``t`` the smallest that meets
    them."""
    costs, low, request = problem.costs, problem.low, problem.request
    gen = torch.Generator().manual_seed(request.seed)
    vectors = []
    for _ in range(request.samples):
        u = torch.rand(len(costs.widths), generator=gen).clamp_min(0.05).tolist()

        def at(t: float, u: list[float] = u) -> Widths:
            return {
                g: max(low[g], round_kept(max(1, math.floor(n * (1 - t * ug) + _EPS)), n, request.round_to))
                for (g, n), ug in zip(costs.widths.items(), u, strict=True)
            }

        vectors.append(at(_smallest(lambda t, at=at: problem.meets(at(t)), 0.0, 1 / min(u))))
    return vectors


def _sample(problem: Problem) -> Pick:
    """EagleEye: random width vectors on the budgets, each scored, the lowest loss kept."""
    if problem.evaluate is None:
        raise ValueError("sample allocation needs an evaluate(widths) to score each vector")
    found = []
    for vector in _random_vectors(problem):
        loss, acc = problem.evaluate(vector)
        found.append({"widths": vector, "loss": loss, "acc": acc})
    return Pick(min(found, key=lambda s: s["loss"])["widths"], tuple(found))


# --- the sensitivity allocation: a multiple-choice knapsack --------------------------------------

# Each group chooses one of GRID evenly spaced widths (every width of a group at most GRID wide),
# its measured points, its floor or its whole width: 740 binaries and 21,044 variables on
# ResNet-56, solved in 1-4 s of CPU for one to three budgets (16 solved in 1-3 s but lost
# predicted loss to the greedy it replaced on BaseNet's 32-wide first layer).
GRID = 32
# The objective in units of 1e-4 nats of predicted loss, plus a tie-break that keeps more of each
# group among allocations of equal predicted loss (a flat curve): TIE per group's whole width, so
# all of it is worth less than 1e-5 nats on a network of a few dozen groups, and one channel of a
# 1,024-wide group still weighs more than HiGHS's absolute gap (1e-6).
LOSS_SCALE, TIE = 1e4, 1e-2
# Budget rows are shares of the baseline's cost; HiGHS holds a row to within 1e-7, so each row
# is asked for this much less than its budget and the answer is then checked exactly.
ROW_SLACK = 1e-6
SOLVE_SECONDS = 120.0
# With ranks beside the widths, each factorised layer adds a block per rank level and width pair,
# and the program grows with the grid squared: on ResNet-56 (30 groups, 58 layers) 107,914
# variables at 32 widths a group were not solved within 120 s (21-23% gap), 43,178 at 16 neither
# (21%), and 15,318 at 8 were solved to optimality in 4 s, better than either's best. So the
# joint program takes the finest grid of GRID, GRID/2, ... that keeps it within JOINT_VARIABLES
# (CIFAR BaseNet: 32, 6,383 variables, solved in 1-3 s), and HiGHS's presolve, which spent
# minutes on the larger ones, is off for it.
JOINT_VARIABLES = 20_000


def choices(n: int, low: int, round_to: int | None, measured: list[int], grid: int = GRID) -> tuple[int, ...]:
    """The widths a group of ``n`` channels may take, widest first: every one from its floor
    ``low`` when ``n <= grid``, else ``n * j / grid``, its ``measured`` points and its floor, each
    rounded to ``round_to``; always its whole width."""
    wanted = range(low, n + 1) if n <= grid else {low, *measured, *(round(n * j / grid) for j in range(grid))}
    rounded = {round_kept(max(1, k), n, round_to) for k in wanted}
    return tuple(sorted({n, *(k for k in rounded if low <= k <= n)}, reverse=True))


Key = tuple[Dim, ...]  # a block of variables: one dimension's levels, or the product of several


@dataclass(frozen=True)
class Knapsack:
    """The sensitivity allocation as a mixed-integer program, every row a share of the baseline's
    cost.

    One binary ``x[g, l]`` per group ``g`` and width level ``l`` (exactly one per group) and, when
    ranks are allocated, one binary ``z[L, k]`` per factorisable layer ``L`` and rank level ``k``
    (whole first; exactly one per layer). A layer whose outputs group ``a`` prunes and whose inputs
    group ``b`` prunes costs ``amount * s_a * s_b`` whole (``s``: a group's kept share), bilinear
    in two choices; one continuous ``y[a, l, b, m]`` per pair of their levels stands for ``x[a, l]
    * x[b, m]``, tied to them by ``sum_m y[a, l, b, m] = x[a, l]`` and ``sum_l y[a, l, b, m] = x[b,
    m]``, which with binary ``x`` leave only the product (the one plan with one-hot marginals).

    Factorised at rank ``r``, the layer's weights cost ``r * (in * s_b + out * s_a)`` (a linear
    layer; a Tucker-2 convolution adds its core), linear in the products ``z[L, k] * x[b, m]`` and
    ``z[L, k] * x[a, l]``, tied to their marginals the same way; and its whole cost is then lost: a
    product of the layer being factorised (``f[L] = 1 - z[L, 0]``) and both widths, one variable
    per triple of their levels tied to all three marginals (which with binary choices leave only
    the product, as for two). A rank is allowed only where the kept widths allow it (``upper`` is
    0 on its products with widths that do not) and only where it is cheaper than whole in both
    params and FLOPs (a row per rank level and objective: what the lowrank strategy factorises
    rather than leaves whole). Params and FLOPs are then linear and exact; latency (the lookup
    tables, additive) and the predicted loss are linear in ``x`` and ``z``. One row per budget."""

    choices: dict[Dim, tuple[Any, ...]]  # per dimension its levels: widths, ranks (None: whole), f
    columns: dict[Key, int]  # where each block of variables starts
    size: int
    objective: np.ndarray
    rows: dict[str, np.ndarray]  # per budget objective, the coefficients of its share
    constants: dict[str, float]  # per budget objective, the share no choice changes
    equalities: Any  # scipy.sparse matrix: one level per dimension, the blocks' marginals, f's
    equal_to: np.ndarray
    inequalities: Any  # scipy.sparse matrix: each rank cheaper than whole
    at_most: np.ndarray
    upper: np.ndarray  # each variable's upper bound: 0 for a rank beyond a kept width

    @property
    def levels(self) -> dict[str, tuple[int, ...]]:
        """Per group, the widths it may take."""
        return {name: lv for (kind, name), lv in self.choices.items() if kind == "width"}

    def vector(self, widths: Mapping[str, int], ranks: Mapping[str, Ranks] | None = None) -> np.ndarray:
        """The variables of ``widths`` and ``ranks`` (each dimension's level one-hot, each block
        the product of its dimensions')."""
        ranks = {n: tuple(r) for n, r in (ranks or {}).items()}
        picked = {
            (kind, n): widths[n] if kind == "width" else ranks.get(n) if kind == "rank" else n in ranks
            for kind, n in self.choices
        }
        at = {dim: self.choices[dim].index(picked[dim]) for dim in self.choices}
        v = np.zeros(self.size)
        for key, start in self.columns.items():
            shape = tuple(len(self.choices[d]) for d in key)
            v[start + int(np.ravel_multi_index(tuple(at[d] for d in key), shape))] = 1.0
        return v

    def share(
        self, objective: str, widths: Mapping[str, int], ranks: Mapping[str, Ranks] | None = None
    ) -> float:
        """What the program's row says ``widths`` and ``ranks`` cost, as a share of the baseline's."""
        return float(self.constants[objective] + self.rows[objective] @ self.vector(widths, ranks))

    def chosen(self, v: np.ndarray) -> tuple[Widths, RankPlan]:
        """The widths and the ranks of the factorised layers a solution ``v`` chose."""
        picked = {
            dim: lv[int(np.argmax(v[self.columns[(dim,)] : self.columns[(dim,)] + len(lv)]))]
            for dim, lv in self.choices.items()
        }
        widths = {name: k for (kind, name), k in picked.items() if kind == "width"}
        return widths, {name: r for (kind, name), r in picked.items() if kind == "rank" and r is not None}


@dataclass(frozen=True)
class _Terms:
    """Linear terms over blocks of variables (per block, coefficients of its shape) and a constant."""

    blocks: dict[Key, np.ndarray] = field(default_factory=dict)
    constant: float = 0.0

    def plus(self, key: Key | None, coefficients: np.ndarray | float) -> _Terms:
        """These terms and ``coefficients`` on block ``key`` (``None``: a constant)."""
        if key is None:
            return replace(self, constant=self.constant + float(coefficients))
        blocks = dict(self.blocks)
        blocks[key] = blocks[key] + coefficients if key in blocks else np.asarray(coefficients, float)
        return replace(self, blocks=blocks)

    def times(self, factor: float) -> _Terms:
        return _Terms({key: factor * c for key, c in self.blocks.items()}, factor * self.constant)

    def minus(self, other: _Terms) -> _Terms:
        found = self.plus(None, -other.constant)
        for key, coefficients in other.blocks.items():
            found = found.plus(key, -coefficients)
        return found


def knapsack(problem: Problem, grid: int = GRID) -> Knapsack:
    """:class:`Knapsack` of ``problem`` on a ``grid`` of widths: its groups' width levels and its
    layers' rank levels, the predicted loss as the objective, one row per budget and one per rank
    that must be cheaper than whole."""
    costs, table, low = problem.costs, problem.table, problem.low
    measured = {g: list(row["kept"]) for g, row in table.groups.items()}
    options: dict[Dim, tuple[Any, ...]] = {
        ("width", g): choices(n, low[g], problem.request.round_to, measured.get(g, []), grid)
        for g, n in costs.widths.items()
    }
    options |= {("rank", name): (None, *levels) for name, levels in problem.rank_choices.items()}
    shares = {g: np.array(options[("width", g)]) / n for g, n in costs.widths.items()}
    full = {o: costs.cost(o, costs.widths) for o in ("params", "flops")}
    layers = [
        _Layer.of(costs.layers[n], options[("rank", n)], shares, full)
        for k, n in list(options)
        if k == "rank"
    ]
    options |= {("factorised", layer.name): (False, True) for layer in layers if layer.paired}
    budgets = {
        b.objective: _budget_row(problem, b.objective, options, shares, layers)
        for b in problem.request.budgets
    }
    limits = [row for layer in layers for row in layer.below()]
    columns, size = _columns(options, [*budgets.values(), *(t for t, _ in limits)])
    upper = np.ones(size)
    for key, allowed in ((k, a) for layer in layers for k, a in layer.upper.items()):
        upper[columns[key] : columns[key] + allowed.size] = allowed.ravel()
    objective = np.zeros(size)
    for dim, loss in _losses(problem, options, shares).items():
        objective[columns[(dim,)] : columns[(dim,)] + len(loss)] = loss
    return Knapsack(
        options,
        columns,
        size,
        objective,
        {o: _sparse_rows([t], columns, size).toarray()[0] for o, t in budgets.items()},
        {o: t.constant for o, t in budgets.items()},
        *_equalities(options, columns, size),
        _sparse_rows([t for t, _ in limits], columns, size),
        np.array([bound - t.constant for t, bound in limits]),
        upper,
    )


def _columns(options: dict[Dim, tuple], terms: list[_Terms]) -> tuple[dict[Key, int], int]:
    """Where each block's variables start: every dimension's own first, then every block the
    ``terms`` use; and how many variables there are."""
    keys = dict.fromkeys([(dim,) for dim in options] + [key for t in terms for key in t.blocks])
    columns, size = {}, 0
    for key in keys:
        columns[key] = size
        size += math.prod(len(options[d]) for d in key)
    return columns, size


def _sparse_rows(rows: list[_Terms], columns: dict[Key, int], size: int) -> sparse.csr_array:
    """``rows`` (their blocks; constants aside) as a sparse matrix over the program's variables."""
    at, cols, vals = [np.zeros(0, int)], [np.zeros(0, int)], [np.zeros(0)]
    for i, terms in enumerate(rows):
        for key, coefficients in terms.blocks.items():
            nonzero = np.flatnonzero(coefficients.ravel())
            at.append(np.full(nonzero.size, i))
            cols.append(columns[key] + nonzero)
            vals.append(coefficients.ravel()[nonzero])
    matrix = (np.concatenate(vals), (np.concatenate(at), np.concatenate(cols)))
    return sparse.csr_array(matrix, shape=(len(rows), size))


def _whole_weights(shaped: Factorisable, objective: str) -> float:
    """What ``shaped``'s weights (its bias aside) cost whole, in params or FLOPs."""
    bias = shaped.out_channels if shaped.bias and objective == "params" else 0
    return float(getattr(layer_cost(shaped), objective) - bias)


def _on_groups(out: str | None, into: str | None, matrix: np.ndarray) -> tuple[Key | None, np.ndarray]:
    """``matrix`` (output levels by input levels) as coefficients of the block its groups make:
    a pair, one group, or (neither) a constant."""
    if out and into and out != into:
        key = tuple(sorted((("width", out), ("width", into))))
        return key, matrix if key[0][1] == out else matrix.T
    if out:
        return (("width", out),), np.diag(matrix) if out == into else matrix[:, 0]
    if into:
        return (("width", into),), matrix[0, :]
    return None, matrix[0, 0]


@dataclass(frozen=True)
class _Layer:
    """One factorisable layer in the program, in shares of the baseline's cost, per objective:
    its weights ``whole`` (over its groups' block), ``split`` (factorised, over its rank's
    products with each of its groups; whole, the first rank level, costs nothing there) and
    ``lost`` (the whole cost it no longer has when factorised, over its rank's products with its
    group, or the factorised-by-widths triple where two groups prune it: ``paired``); ``upper``
    (0 where a rank is beyond a kept width) and ``margin`` (how much cheaper than whole a rank must
    be: half a unit, or a millionth of the layer where that is beyond the solver's tolerance)."""

    name: str
    ranks: int  # how many rank levels, whole included
    paired: bool
    whole: dict[str, _Terms]
    split: dict[str, _Terms]
    lost: dict[str, _Terms]
    upper: dict[Key, np.ndarray]
    margin: dict[str, float]
    most: dict[str, float]  # its weights whole at full width

    @classmethod
    def of(cls, wired: Wired, levels: tuple, shares: dict[str, np.ndarray], full: dict[str, float]) -> _Layer:
        layer, out, into = wired.layer, wired.out, wired.into
        cin = np.rint(layer.in_channels * shares[into]) if into else np.array([float(layer.in_channels)])
        cout = np.rint(layer.out_channels * shares[out]) if out else np.array([float(layer.out_channels)])
        parts, paired = _split_parts(layer, levels, cin, cout), bool(out and into and out != into)
        terms = {o: _layer_terms(wired, levels, parts, np.outer(cout, cin), o, full[o]) for o in full}
        most = {o: _whole_weights(layer, o) / full[o] for o in full}
        upper, rank = {}, ("rank", layer.name)
        for side, group in (("in", into), ("out", out)):
            if group:
                upper[(rank, ("width", group))] = (
                    upper.get((rank, ("width", group)), 1.0) * parts[f"{side}_fits"]
                )
        return cls(
            layer.name,
            len(levels),
            paired,
            *({o: t[i] for o, t in terms.items()} for i in range(3)),
            upper,
            {o: max(0.5 / full[o], 1e-6 * most[o]) for o in full},
            most,
        )

    def below(self) -> list[tuple[_Terms, float]]:
        """Rows ``terms <= bound``: at each rank, its weights cost less than whole, in params and
        in FLOPs, by the margin (zero rows unless that rank is chosen)."""
        rank, rows = ("rank", self.name), []
        for o in ("params", "flops"):
            for level in range(1, self.ranks):
                at_level = _Terms({key: _only(c, level) for key, c in self.split[o].blocks.items()})
                at_level = at_level.plus((rank,), self.margin[o] * np.eye(self.ranks)[level])
                # In units of the layer's whole cost: a small layer's row is not lost in tolerances.
                rows.append((at_level.minus(self.whole[o]).times(1 / self.most[o]), 0.0))
        return rows


def _layer_terms(
    wired: Wired,
    levels: tuple,
    parts: dict[str, np.ndarray],
    channels: np.ndarray,
    objective: str,
    full: float,
) -> tuple[_Terms, _Terms, _Terms]:
    """A factorisable layer's ``whole``, ``split`` and ``lost`` terms for ``objective``, from its
    weights' channels (output levels by input levels) and the ``parts`` of its factorisations."""
    layer, out, into, rank = wired.layer, wired.out, wired.into, ("rank", wired.layer.name)
    if objective == "params":
        per = {"in": 1.0, "out": 1.0}
    else:  # only a Tucker-2 layer's first 1x1 factor runs before the stride, at the input's positions
        per = {"in": 2.0 * (layer.in_positions if layer.kind == "tucker2" else layer.out_positions)}
        per["out"] = 2.0 * layer.out_positions
    key, amounts = _on_groups(out, into, per["out"] * np.prod(layer.kernel) * channels / full)
    split = _Terms().plus((rank,), per["out"] * parts["core"] / full)
    for side, group in (("in", into), ("out", out)):
        coefficients = per[side] * parts[side] / full
        split = split.plus(
            *((rank, ("width", group)), coefficients) if group else ((rank,), coefficients[:, 0])
        )
    if out and into and out != into:
        lost = _Terms({(("factorised", layer.name), *key): np.stack([0 * amounts, amounts])})
    else:
        lost = _Terms().plus((rank, *(key or ())), np.multiply.outer(np.arange(len(levels)) > 0, amounts))
    return _Terms().plus(key, amounts), split, lost


def _split_parts(
    layer: Factorisable, levels: tuple, cin: np.ndarray, cout: np.ndarray
) -> dict[str, np.ndarray]:
    """Per rank level (rows; whole first, all zero), what the factorised weights cost in params on
    each side (``in``: by input widths; ``out``: by output widths; ``core``: neither) and where
    the rank fits each side's widths (a Tucker-2 mode stays below a width, so it keeps its 1x1
    factor; a layer's rank never above what its widths allow)."""
    k = layer.kernel[0] * layer.kernel[1]
    parts = {"in": np.zeros((len(levels), len(cin))), "out": np.zeros((len(levels), len(cout)))}
    parts |= {"core": np.zeros(len(levels)), "in_fits": np.ones(parts["in"].shape)}
    parts["out_fits"] = np.ones(parts["out"].shape)
    for i, ranks in enumerate(levels[1:], start=1):
        if layer.kind != "tucker2":
            (r,) = ranks
            parts["in"][i], parts["out"][i] = r * cin, r * cout
            parts["in_fits"][i], parts["out_fits"][i] = r <= cin, r <= cout
            continue
        r_in, r_out = ranks
        parts["in"][i] = np.where(r_in < cin, r_in * cin, 0.0)  # a full mode needs no factor
        parts["out"][i] = np.where(r_out < cout, r_out * cout, 0.0)
        parts["core"][i] = r_in * r_out * k
        parts["in_fits"][i] = (r_in < cin) & (r_out <= cin * k)
        parts["out_fits"][i] = (r_out < cout) & (r_in <= cout * k)
    return parts


def _only(coefficients: np.ndarray, level: int) -> np.ndarray:
    """``coefficients`` of a block led by a rank, every level but ``level`` zeroed."""
    kept = np.zeros_like(coefficients)
    kept[level] = coefficients[level]
    return kept


def _budget_row(
    problem: Problem,
    objective: str,
    options: dict[Dim, tuple],
    shares: dict[str, np.ndarray],
    layers: list[_Layer],
) -> _Terms:
    """The share of the baseline's ``objective`` a plan costs: each group's widths alone and each
    coupled pair's, and each factorised layer's weights at its rank and widths less the whole
    cost it lost; for latency, the lookup tables' changes, added."""
    costs = problem.costs
    full = costs.cost(objective, costs.widths)
    if objective != "latency_ms":
        terms = _width_terms(costs.terms[objective], shares, full)
        for layer in layers:
            terms = terms.minus(layer.lost[objective].minus(layer.split[objective]))
        return terms
    base = costs.base_latency_ms
    terms = _Terms(constant=base / full)
    for g, pts in costs.latency.items():
        terms = terms.plus((("width", g),), (np.array([_interp(x, pts) for x in shares[g]]) - base) / full)
    for layer in layers:
        ms = costs.rank_latency[layer.name]
        changes = [0.0, *(ms[r] - base for r in options[("rank", layer.name)][1:])]
        terms = terms.plus((("rank", layer.name),), np.array(changes) / full)
    return terms


def _width_terms(terms: list, shares: dict[str, np.ndarray], full: float) -> _Terms:
    """Each cost row on its block: a group alone, a coupled pair, or a constant."""
    found = _Terms()
    for amount, out, into in terms:
        share = amount / full
        if out is None and into is None:
            found = found.plus(None, share)
        elif out is None or into is None or out == into:
            g = out or into
            found = found.plus((("width", g),), share * shares[g] * (shares[g] if out == into else 1.0))
        else:
            a, b = sorted((out, into))
            found = found.plus((("width", a), ("width", b)), share * np.outer(shares[a], shares[b]))
    return found


def _losses(
    problem: Problem, options: dict[Dim, tuple], shares: dict[str, np.ndarray]
) -> dict[Dim, np.ndarray]:
    """Per width or rank dimension, the objective at each level: the measured validation loss
    increase (in LOSS_SCALE units) and a tie-break that keeps more of a group, or a higher rank."""
    table, found = problem.table, {}
    for (kind, name), levels in options.items():
        if kind == "width":
            increase = _loss_increase(table, name, shares[name])
            found[(kind, name)] = LOSS_SCALE * increase + TIE * (1 - shares[name])
        elif kind == "rank":
            increase, most = table.rank_loss(name), sum(problem.costs.layers[name].layer.max_ranks)
            found[(kind, name)] = np.array(
                [0.0, *(LOSS_SCALE * increase[r] + TIE * (1 - sum(r) / most) for r in levels[1:])]
            )
    return found


def _loss_increase(table: Sensitivity, group: str, shares: np.ndarray) -> np.ndarray:
    """The measured validation loss increase of ``group`` alone at each of ``shares`` (none for a
    group the table does not know)."""
    if group not in table.groups:
        return np.zeros(len(shares))
    return np.array([table._curve(group, "loss", s) - table.base["loss"] for s in shares])


def _equalities(options: dict[Dim, tuple], columns: dict[Key, int], size: int):
    """One level per dimension; each block's entries summing, along each of its dimensions, to
    that dimension's choice; a layer factorised (``f``) exactly when its rank is not whole."""
    rows, cols, vals, rhs = [], [], [], []

    def equation(at: np.ndarray, values: np.ndarray, value: float) -> None:
        rows.append(np.full(len(at), len(rhs)))
        cols.append(at)
        vals.append(values)
        rhs.append(value)

    for key, start in columns.items():
        shape = tuple(len(options[d]) for d in key)
        if len(key) == 1:
            equation(start + np.arange(shape[0]), np.ones(shape[0]), 1.0)
            if key[0][0] == "factorised":  # f[L] = 0 exactly when z[L, whole] = 1
                equation(np.array([start, columns[(("rank", key[0][1]),)]]), np.array([1.0, -1.0]), 0.0)
            continue
        index = start + np.arange(math.prod(shape)).reshape(shape)
        for axis, dim in enumerate(key):
            for level in range(shape[axis]):
                at = np.append(np.take(index, level, axis=axis).ravel(), columns[(dim,)] + level)
                equation(at, np.append(np.ones(at.size - 1), -1.0), 0.0)
    matrix = (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols)))
    return sparse.csr_array(matrix, shape=(len(rhs), size)), np.array(rhs)


def joint_knapsack(problem: Problem) -> Knapsack:
    """:func:`knapsack` on :data:`GRID`, or with ranks on the finest halving of it that keeps the
    program within :data:`JOINT_VARIABLES` (8 widths a group at the least)."""
    program, grid = knapsack(problem), GRID
    while any(kind == "rank" for kind, _ in program.choices) and program.size > JOINT_VARIABLES and grid > 8:
        grid //= 2
        program = knapsack(problem, grid)
    return program


def _knapsack(problem: Problem) -> Pick:
    """The least predicted validation loss (each group's measured loss increase at its width and
    each factorised layer's at its rank, summed) whose predicted costs hold every budget, solved
    exactly by HiGHS (``scipy.optimize.milp``) on the width grid of :func:`choices` and the
    measured rank levels."""
    if problem.table is None:
        raise ValueError("sensitivity allocation needs the measured sensitivity table")
    started, program = time.perf_counter(), joint_knapsack(problem)
    joint, budgets = any(kind == "rank" for kind, _ in program.choices), problem.request.budgets
    binary = np.zeros(program.size)  # the widths and ranks; f follows its rank
    for dim, lv in program.choices.items():
        binary[program.columns[(dim,)] : program.columns[(dim,)] + len(lv)] = dim[0] != "factorised"
    found = milp(
        program.objective,
        integrality=binary,
        bounds=Bounds(0, program.upper),
        constraints=[
            LinearConstraint(program.equalities, program.equal_to, program.equal_to),
            LinearConstraint(
                sparse.vstack(
                    [
                        sparse.csr_array(np.vstack([program.rows[b.objective] for b in budgets])),
                        program.inequalities,
                    ]
                ),
                -np.inf,
                np.concatenate(
                    [[b.keep - program.constants[b.objective] - ROW_SLACK for b in budgets], program.at_most]
                ),
            ),
        ],
        options={"mip_rel_gap": 0.0, "time_limit": SOLVE_SECONDS, "presolve": not joint},
    )
    if found.x is None:
        asked = ", ".join(f"{b.objective} {b.keep}" for b in budgets)
        what = "widths and ranks" if joint else "widths"
        raise ValueError(f"no {what} on the allocation's grid meet the budgets ({asked}): {found.message}")
    widths, ranks = program.chosen(found.x)
    log.info(
        "sensitivity allocation: %d groups, %d factorisable layers, %d binaries, %d variables, solved "
        "in %.2f s (%s)",
        len(program.levels),
        sum(kind == "rank" for kind, _ in program.choices),
        int(binary.sum()),
        program.size,
        time.perf_counter() - started,
        "optimal" if found.status == 0 else found.message,
    )
    if not problem.meets(widths, ranks):  # the rows are exact: only a solver's tolerance could do this
        raise ValueError(
            f"the solver's widths {widths} and ranks {ranks} miss a budget by more than its tolerance"
        )
    return Pick(widths, ranks=ranks)


Allocator = Callable[[Problem], Pick]
# Every allocation by name, each a function of the problem alone (what the config's `allocation`
# chooses among, and what the tests parametrise over).
ALLOCATORS: dict[str, Allocator] = {
    "uniform": _uniform,
    "global": _global,
    "sensitivity": _knapsack,
    "sample": _sample,
}


def reachable(problem: Problem) -> None:
    """Refuse, naming it, a budget that every group at its floor still exceeds (with ranks, the
    latency that no rank could save; a params or FLOPs budget beyond the ranks' reach is the
    solver's to find)."""
    ranked = " and every factorisable layer at its fastest rank" if problem.rank_choices else ""
    for budget in problem.request.budgets:
        least = problem.least(budget.objective)
        if least is not None and least > budget.keep + _EPS:
            raise ValueError(
                f"budget keep {budget.keep} of {budget.objective} is out of reach: with every group at "
                f"its floor (max_layer_ratio {problem.request.max_layer_ratio}){ranked} the network "
                f"still costs {least:.4f} of the baseline's"
            )


# The allocations that choose ranks beside widths (the others choose widths only).
RANKS_BY = ("sensitivity",)


def allocate(problem: Problem) -> Allocation:
    """Widths per group (and, when asked, ranks per factorisable layer) that hold every budget of
    ``problem.request``, chosen by its method; no group below ``1 - max_layer_ratio`` of its
    width (rounded to ``round_to``)."""
    try:
        allocator = ALLOCATORS[problem.request.method]
    except KeyError:
        raise ValueError(
            f"unknown allocation {problem.request.method!r}; choose one of {', '.join(ALLOCATORS)}"
        ) from None
    if problem.request.ranks and problem.request.method not in RANKS_BY:
        raise ValueError(f"ranks are allocated by {', '.join(RANKS_BY)}, not {problem.request.method}")
    reachable(problem)
    pick = allocator(problem)
    return allocation_of(problem, pick.widths, pick.samples, pick.ranks)


def allocation_of(
    problem: Problem, widths: Widths, samples: tuple[dict[str, Any], ...] = (), ranks: RankPlan | None = None
) -> Allocation:
    """The record of ``widths`` and ``ranks``: the cost shares they reach (params and FLOPs,
    exact; latency only where a budget asks for it, since the table's prediction adds
    single-group savings that overlap) and their predicted loss."""
    costs, ranks = problem.costs, {n: tuple(r) for n, r in (ranks or {}).items()}
    objectives = ["params", "flops", *(["latency_ms"] if problem.request.keep("latency_ms") else [])]
    return Allocation(
        problem.request.method,
        widths,
        {o: round(costs.fraction(o, widths, ranks), 6) for o in objectives},
        problem.table.predicted_loss(widths, costs.widths, ranks) if problem.table is not None else None,
        samples,
        ranks=ranks,
    )


# --- what the latency check decides ----------------------------------------------------------------


def tightened_keep(keep: float, asked: float, measured: float, predicted: float) -> float:
    """The latency share to ask the table for next, when widths asked for ``asked`` were
    predicted at ``predicted`` but measured at ``measured`` against a budget of ``keep``: the
    ask scaled by the miss, and no more than the table must save if only the measured share of
    its predicted saving is real."""
    tighter = asked * keep / measured
    if measured < 1:
        real = (1 - measured) / max(1 - predicted, _SMALL)
        tighter = max(_SMALL, min(tighter, 1 - (1 - keep) / max(real, _SMALL)))
    return tighter


def shrunk(problem: Problem, chosen: Allocation, factor: float) -> Allocation:
    """``chosen`` with every group's width times ``factor``, none below its floor; its factorised
    layers keep their ranks where the narrower widths still allow them."""
    low, widths, round_to = problem.low, problem.costs.widths, problem.request.round_to
    kept = {
        g: max(low[g], round_kept(math.floor(k * factor), widths[g], round_to))
        for g, k in chosen.widths.items()
    }
    return allocation_of(problem, kept, ranks=problem.fitting(kept, chosen.ranks))
