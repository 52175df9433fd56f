"""Per-layer widths allocated to budgets (issues #23, #31): which share of each prunable group a
structured pruner keeps so that the pruned network costs at most ``keep`` of the baseline's
params, FLOPs or batch-1 latency, for every budget at once.

The pieces are pure torch and plain numbers, so they are tested on crafted nets:

- :func:`prunable_groups`: the groups torch-pruning's dependency graph finds (coupled layers
  together, e.g. every convolution feeding one residual sum), by the name of their root module.
- :class:`CostModel`: params and FLOPs of any width vector, read off the graph (each weight
  scales with the kept share of the group that prunes its outputs times that of the group that
  prunes its inputs, so it is exact for conv, linear and BatchNorm layers), and batch-1 latency
  from a per-group lookup table measured by :func:`measure_sensitivity` (additive, as NetAdapt).
- :func:`measure_sensitivity`: each group pruned alone at several ratios, its validation loss
  and accuracy (after BatchNorm re-estimation, as EagleEye) and its cost.
- :func:`allocate`: a :class:`Problem` (the costs, the typed :class:`Request` and what the
  method needs) to an :class:`Allocation` record, by one of :data:`ALLOCATORS`: ``uniform`` (one
  ratio for all), ``global`` (channels ranked across groups), ``sensitivity`` (the least
  predicted loss on a grid of widths, a multiple-choice knapsack with one row per budget solved
  exactly by HiGHS, see :class:`Knapsack`) or ``sample`` (EagleEye: random width vectors on the
  budgets, each scored, the best kept). The pipeline allocates first and then calls the
  strategy with the widths; nothing here calls back into it.
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

log = logging.getLogger(__name__)

Objective = Literal["params", "flops", "latency_ms"]
Widths = dict[str, int]  # root module name of a group -> channels it keeps
Prune = Callable[[nn.Module, Widths], nn.Module]  # prunes a model in place to these widths
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


@dataclass
class CostModel:
    """Params, FLOPs and batch-1 latency of a width vector. ``terms``: per objective, rows of
    (baseline amount, group pruning the outputs, group pruning the inputs); ``latency``: per
    group, (kept fraction, measured ms) points, interpolated, summed as differences from the
    baseline's ``base_latency_ms``."""

    widths: Widths
    terms: dict[str, list[tuple[float, str | None, str | None]]]
    base_latency_ms: float | None = None
    latency: dict[str, list[tuple[float, float]]] = field(default_factory=dict)

    def cost(self, objective: Objective, kept: Widths) -> float:
        share = {g: kept.get(g, n) / n for g, n in self.widths.items()}
        if objective == "latency_ms":
            if self.base_latency_ms is None:
                raise ValueError("a latency_ms budget needs the measured per-group latency table")
            base = self.base_latency_ms
            return base + sum(_interp(share[g], pts) - base for g, pts in self.latency.items())
        return sum(
            amount * (share[o] if o else 1.0) * (share[i] if i else 1.0)
            for amount, o, i in self.terms[objective]
        )

    def fraction(self, objective: Objective, kept: Widths) -> float:
        """The cost of ``kept`` as a share of the unpruned network's."""
        return self.cost(objective, kept) / self.cost(objective, self.widths)


def _interp(x: float, points: list[tuple[float, float]]) -> float:
    xs, ys = zip(*sorted(points), strict=True)
    return float(np.interp(x, xs, ys))


