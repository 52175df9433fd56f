"""Shrink strategies, registered by name with one signature.

A strategy takes the trained baseline and a calibration batch and returns a smaller model;
the candidate is then trained with the same loop as the baseline. Strategies never train.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch.nn.utils import prune

from models.quantize import Int8Net, quantize_int8
from models.registry import ARCHITECTURES, build_model, model_spec

Strategy = Callable[..., nn.Module]
# Given ``{"arch": name, **model options}``, why a strategy cannot run on it (None: it can).
Requirement = Callable[[dict[str, Any]], str | None]


@dataclass(frozen=True)
class StrategyInfo:
    """How the pipeline treats a strategy's output.

    ``warm_start``: it keeps the baseline's weights (fine-tune) rather than a fresh init.
    ``trains``: False for a final step (int8), whose result is never trained further.
    ``keeps_zeros``: fine-tuning must hold its zeroed weights at zero (unstructured sparsity).
    ``note``: what a reader of the results table must know about its figures.
    ``exclusive``: it traces the model with torch.fx, which patches ``nn.Module.__call__`` for the
    whole process while it runs, so no other model may train in the same process meanwhile."""

    fn: Strategy
    warm_start: bool
    trains: bool = True
    keeps_zeros: bool = False
    requires: Requirement | None = None
    exclusive: bool = False
    note: str = ""


STRATEGY_INFO: dict[str, StrategyInfo] = {}
STRATEGIES: dict[str, Strategy] = {}


def register(name: str, *, warm_start: bool, **info: Any) -> Callable[[Strategy], Strategy]:
    """Add ``fn`` to the registry under ``name``; ``info`` fills :class:`StrategyInfo`."""

    def wrap(fn: Strategy) -> Strategy:
        STRATEGY_INFO[name] = StrategyInfo(fn, warm_start, **info)
        STRATEGIES[name] = fn
        return fn

    return wrap


def refusal(strategy: str, arch_options: dict[str, Any]) -> str | None:
    """Why ``strategy`` cannot shrink the architecture ``arch_options`` describes, or None."""
    requires = STRATEGY_INFO[strategy].requires
    return requires(arch_options) if requires else None


def _needs_batch_norm(options: dict[str, Any]) -> str | None:
    if ARCHITECTURES[options["arch"]].has_batch_norm(options):
        return None
    return "ranks channels by BatchNorm scales, so it needs BatchNorm; set model.batch_norm: true"


def _needs_depth(options: dict[str, Any]) -> str | None:
    if ARCHITECTURES[options["arch"]].removable_blocks(options) > 0:
        return None
    return "needs a layer or block it can drop; this architecture has only one of each"


def _scaled(widths: list[int], keep: float) -> list[int]:
    return [max(1, round(w * keep)) for w in widths]


@register("width", warm_start=False)
def width(model: nn.Module, batch: tuple[Tensor, Tensor], *, ratio: float) -> nn.Module:
    """The seed's ``AdjustedNet``: the same architecture with every width cut by ``ratio``,
    freshly initialised (the caller seeds the RNG)."""
    spec = model_spec(model)
    if "width_mult" in spec:  # torchvision nets: one multiplier; fresh widths, not pruned ones
        spec["width_mult"] *= 1 - ratio
        spec.pop("layers", None)
    else:
        spec["channels"] = _scaled(spec["channels"], 1 - ratio)
        spec["hidden"] = _scaled(spec["hidden"], 1 - ratio)
    return build_model(spec)


@register("depth", warm_start=True, requires=_needs_depth)
def depth(model: nn.Module, batch: tuple[Tensor, Tensor], *, ratio: float) -> nn.Module:
    """Drop ``ratio`` of the removable layers/blocks (at least one): BaseNet's hidden layers then
    conv stages, a ResNet's or MobileNetV2's trailing blocks per stage; survivors keep weights."""
    removable = type(model).removable_blocks(model_spec(model))
    return model.shallower(min(removable, max(1, round(ratio * removable))))


def _structured_prune(
    model: nn.Module,
    batch: tuple[Tensor, Tensor],
    importance: tp.importance.Importance,
    ratio: float,
    global_pruning: bool,
    needs_grad: bool,
    iterative_steps: int = 1,
) -> nn.Module:
    """Remove whole channels/neurons with torch-pruning's dependency graph; the classifier's
    outputs are kept so the class count never changes. With ``iterative_steps`` > 1 the ratio is
    reached in equal steps, re-scoring the survivors after each."""
    inputs, targets = batch
    pruner = tp.pruner.BasePruner(
        model,
        example_inputs=inputs[:1],
        importance=importance,
        pruning_ratio=ratio,
        global_pruning=global_pruning,
        iterative_steps=iterative_steps,
        ignored_layers=[model.classifier_layer()],
    )
    for _ in range(iterative_steps):
        if needs_grad:
            model.zero_grad()
            nn.functional.cross_entropy(model(inputs), targets).backward()
        pruner.step()
    model.zero_grad(set_to_none=True)
    return model


@register("prune_l1", warm_start=True)
def prune_l1(model: nn.Module, batch: tuple[Tensor, Tensor], *, ratio: float, global_pruning: bool = False,
             iterative_steps: int = 1) -> nn.Module:  # fmt: skip
    """Structured L1-magnitude channel pruning."""
    imp = tp.importance.GroupMagnitudeImportance(p=1)
    return _structured_prune(model, batch, imp, ratio, global_pruning, False, iterative_steps)


@register("prune_taylor", warm_start=True)
def prune_taylor(model: nn.Module, batch: tuple[Tensor, Tensor], *, ratio: float,
                 global_pruning: bool = False, iterative_steps: int = 1) -> nn.Module:  # fmt: skip
    """Structured channel pruning scored by first-order Taylor importance on a calibration batch."""
    imp = tp.importance.GroupTaylorImportance()
    return _structured_prune(model, batch, imp, ratio, global_pruning, True, iterative_steps)


@register("slim", warm_start=True, requires=_needs_batch_norm)
def slim(model: nn.Module, batch: tuple[Tensor, Tensor], *, ratio: float, global_pruning: bool = True,
         iterative_steps: int = 1) -> nn.Module:  # fmt: skip
    """Network slimming's pruning step: remove the channels with the smallest BatchNorm scales
    (the pipeline first fine-tunes with an L1 penalty on those scales; see ``SlimCandidate``).
    Global by default, as in the paper: the penalty decides which layers give channels up."""
    imp = tp.importance.BNScaleImportance()
    return _structured_prune(model, batch, imp, ratio, global_pruning, False, iterative_steps)


def _prunable_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]


@register("magnitude", warm_start=True, keeps_zeros=True,
          note="unstructured zeros: dense size, FLOPs and latency do not fall; see sparsity and "
          "compressed_bytes")  # fmt: skip
def magnitude(model: nn.Module, batch: tuple[Tensor, Tensor], *, ratio: float) -> nn.Module:
    """Global unstructured L1 pruning of ``ratio`` of all conv/linear weights
    (``torch.nn.utils.prune``), made permanent: the zeros are plain weights, no masks or hooks."""
    targets = _prunable_weights(model)
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=ratio)
    for module, name in targets:
        prune.remove(module, name)
    return model


@register("int8", warm_start=True, trains=False, exclusive=True,
          note="int8 kernels; params and FLOPs are those of the float network")  # fmt: skip
def int8(model: nn.Module, batch: tuple[Tensor, Tensor]) -> nn.Module:
    """Post-training static int8 quantisation (weights per channel, activations observed on the
    calibration batch); CPU only, never trained further."""
    spec = model_spec(model)
    return Int8Net(spec, qmodel=quantize_int8(model, spec, batch[0]))


def apply_strategy(name: str, model: nn.Module, batch: tuple[Tensor, Tensor], **options: Any) -> nn.Module:
    """Run strategy ``name``; the result is always in eval mode with no gradients attached."""
    try:
        fn = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}") from None
    with torch.enable_grad():
        shrunk = fn(model, batch, **options)
    return shrunk.eval()
