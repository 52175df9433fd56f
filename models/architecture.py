"""What a network must provide to go through the pipeline, and the options model it reads.

Every architecture lives in its own module under ``models/arch/`` and is found there by
:mod:`shrinkflow.models.registry`; nothing else names it. Its ``Options`` (a pydantic model keyed on
``arch``) is the ``model`` section of ``params.yaml`` for that architecture.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn


class ArchOptions(BaseModel):
    """The ``model`` section for one architecture; subclasses add ``arch: Literal[...]`` and the
    keys that architecture reads (unknown keys are refused)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: str

    def arch_options(self) -> dict[str, Any]:
        """``{"arch": ..., **options}``, JSON-ready (tuples as lists): a model spec less the shape
        of the data."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.model_dump().items()}


@runtime_checkable
class Architecture(Protocol):
    """A network class the pipeline can build, shrink and checkpoint."""

    ARCH: ClassVar[str]  # its name in params.yaml and in every spec
    Options: ClassVar[type[ArchOptions]]
    in_channels: int
    image_size: int
    num_classes: int

    def spec(self) -> dict[str, Any]:
        """Constructor arguments (with ``arch``) that rebuild this exact network, pruned or not."""
        ...

    def classifier_layer(self) -> nn.Linear:
        """The final linear layer, whose outputs (the classes) pruning must keep."""
        ...

    def shallower(self, drop: int) -> nn.Module:
        """A copy with ``drop`` layers or blocks removed, surviving weights kept."""
        ...

    @classmethod
    def has_batch_norm(cls, options: dict[str, Any]) -> bool: ...

    @classmethod
    def removable_blocks(cls, options: dict[str, Any]) -> int:
        """How many layers or blocks ``shallower`` can drop for these options."""
        ...

    @classmethod
    def min_image_size(cls, options: dict[str, Any]) -> int:
        """The smallest input side these options can process."""
        ...


def classifier_layers(model: nn.Module, num_classes: int | None = None) -> list[nn.Module]:
    """The layers whose outputs are the classes, which pruning must keep: an architecture's own
    ``classifier_layer()``; for any other network, the last linear layer (or 1x1 convolution, as
    in SqueezeNet) with ``num_classes`` outputs (default: the model's ``num_classes``)."""
    if callable(getattr(model, "classifier_layer", None)):
        return [model.classifier_layer()]
    num_classes = num_classes or getattr(model, "num_classes", None)
    heads = [
        m
        for m in model.modules()
        if (isinstance(m, nn.Linear) and m.out_features == num_classes)
        or (isinstance(m, nn.Conv2d) and m.out_channels == num_classes and m.kernel_size == (1, 1))
    ]
    if not heads:
        raise ValueError(f"no linear layer with {num_classes} outputs (the classes) found in the model")
    return heads[-1:]


def record_pruning(model: nn.Module, history: list) -> None:
    """Append torch-pruning's ``DependencyGraph.pruning_history()`` entries to the model's own
    (a network that is rebuilt by replaying its pruning keeps one; others ignore it), as plain
    JSON: ``[module name, pruned outputs?, [indices]]``; then bring the widths a forward reads
    from attributes in line (pruning and its replay both end here)."""
    kept = getattr(model, "pruning_history", None)
    if isinstance(kept, list):
        kept.extend([name, bool(out), [int(i) for i in idxs]] for name, out, idxs in history)
    follow_pruned_widths(model)


def follow_pruned_widths(model: nn.Module) -> None:
    """Widths torch-pruning cannot see: torchvision's ``VisionTransformer`` reshapes its patch
    embedding by ``hidden_dim``, which must follow the pruned ``conv_proj`` (matched by name, so
    that this module need not import torchvision)."""
    for module in model.modules():
        patches = getattr(module, "conv_proj", None)
        if type(module).__name__ == "VisionTransformer" and isinstance(patches, nn.Conv2d):
            module.hidden_dim = patches.out_channels


def pruning_summary(model: nn.Module, example: Tensor) -> dict[str, object]:
    """What torch-pruning finds in ``model``: how many groups of coupled layers it can prune
    together, and which layers with weights belong to none (left alone; the classifier always).
    A layer inside one that is narrowed (the output projection of ``nn.MultiheadAttention``)
    is narrowed with it. Unbounded on some networks (Swin): call it through
    :func:`shrinkflow.models.probe.probe_graph` on a network nobody has checked."""
    import torch_pruning as tp

    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    groups = list(graph.get_all_groups(ignored_layers=classifier_layers(model)))
    names = {module: name for name, module in model.named_modules()}
    narrowed = {
        names[item.dep.target.module]
        for group in groups
        for item in group
        if graph.is_out_channel_pruning_fn(item.dep.handler) and item.dep.target.module in names
    }
    weighted = [
        n for n, m in model.named_modules() if not list(m.children()) and list(m.parameters(recurse=False))
    ]
    alone = [n for n in weighted if not any(n == k or n.startswith(f"{k}.") for k in narrowed)]
    return {"groups": len(groups), "left_alone": alone}