def cost_model(model: nn.Module, example: Tensor) -> CostModel:
    """Params and FLOPs (2 x multiply-accumulates of conv and linear layers, as torch's flop
    counter) of ``model`` at any widths of its prunable groups."""
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
    return CostModel(widths, {"params": params, "flops": flops})


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
    the unpruned net. JSON-ready (``dataclasses.asdict``)."""

    ratios: list[float]
    base: dict[str, float]
    groups: dict[str, dict[str, list[float]]]

    def predicted_loss(self, kept: Widths, widths: Widths) -> float:
        """Baseline loss plus each group's loss increase at its kept share (additive)."""
        return self.base["loss"] + sum(
            self._curve(g, "loss", kept.get(g, n) / n) - self.base["loss"] for g, n in widths.items()
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
) -> Sensitivity:
    """Prune each group alone (a copy of ``model``) at each ratio and measure it: ``score``
    (which re-estimates BatchNorm where there is any) and ``latency``, which times a list of
    models together (ms at batch 1, see :func:`interleaved_ms`): per group, the unpruned model
    first and the group's pruned copies after it. Each copy's latency is kept as its ratio to
    the unpruned model timed in the same rounds, times the fastest unpruned figure of all groups,
    so a load that changes between groups does not tilt one group against another."""
    costs = cost_model(model, example)
    loss, acc = score(copy.deepcopy(model))
    base = {
        "loss": loss,
        "acc": acc,
        "params": costs.cost("params", costs.widths),
        "flops": costs.cost("flops", costs.widths),
        "latency_ms": 0.0,
    }
    groups, base_ms, relative = {}, [], {}
    for g, n in costs.widths.items():
        row: dict[str, list[float]] = {
            k: [] for k in ("width", "kept", "loss", "acc", "params", "flops", "latency_ms")
        }
        pruned_copies = []
        for r in ratios:
            kept = max(1, math.floor(n * (1 - r) + _EPS))
            pruned = prune(copy.deepcopy(model), {g: kept})
            loss, acc = score(pruned)
            row["width"].append(n)
            row["kept"].append(kept)
            row["loss"].append(loss)
            row["acc"].append(acc)
            row["params"].append(costs.cost("params", {g: kept}))
            row["flops"].append(costs.cost("flops", {g: kept}))
            pruned_copies.append(pruned.eval())
        timed = latency([model, *pruned_copies])
        base_ms.append(timed[0])
        relative[g] = [ms / timed[0] for ms in timed[1:]]
        groups[g] = row
    base["latency_ms"] = min(base_ms) if base_ms else latency([model])[0]
    for g, row in groups.items():
        row["latency_ms"] = [base["latency_ms"] * share for share in relative[g]]
    return Sensitivity(list(ratios), base, groups)


def with_latency(costs: CostModel, sensitivity: Sensitivity) -> CostModel:
    """``costs`` with the latency lookup table of ``sensitivity``."""
    return CostModel(costs.widths, costs.terms, sensitivity.base["latency_ms"], sensitivity.latency_points())


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
    nearest multiple), and the ``samples`` and ``seed`` of a ``sample`` allocation."""

    method: str
    budgets: tuple[Budget, ...]
    max_layer_ratio: float = 0.9
    round_to: int | None = None
    samples: int = 16
    seed: int = 0

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

    def limit(self, budget: Budget) -> float:
        """``budget`` in its objective's units (params, FLOPs, ms)."""
        return budget.keep * self.costs.cost(budget.objective, self.costs.widths)

    def meets(self, widths: Widths) -> bool:
        """Whether ``widths`` hold every budget."""
        return all(self.costs.cost(b.objective, widths) <= self.limit(b) for b in self.request.budgets)


