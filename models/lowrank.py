"""Low-rank factorisation of linear and convolution layers, as plain records and pure functions.

- A linear layer (``out x in``) becomes two, ``in -> r`` (no bias) and ``r -> out`` (the bias),
  by truncated SVD with the singular values split evenly between the factors (``sqrt(s)`` each,
  so neither factor's scale dwarfs the other's when fine-tuning moves them). A 1x1 convolution is
  a linear layer at every pixel and is factorised the same way (``conv1x1``: two 1x1 convs, the
  first with the original stride and padding).
- A k x k convolution becomes ``1x1 (Cin -> R_in) -> k x k core (R_in -> R_out, the original
  stride, padding and dilation) -> 1x1 (R_out -> Cout, the bias)`` by Tucker-2 on the channel
  modes (Kim et al., ICLR 2016), computed by tensorly's ``partial_tucker`` (HOOI from an HOSVD
  start). A mode kept at its full size needs no 1x1 factor (a square factor folds into the core
  exactly), so ``(Cin, R_out)`` is ``core -> 1x1``.
- Grouped and depthwise convolutions are left alone: each output reads ``Cin / groups`` channels
  (one, for a depthwise conv), so there is no channel mode to factorise and the layer is cheap.

The cost of a layer at any rank is exact arithmetic on a :class:`Factorisable` record (params,
and FLOPs as torch's flop counter counts them: 2 x multiply-accumulates), so an allocation can
weigh rank choices beside width choices without building anything. :func:`factorise` replaces
layers by :class:`LowRank` modules at given ranks; a checkpoint records each as ``{name, kind,
ranks}`` and :func:`restore` rebuilds empty ones of those shapes for the tensors to load into.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

Kind = Literal["linear", "conv1x1", "tucker2"]
Ranks = tuple[int, ...]  # (r,) for linear and conv1x1, (r_in, r_out) for tucker2


@dataclass(frozen=True)
class Factorisable:
    """A layer that can be factorised, and what its cost depends on. ``in_positions`` /
    ``out_positions``: how many spatial positions (pixels; tokens for a linear layer applied to
    a sequence; 1 for a plain linear layer) it reads and writes per image."""

    name: str
    kind: Kind
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    bias: bool
    in_positions: int
    out_positions: int

    @property
    def max_ranks(self) -> Ranks:
        """The largest useful rank of each factorised mode (the rank of its unfolding)."""
        k = self.kernel[0] * self.kernel[1]
        if self.kind == "tucker2":
            return min(self.in_channels, self.out_channels * k), min(self.out_channels, self.in_channels * k)
        return (min(self.in_channels, self.out_channels),)


@dataclass(frozen=True)
class Skipped:
    """A layer left as it is, and why."""

    name: str
    reason: str


@dataclass(frozen=True)
class Survey:
    """The layers of a network that can be factorised, and those that cannot (with why)."""

    layers: tuple[Factorisable, ...]
    skipped: tuple[Skipped, ...]


@dataclass(frozen=True)
class Cost:
    params: int
    flops: int  # 2 x multiply-accumulates per image, as torch.utils.flop_counter counts them

    def below(self, other: Cost) -> bool:
        """Strictly cheaper in both params and FLOPs."""
        return self.params < other.params and self.flops < other.flops


class LowRank(nn.Sequential):
    """A factorised layer: its parts in order (``first``, ``core``, ``last`` where present).
    ``kind`` and ``ranks`` say what it replaced and at which ranks."""

    def __init__(self, kind: Kind, ranks: Sequence[int], parts: OrderedDict[str, nn.Module]) -> None:
        super().__init__(parts)
        self.kind, self.ranks = kind, tuple(int(r) for r in ranks)

    def record(self, name: str) -> dict[str, Any]:
        """This layer in a spec (plain JSON)."""
        return {"name": name, "kind": self.kind, "ranks": list(self.ranks)}

    def stand_in(self) -> nn.Module:
        """A weightless (meta-device) layer of the shape this one replaced: what an architecture's
        ``spec()`` reads widths off."""
        parts = list(self)
        first, last = parts[0], parts[-1]
        if self.kind == "linear":
            return nn.Linear(first.in_features, last.out_features, last.bias is not None, device="meta")
        shaped = first if self.kind == "conv1x1" else self.core
        return nn.Conv2d(
            first.in_channels,
            last.out_channels,
            shaped.kernel_size,
            shaped.stride,
            shaped.padding,
            shaped.dilation,
            bias=last.bias is not None,
            padding_mode=shaped.padding_mode,
            device="meta",
        )


# --- what can be factorised, and what it costs ------------------------------------------------


def _kind(module: nn.Module) -> Kind | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv1x1" if module.kernel_size == (1, 1) else "tucker2"
    return None


def _inside_low_rank(model: nn.Module) -> set[str]:
    return {
        f"{name}.{child}" if name else child
        for name, module in model.named_modules()
        if isinstance(module, LowRank)
        for child, _ in module.named_modules()
        if child
    }


def _positions(module: nn.Module, x: Tensor, y: Tensor) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        n = x.numel() // (x.shape[0] * module.in_features)
        return n, n
    return x.shape[-2] * x.shape[-1], y.shape[-2] * y.shape[-1]


def _probe(model: nn.Module, example: Tensor, layers: dict[str, nn.Module]) -> dict[str, list]:
    """Each layer's (in, out) positions per call, from one forward pass in eval mode (BatchNorm
    statistics untouched), every module's own mode restored after."""
    calls: dict[str, list] = {name: [] for name in layers}
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, n=n: calls[n].append(_positions(mod, inp[0], out)))
        for n, m in layers.items()
    ]
    modes = {m: m.training for m in model.modules()}
    try:
        with torch.no_grad():
            model.eval()(example[:1])
    finally:
        for m, mode in modes.items():
            m.training = mode
        for hook in hooks:
            hook.remove()
    return calls


