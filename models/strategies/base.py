"""What a shrink strategy is: one object that knows how to shrink a model, which options it
reads, and the facts the pipeline and the tests need about it.

A strategy takes the trained baseline and a calibration batch and returns a smaller model; the
candidate is then trained with the same loop as the baseline. Strategies never train.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from shrinkflow.models.lowrank import low_rank_layers
from shrinkflow.models.registry import ARCHITECTURES

Batch = tuple[Tensor, Tensor]
Shrink = Callable[..., nn.Module]  # (model, calibration batch, **options) -> smaller model


class StrategyOptions(BaseModel):
    """The options a strategy reads from its candidate's entry in ``params.yaml``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Options the pipeline consumes around the strategy (a pre-phase) rather than passing to it.
    PHASE_KEYS: ClassVar[frozenset[str]] = frozenset()
    # Options the pipeline reads to decide what to pass (a budget's allocation), recorded with
    # the candidate but never passed to the strategy.
    ALLOCATION_KEYS: ClassVar[frozenset[str]] = frozenset()
    # Options that set how much is removed instead of ``ratio`` (a candidate gives exactly one of
    # ``ratio``, these and ``search``).
    RATIO_ALTERNATIVES: ClassVar[tuple[str, ...]] = ()

    def sparsity_phase(self) -> tuple[int, float] | None:
        """``(epochs, L1 strength on BatchNorm scales)`` to fine-tune with before shrinking."""
        return None


class RatioOptions(StrategyOptions):
    """A strategy with a ``ratio`` knob: the fraction removed (``None`` when a search sets it)."""

    ratio: Annotated[float, Field(gt=0, lt=1)] | None = None


@dataclass(frozen=True)
class Strategy:
    """One shrink strategy.

    ``warm_start``: it keeps the baseline's weights (fine-tune) rather than a fresh init.
    ``trains``: False for a final step (int8), whose result is never trained further.
    ``keeps_zeros``: fine-tuning must hold its zeroed weights at zero (unstructured sparsity).
    ``changes_shapes``: it removes channels, layers or widths (False: same shapes, other values).
    ``needs_batch_norm`` / ``needs_depth``: architectures without BatchNorm, or with no layer to
    drop, are refused when the config is read.
    ``needs_parametric``: it rebuilds the network from constructor arguments (widths, depths), so
    a network brought from outside (torchvision by name, a factory) is refused.
    ``needs_graph``: it prunes through torch-pruning's dependency graph, so it fails at once on
    a network whose graph probe found none (:mod:`shrinkflow.models.probe`).
    ``after_lowrank``: it may shrink a network that is already factorised. A spec replays the
    pruning history before it restores the factorised layers, so a shape change after
    factorising could not be rebuilt (magnitude and int8 change no shape and are not refused).
    ``exclusive``: it traces the model with torch.fx, which patches ``nn.Module.__call__`` for the
    whole process while it runs, so no other model may train in the same process meanwhile.
    ``note``: what a reader of the results table must know about its figures.
    ``scores``: a structured pruner's per-channel importance of each prunable group, by root
    module name (what a ``global`` budget allocation ranks)."""

    name: str
    shrink: Shrink
    options: type[StrategyOptions]
    warm_start: bool
    trains: bool = True
    keeps_zeros: bool = False
    changes_shapes: bool = True
    needs_batch_norm: bool = False
    needs_depth: bool = False
    needs_parametric: bool = False
    needs_graph: bool = False
    exclusive: bool = False
    after_lowrank: bool = False
    note: str = ""
    scores: Callable[[nn.Module, Batch], dict[str, Tensor]] | None = None

    def refusal(self, arch_options: dict[str, Any]) -> str | None:
        """Why this strategy cannot shrink the architecture ``arch_options`` describes, or None."""
        arch = ARCHITECTURES[arch_options["arch"]]
        if self.needs_parametric and not getattr(arch, "PARAMETRIC", True):
            return (
                "needs a parametric architecture (widths and depths as constructor arguments); a model "
                "brought from outside can be pruned or factorised instead (prune_l1, prune_taylor, "
                "prune_fpgm, magnitude, lowrank)"
            )
        if self.needs_batch_norm and not arch.has_batch_norm(arch_options):
            return "ranks channels by BatchNorm scales, so it needs BatchNorm; set model.batch_norm: true"
        if self.needs_depth and arch.removable_blocks(arch_options) < 1:
            return "needs a layer or block it can drop; this architecture has only one of each"
        return None

    def __call__(self, model: nn.Module, batch: Batch, **options: Any) -> nn.Module:
        if self.changes_shapes and not self.after_lowrank and low_rank_layers(model):
            raise ValueError(
                f"{self.name} cannot shrink a network with factorised layers (lowrank): prune first, "
                "then factorise"
            )
        return self.shrink(model, batch, **options)