@dataclass(frozen=True)
class Pick:
    """What an allocator chose: the ``widths``, and (``sample``) every scored vector."""

    widths: Widths
    samples: tuple[dict[str, Any], ...] = ()


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
    vector's score, and for a latency budget the check that measured it (a new record per step:
    a decided allocation is never changed)."""

    method: str
    widths: Widths
    cost: dict[str, float]
    predicted_loss: float | None = None
    samples: tuple[dict[str, Any], ...] = ()
    latency: LatencyCheck | None = None


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


def choices(n: int, low: int, round_to: int | None, measured: list[int]) -> tuple[int, ...]:
    """The widths a group of ``n`` channels may take, widest first: every one from its floor
    ``low`` when ``n <= GRID``, else ``n * j / GRID``, its ``measured`` points and its floor, each
    rounded to ``round_to``; always its whole width."""
    wanted = range(low, n + 1) if n <= GRID else {low, *measured, *(round(n * j / GRID) for j in range(GRID))}
    rounded = {round_kept(max(1, k), n, round_to) for k in wanted}
    return tuple(sorted({n, *(k for k in rounded if low <= k <= n)}, reverse=True))


@dataclass(frozen=True)
class Knapsack:
    """The sensitivity allocation as a mixed-integer program. One binary ``x[g, l]`` per group
    ``g`` and width level ``l`` (exactly one per group). A layer whose outputs group ``a`` prunes
    and whose inputs group ``b`` prunes costs ``amount * s_a * s_b`` (``s``: a group's kept share),
    bilinear in two choices; one continuous ``y[a, l, b, m]`` per pair of their levels stands for
    ``x[a, l] * x[b, m]``, tied to them by ``sum_m y[a, l, b, m] = x[a, l]`` and
    ``sum_l y[a, l, b, m] = x[b, m]``, which with binary ``x`` leave only the product (the one
    plan with one-hot marginals). Params and FLOPs are then linear in ``(x, y)`` and exact;
    latency (the lookup table, additive) and the predicted loss are linear in ``x``. One row per
    budget, as a share of the baseline's cost."""

    levels: dict[str, tuple[int, ...]]  # per group, the widths it may take
    columns: dict[Any, int]  # (group,) or (group_a, group_b): where its block of variables starts
    size: int
    objective: np.ndarray
    rows: dict[str, np.ndarray]  # per budget objective, the coefficients of its share
    constants: dict[str, float]  # per budget objective, the share no group's choice changes
    equalities: Any  # scipy.sparse matrix: one choice per group, the pairs' marginals
    equal_to: np.ndarray

    def vector(self, widths: Mapping[str, int]) -> np.ndarray:
        """The variables of ``widths`` (each group's level one-hot, each pair their product)."""
        v = np.zeros(self.size)
        at = {g: self.levels[g].index(widths[g]) for g in self.levels}
        for key, start in self.columns.items():
            if len(key) == 1:
                v[start + at[key[0]]] = 1.0
            else:
                a, b = key
                v[start + at[a] * len(self.levels[b]) + at[b]] = 1.0
        return v

    def share(self, objective: str, widths: Mapping[str, int]) -> float:
        """What the program's row says ``widths`` cost, as a share of the baseline's."""
        return float(self.constants[objective] + self.rows[objective] @ self.vector(widths))

    def widths(self, v: np.ndarray) -> Widths:
        """The widths a solution ``v`` chose (each group's level whose binary is set)."""
        return {
            g: lv[int(np.argmax(v[self.columns[(g,)] : self.columns[(g,)] + len(lv)]))]
            for g, lv in self.levels.items()
        }


def knapsack(problem: Problem) -> Knapsack:
    """:class:`Knapsack` of ``problem``: its groups' width levels, the predicted loss as the
    objective, one row per budget."""
    costs, table, low = problem.costs, problem.table, problem.low
    measured = {g: list(row["kept"]) for g, row in table.groups.items()}
    levels = {
        g: choices(n, low[g], problem.request.round_to, measured.get(g, [])) for g, n in costs.widths.items()
    }
    shares = {g: np.array(lv) / costs.widths[g] for g, lv in levels.items()}
    unary, pairs, constants = _terms(problem, shares)
    columns, size = {}, 0
    for key in [*((g,) for g in levels), *sorted({p for per in pairs.values() for p in per})]:
        columns[key] = size
        size += math.prod(len(levels[g]) for g in key)
    objective = np.zeros(size)
    for g, lv in levels.items():
        objective[columns[(g,)] : columns[(g,)] + len(lv)] = LOSS_SCALE * _loss_increase(
            table, g, shares[g]
        ) + TIE * (1 - shares[g])
    rows = {}
    for o in unary:
        row = np.zeros(size)
        for g, coefficients in unary[o].items():
            row[columns[(g,)] : columns[(g,)] + len(levels[g])] += coefficients
        for (a, b), amount in pairs[o].items():
            row[columns[(a, b)] : columns[(a, b)] + len(levels[a]) * len(levels[b])] += (
                amount * np.outer(shares[a], shares[b]).ravel()
            )
        rows[o] = row
    equalities, equal_to = _equalities(levels, columns, size)
    return Knapsack(levels, columns, size, objective, rows, constants, equalities, equal_to)


def _loss_increase(table: Sensitivity, group: str, shares: np.ndarray) -> np.ndarray:
    """The measured validation loss increase of ``group`` alone at each of ``shares`` (none for a
    group the table does not know)."""
    if group not in table.groups:
        return np.zeros(len(shares))
    return np.array([table._curve(group, "loss", s) - table.base["loss"] for s in shares])


def _terms(problem: Problem, shares: dict[str, np.ndarray]):
    """Per budget objective, as shares of the baseline's cost: each group's cost at each of its
    levels alone, each coupled pair's amount, and what no choice changes."""
    costs = problem.costs
    unary = {b.objective: {g: np.zeros(len(s)) for g, s in shares.items()} for b in problem.request.budgets}
    pairs = {o: {} for o in unary}
    constants = dict.fromkeys(unary, 0.0)
    for o in unary:
        full = costs.cost(o, costs.widths)
        if o == "latency_ms":  # the lookup table: base plus each group's change, additive
            constants[o] = costs.base_latency_ms / full
            for g, pts in costs.latency.items():
                unary[o][g] += (np.array([_interp(x, pts) for x in shares[g]]) - costs.base_latency_ms) / full
            continue
        for amount, out, into in costs.terms[o]:
            share = amount / full
            if out is None and into is None:
                constants[o] += share
            elif out is None or into is None or out == into:
                g = out or into
                unary[o][g] += share * shares[g] * (shares[g] if out == into else 1.0)
            else:
                key = tuple(sorted((out, into)))
                pairs[o][key] = pairs[o].get(key, 0.0) + share
    return unary, pairs, constants


def _equalities(levels: dict[str, tuple[int, ...]], columns: dict[Any, int], size: int):
    """One level per group; each pair's products summing to each of its two groups' choices."""
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    rhs: list[float] = []

    def equation(terms: list[tuple[int, float]], value: float) -> None:
        rows.extend([len(rhs)] * len(terms))
        cols.extend(c for c, _ in terms)
        vals.extend(v for _, v in terms)
        rhs.append(value)

    for key, start in columns.items():
        if len(key) == 1:
            equation([(start + i, 1.0) for i in range(len(levels[key[0]]))], 1.0)
            continue
        a, b = key
        la, lb = len(levels[a]), len(levels[b])
        for i in range(la):
            equation([*((start + i * lb + j, 1.0) for j in range(lb)), (columns[(a,)] + i, -1.0)], 0.0)
        for j in range(lb):
            equation([*((start + i * lb + j, 1.0) for i in range(la)), (columns[(b,)] + j, -1.0)], 0.0)
    return sparse.csr_array((vals, (rows, cols)), shape=(len(rhs), size)), np.array(rhs)


def _knapsack(problem: Problem) -> Pick:
    """The least predicted validation loss (each group's measured loss increase at its width,
    summed) whose predicted costs hold every budget, solved exactly by HiGHS
    (``scipy.optimize.milp``) on the width grid of :func:`choices`."""
    if problem.table is None:
        raise ValueError("sensitivity allocation needs the measured sensitivity table")
    started, program = time.perf_counter(), knapsack(problem)
    budgets = problem.request.budgets
    binary = np.zeros(program.size)
    for g, lv in program.levels.items():
        binary[program.columns[(g,)] : program.columns[(g,)] + len(lv)] = 1
    found = milp(
        program.objective,
        integrality=binary,
        bounds=Bounds(0, 1),
        constraints=[
            LinearConstraint(program.equalities, program.equal_to, program.equal_to),
            LinearConstraint(
                np.vstack([program.rows[b.objective] for b in budgets]),
                -np.inf,
                [b.keep - program.constants[b.objective] - ROW_SLACK for b in budgets],
            ),
        ],
        options={"mip_rel_gap": 0.0, "time_limit": SOLVE_SECONDS},
    )
    if found.x is None:
        raise ValueError(f"no widths on the allocation's grid meet the budgets: {found.message}")
    widths = program.widths(found.x)
    log.info(
        "sensitivity allocation: %d groups, %d binaries, %d variables, solved in %.2f s (%s)",
        len(program.levels),
        int(binary.sum()),
        program.size,
        time.perf_counter() - started,
        "optimal" if found.status == 0 else found.message,
    )
    if not problem.meets(widths):  # the rows are exact: only a solver's tolerance could do this
        raise ValueError(f"the solver's widths {widths} miss a budget by more than its tolerance")
    return Pick(widths)


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
    """Refuse, naming it, a budget that every group at its floor still exceeds."""
    low = problem.low
    for budget in problem.request.budgets:
        least = problem.costs.fraction(budget.objective, low)
        if least > budget.keep + _EPS:
            raise ValueError(
                f"budget keep {budget.keep} of {budget.objective} is out of reach: with every group at "
                f"its floor (max_layer_ratio {problem.request.max_layer_ratio}) the network still "
                f"costs {least:.4f} of the baseline's"
            )


def allocate(problem: Problem) -> Allocation:
    """Widths per group that hold every budget of ``problem.request``, chosen by its method; no
    group below ``1 - max_layer_ratio`` of its width (rounded to ``round_to``)."""
    reachable(problem)
    try:
        allocator = ALLOCATORS[problem.request.method]
    except KeyError:
        raise ValueError(
            f"unknown allocation {problem.request.method!r}; choose one of {', '.join(ALLOCATORS)}"
        ) from None
    pick = allocator(problem)
    return allocation_of(problem, pick.widths, pick.samples)


def allocation_of(problem: Problem, widths: Widths, samples: tuple[dict[str, Any], ...] = ()) -> Allocation:
    """The record of ``widths``: the cost shares they reach (params and FLOPs, exact; latency
    only where a budget asks for it, since the table's prediction adds single-group savings that
    overlap) and their predicted loss."""
    costs = problem.costs
    objectives = ["params", "flops", *(["latency_ms"] if problem.request.keep("latency_ms") else [])]
    return Allocation(
        problem.request.method,
        widths,
        {o: round(costs.fraction(o, widths), 6) for o in objectives},
        problem.table.predicted_loss(widths, costs.widths) if problem.table is not None else None,
        samples,
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
    """``chosen`` with every group's width times ``factor``, none below its floor."""
    low, widths, round_to = problem.low, problem.costs.widths, problem.request.round_to
    kept = {
        g: max(low[g], round_kept(math.floor(k * factor), widths[g], round_to))
        for g, k in chosen.widths.items()
    }
    return allocation_of(problem, kept)