def survey(model: nn.Module, example: Tensor) -> Survey:
    """The factorisable layers of ``model`` (its linear and ungrouped conv layers that one forward
    of ``example`` runs once each), in module order, and every other linear or conv layer with
    the reason it is left alone. Parts of layers factorised already are neither."""
    parts = _inside_low_rank(model)
    named = {n: m for n, m in model.named_modules() if _kind(m) and n not in parts}
    skipped = [
        Skipped(n, f"grouped convolution (groups={m.groups}): no channel mode to factorise")
        for n, m in named.items()
        if isinstance(m, nn.Conv2d) and m.groups > 1
    ]
    candidates = {n: m for n, m in named.items() if not (isinstance(m, nn.Conv2d) and m.groups > 1)}
    calls = _probe(model, example, candidates)
    layers = []
    for name, module in candidates.items():
        if len(calls[name]) != 1:
            why = "not run by forward" if not calls[name] else f"run {len(calls[name])} times per forward"
            skipped.append(Skipped(name, why))
            continue
        layers.append(_record(name, module, *calls[name][0]))
    order = list(named)
    return Survey(tuple(layers), tuple(sorted(skipped, key=lambda s: order.index(s.name))))


def _record(name: str, module: nn.Module, in_positions: int, out_positions: int) -> Factorisable:
    if isinstance(module, nn.Linear):
        cin, cout, kernel = module.in_features, module.out_features, (1, 1)
    else:
        cin, cout, kernel = module.in_channels, module.out_channels, tuple(module.kernel_size)
    return Factorisable(
        name, _kind(module), cin, cout, kernel, module.bias is not None, in_positions, out_positions
    )


def factorisable_layers(model: nn.Module, example: Tensor) -> list[Factorisable]:
    """The layers of ``model`` that can be factorised (see :func:`survey`)."""
    return list(survey(model, example).layers)


def layer_cost(layer: Factorisable, ranks: Sequence[int] | None = None) -> Cost:
    """Params and FLOPs of ``layer`` as it is (``ranks`` None) or factorised at ``ranks``."""
    cin, cout = layer.in_channels, layer.out_channels
    k = layer.kernel[0] * layer.kernel[1]
    bias = cout if layer.bias else 0
    if ranks is None:
        return Cost(cin * cout * k + bias, 2 * layer.out_positions * cin * cout * k)
    ranks = check_ranks(layer, ranks)
    if layer.kind != "tucker2":
        (r,) = ranks
        return Cost(r * (cin + cout) + bias, 2 * layer.out_positions * r * (cin + cout))
    r_in, r_out = ranks
    first = cin * r_in if r_in < cin else 0  # a full mode needs no factor
    last = r_out * cout if r_out < cout else 0
    core = r_in * r_out * k
    return Cost(
        first + core + last + bias, 2 * (layer.in_positions * first + layer.out_positions * (core + last))
    )


