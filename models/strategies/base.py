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

from shrinkflow.models.registry import ARCHITECTURES

Batch = tuple[Tensor, Tensor]
Shrink = Callable[..., nn.Module]  # (model, calibration batch, **options) -> smaller model


class StrategyOptions(BaseModel):
    """The options a strategy reads from its candidate's entry in ``params.yaml``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Options the pipeline consumes around the strategy (a pre-phase) rather than passing to it.
    PHASE_KEYS: ClassVar[frozenset[str]] = frozenset()

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
    ``exclusive``: it traces the model with torch.fx, which patches ``nn.Module.__call__`` for the
    whole process while it runs, so no other model may train in the same process meanwhile.
    ``note``: what a reader of the results table must know about its figures."""

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
    note: str = ""

    def refusal(self, arch_options: dict[str, Any]) -> str | None:
        """Why this strategy cannot shrink the architecture ``arch_options`` describes, or None."""
        arch = ARCHITECTURES[arch_options["arch"]]
        if self.needs_parametric and not getattr(arch, "PARAMETRIC", True):
            return (
                "needs a parametric architecture (widths and depths as constructor arguments); a model "
                "brought from outside can be pruned instead (prune_l1, prune_taylor, prune_fpgm, magnitude)"
            )
        if self.needs_batch_norm and not arch.has_batch_norm(arch_options):
            return "ranks channels by BatchNorm scales, so it needs BatchNorm; set model.batch_norm: true"
        if self.needs_depth and arch.removable_blocks(arch_options) < 1:
            return "needs a layer or block it can drop; this architecture has only one of each"
        return None

    def __call__(self, model: nn.Module, batch: Batch, **options: Any) -> nn.Module:
        return self.shrink(model, batch, **options)