def check_ranks(layer: Factorisable, ranks: int | Sequence[int]) -> Ranks:
    """``ranks`` as a tuple for ``layer``, or a one-line ValueError: how many it takes, and the
    most each may be."""
    ranks = (ranks,) if isinstance(ranks, int) else tuple(ranks)
    limit = layer.max_ranks
    shape = f"{layer.kind} layer {layer.name!r} ({layer.in_channels} -> {layer.out_channels})"
    if len(ranks) != len(limit):
        want = "[r_in, r_out]" if layer.kind == "tucker2" else "one rank"
        raise ValueError(f"ranks for {shape}: give {want}, not {list(ranks)}")
    if any(not isinstance(r, int) or not 1 <= r <= m for r, m in zip(ranks, limit, strict=True)):
        raise ValueError(f"ranks {list(ranks)} for {shape}: each between 1 and {list(limit)}")
    return ranks


# --- choosing ranks ---------------------------------------------------------------------------


def ratio_ranks(layer: Factorisable, ratio: float) -> Ranks:
    """The largest ranks whose params are at most ``1 - ratio`` of the layer's (at least rank 1).
    A Tucker-2 layer keeps both modes in proportion to their sizes."""
    target = (1 - ratio) * layer_cost(layer).params
    if layer.kind != "tucker2":
        bias = layer.out_channels if layer.bias else 0
        r = math.floor((target - bias) / (layer.in_channels + layer.out_channels))
        return (min(max(1, r), layer.max_ranks[0]),)
    m_in, m_out = layer.max_ranks
    steps = max(m_in, m_out)
    scaled = [
        (max(1, round(m_in * s / steps)), max(1, round(m_out * s / steps))) for s in range(1, steps + 1)
    ]
    # Not monotonic: a mode reaching its full size drops its factor, so look at every step.
    fits = [ranks for ranks in scaled if layer_cost(layer, ranks).params <= target]
    return fits[-1] if fits else scaled[0]


def _energy_rank(matrix: Tensor, energy: float) -> int:
    squared = torch.linalg.svdvals(matrix.double()) ** 2
    kept = torch.cumsum(squared, 0) / squared.sum().clamp_min(1e-300)
    found = int(torch.searchsorted(kept, torch.tensor(energy, dtype=kept.dtype) - 1e-12)) + 1
    return min(found, len(squared))  # an all-zero weight reaches no share at any rank


def energy_ranks(layer: Factorisable, weight: Tensor, energy: float) -> Ranks:
    """The smallest ranks keeping ``energy`` of the squared singular values of the weight (for
    Tucker-2, of each channel mode's unfolding)."""
    w = weight.detach()
    if layer.kind != "tucker2":
        return (_energy_rank(w.reshape(w.shape[0], -1), energy),)
    r_in = _energy_rank(w.transpose(0, 1).reshape(w.shape[1], -1), energy)
    r_out = _energy_rank(w.reshape(w.shape[0], -1), energy)
    return r_in, r_out


# --- factorising ------------------------------------------------------------------------------


def _conv(cin: int, cout: int, like: nn.Conv2d, *, kernel: bool, bias: bool) -> nn.Conv2d:
    """A conv ``cin -> cout`` on ``like``'s device and dtype: ``like``'s kernel, stride, padding and
    dilation (``kernel``), or a plain 1x1."""
    geometry = (like.kernel_size, like.stride, like.padding, like.dilation) if kernel else ((1, 1), 1, 0, 1)
    return nn.Conv2d(
        cin,
        cout,
        *geometry,
        bias=bias,
        padding_mode=like.padding_mode if kernel else "zeros",
        device=like.weight.device,
        dtype=like.weight.dtype,
    )


def empty(module: nn.Module, kind: Kind, ranks: Sequence[int]) -> LowRank:
    """An untrained :class:`LowRank` of ``module``'s shape at ``ranks`` (for tensors to load into)."""
    if _kind(module) != kind or (isinstance(module, nn.Conv2d) and module.groups != 1):
        raise ValueError(f"a {kind} factorisation does not fit a {type(module).__name__} layer")
    bias = module.bias is not None
    if kind == "linear":
        (r,) = ranks
        like = {"device": module.weight.device, "dtype": module.weight.dtype}
        parts = [
            ("first", nn.Linear(module.in_features, r, bias=False, **like)),
            ("last", nn.Linear(r, module.out_features, bias=bias, **like)),
        ]
    elif kind == "conv1x1":
        (r,) = ranks
        parts = [
            ("first", _conv(module.in_channels, r, module, kernel=True, bias=False)),
            ("last", _conv(r, module.out_channels, module, kernel=False, bias=bias)),
        ]
    else:
        (r_in, r_out), cin, cout = ranks, module.in_channels, module.out_channels
        parts = [
            *([("first", _conv(cin, r_in, module, kernel=False, bias=False))] if r_in < cin else []),
            ("core", _conv(r_in, r_out, module, kernel=True, bias=bias and r_out == cout)),
            *([("last", _conv(r_out, cout, module, kernel=False, bias=bias))] if r_out < cout else []),
        ]
    return LowRank(kind, ranks, OrderedDict(parts))


def _svd_factors(weight: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """``(first, last)`` with ``last @ first`` the best rank-``r`` approximation of ``weight``."""
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    root = s[:r].sqrt()
    return root[:, None] * vh[:r], u[:, :r] * root


def _tucker2_factors(weight: Tensor, r_in: int, r_out: int) -> tuple[Tensor | None, Tensor, Tensor | None]:
    """``(U_in, core, U_out)`` with ``weight ~= core x_0 U_out x_1 U_in``; a full mode's factor is
    None (folded into the core)."""
    import tensorly  # 0.3 s to import: only when factorising
    from tensorly.decomposition import partial_tucker

    cout, cin = weight.shape[:2]
    modes = [m for m, (r, n) in enumerate(((r_out, cout), (r_in, cin))) if r < n]
    # tensorly's torch backend (for this thread only): its SVDs then run on torch's threads, which
    # the pipeline sizes per worker (numpy's OpenBLAS spins its own: 10x slower on a busy machine).
    with tensorly.backend_context("pytorch", local_threadsafe=True):
        (core, factors), _ = partial_tucker(
            weight.detach().double().cpu(), rank=[(r_out, r_in)[m] for m in modes], modes=modes, init="svd"
        )
    found = dict(zip(modes, factors, strict=True))
    return found.get(1), core, found.get(0)


def factorised(module: nn.Module, kind: Kind, ranks: Sequence[int]) -> LowRank:
    """``module`` factorised at ``ranks``: exact where its weight has at most those ranks."""
    low = empty(module, kind, ranks)
    weight = module.weight.detach()
    with torch.no_grad():
        if kind == "tucker2":
            u_in, core, u_out = _tucker2_factors(weight, *ranks)
            if u_in is not None:
                low.first.weight.copy_(u_in.T[:, :, None, None])
            low.core.weight.copy_(core)
            if u_out is not None:
                low.last.weight.copy_(u_out[:, :, None, None])
        else:
            first, last = _svd_factors(weight.reshape(weight.shape[0], -1), ranks[0])
            low.first.weight.copy_(first.reshape(low.first.weight.shape))
            low.last.weight.copy_(last.reshape(low.last.weight.shape))
        if module.bias is not None:
            low[-1].bias.copy_(module.bias)
    return low


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def factorise(model: nn.Module, ranks: dict[str, Sequence[int]]) -> nn.Module:
    """Replace each layer ``ranks`` names by its factorisation at those ranks (in place; the
    ranks are taken as given: check them against :func:`survey`'s records first)."""
    for name, layer_ranks in ranks.items():
        module = model.get_submodule(name)
        _replace(model, name, factorised(module, _kind(module), layer_ranks))
    return model


# --- in a spec --------------------------------------------------------------------------------


def low_rank_layers(model: nn.Module) -> dict[str, LowRank]:
    """The factorised layers of ``model`` by name (empty for a network never factorised)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LowRank)}


@contextlib.contextmanager
def standing_in(model: nn.Module) -> Iterator[list[dict[str, Any]]]:
    """``model`` with every factorised layer replaced by a weightless stand-in of the layer it
    replaced, so an architecture's ``spec()`` reads the widths it knows; yields the factorised
    layers' records, and puts them back after."""
    layers = low_rank_layers(model)
    try:
        for name, module in layers.items():
            _replace(model, name, module.stand_in())
        yield [module.record(name) for name, module in layers.items()]
    finally:
        for name, module in layers.items():
            _replace(model, name, module)


def restore(model: nn.Module, records: list[dict[str, Any]]) -> nn.Module:
    """Replace the layers ``records`` name (``{name, kind, ranks}``, as a spec holds them) by
    empty factorised layers of those ranks, for a state dict to load into."""
    for entry in records:
        name = entry["name"]
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"spec factorises {name!r}, a layer the network does not have") from None
        _replace(model, name, empty(module, entry["kind"], entry["ranks"]))
    return model
