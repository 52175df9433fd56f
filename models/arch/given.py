"""Networks a user brings: a torchvision classification model by name, or a factory of the user's
own (``package.module:callable``). Either is wrapped (``net``) so the pipeline can describe, prune
and rebuild it like its own architectures.

A pruned network of arbitrary code has no constructor argument for its widths, so its spec is
the description it was built from plus torch-pruning's pruning history (plain JSON: module name,
outputs or inputs, channel indices). Rebuilding builds the original network and replays the
history (``DependencyGraph.load_pruning_history``); the checkpoint's tensors then fit exactly.
Nothing is unpickled, and no weights are downloaded.

A factory named by a spec is imported only from a folder the run declared as the user's code
(:func:`trust_code`): a checkpoint cannot make the pipeline call an arbitrary installed function.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import torch
import torch_pruning as tp
from pydantic import Field, field_validator
from torch import Tensor, nn

from shrinkflow.models.architecture import ArchOptions, classifier_layers, record_pruning
from shrinkflow.models.preprocess import InputOptions

FACTORY = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"
_TRUSTED: list[Path] = []


class GivenError(ValueError):
    """A model description that cannot be built: unknown name, untrusted or missing factory."""


def torchvision_classifiers() -> list[str]:
    """Every builder ``torchvision.models.get_model`` knows for image classification."""
    import torchvision  # loads torch._dynamo (~2 s): only where a torchvision network is named

    return sorted(torchvision.models.list_models(module=torchvision.models))


def trust_code(path: str | Path) -> Path:
    """Declare ``path`` a folder of the user's own code: it goes first on ``sys.path`` and
    factories are imported from it (and from nowhere else)."""
    root = Path(path).resolve()
    if not root.is_dir():
        raise GivenError(f"model.code_path {path} is not a directory")
    if root not in _TRUSTED:
        _TRUSTED.append(root)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return root


def resolve_factory(factory: str) -> Any:
    """The callable ``package.module:name`` names, imported from a trusted code folder."""
    module_name, _, attr = factory.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        where = ", ".join(str(p) for p in _TRUSTED) or "no folder (set model.code_path)"
        raise GivenError(f"factory {factory}: cannot import {module_name} from {where}: {exc}") from None
    origin = Path(getattr(module, "__file__", "") or "/").resolve()
    if not any(origin.is_relative_to(root) for root in _TRUSTED):
        raise GivenError(
            f"factory {factory}: {module_name} is at {origin}, outside the code folders this run trusts "
            "(model.code_path)"
        )
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise GivenError(f"factory {factory}: {module_name} has no callable {attr!r}")
    return fn


def code_package(factory: str) -> Path:
    """The folder of the top-level package (or module) a factory lives in: what travels with a
    registered model so that it loads elsewhere."""
    top = factory.partition(":")[0].split(".")[0]
    module = importlib.import_module(top)
    path = Path(module.__file__).resolve()
    return path.parent if path.name == "__init__.py" else path


class GivenOptions(ArchOptions):
    """What every model brought from outside declares besides how to build it: ``weights`` (a
    plain state dict, ``.pt`` or ``.safetensors``, relative to the project; none: a fresh
    initialisation trained as a baseline), its ``input`` (see :class:`InputOptions`), ``classes``
    (its outputs' class names, in output order, when that differs from the data's sorted folder
    order) and ``finetune`` (epochs of training before it becomes the baseline; 0 takes it as it
    is)."""

    weights: Annotated[str, Field(min_length=1)] | None = None
    input: InputOptions = InputOptions()
    classes: tuple[str, ...] | None = None
    finetune: Annotated[int, Field(ge=0)] = 0

    def description(self) -> dict[str, Any]:
        """The constructor arguments that build the network (less the data's shape)."""
        raise NotImplementedError

    def arch_options(self) -> dict[str, Any]:
        """``{"arch": ..., **description}``: a model spec less the data's shape (the weights,
        input, classes and fine-tuning are the pipeline's business, not the network's)."""
        return {"arch": self.arch, **self.description()}


class TorchvisionOptions(GivenOptions):
    arch: Literal["torchvision"] = "torchvision"
    name: str
    kwargs: dict[str, Any] = {}

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in torchvision_classifiers():
            raise ValueError(
                f"torchvision has no classification model {name!r} (see torchvision.models.list_models())"
            )
        return name

    @field_validator("kwargs")
    @classmethod
    def _no_weights(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        if {"weights", "num_classes"} & set(kwargs):
            raise ValueError(
                "weights and num_classes are set by shrinkflow (model.weights; the data's classes)"
            )
        return kwargs

    def description(self) -> dict[str, Any]:
        return {"name": self.name, "kwargs": dict(self.kwargs)}


class FactoryOptions(GivenOptions):
    arch: Literal["factory"] = "factory"
    factory: Annotated[str, Field(pattern=FACTORY)]
    kwargs: dict[str, Any] = {}
    code_path: Annotated[str, Field(min_length=1)] = "."  # the folder holding the package, from the project

    def description(self) -> dict[str, Any]:
        return {"factory": self.factory, "kwargs": dict(self.kwargs)}


class _Given(nn.Module):
    """The wrapper: ``net`` is the user's network, untouched; the spec describes how to build it
    again and the pruning that was applied to it since."""

    ARCH: ClassVar[str]
    PARAMETRIC: ClassVar[bool] = False  # no width or depth argument: width and depth do not apply

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        num_classes: int,
        pruning_history: list | tuple = (),
    ) -> None:
        super().__init__()
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes
        self.net = self.build()
        self.pruning_history: list = []
        if pruning_history:
            self.replay(list(pruning_history))

    def build(self) -> nn.Module:
        raise NotImplementedError

    def description(self) -> dict[str, Any]:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def example(self) -> Tensor:
        return torch.zeros(1, self.in_channels, self.image_size, self.image_size)

    def replay(self, history: list) -> None:
        """Prune this freshly built network exactly as the history says."""
        graph = tp.DependencyGraph().build_dependency(self, example_inputs=self.example())
        graph.load_pruning_history(history)
        record_pruning(self, history)

    def spec(self) -> dict[str, Any]:
        return {
            "arch": self.ARCH,
            **self.description(),
            "in_channels": self.in_channels,
            "image_size": self.image_size,
            "num_classes": self.num_classes,
            "pruning_history": [list(entry) for entry in self.pruning_history],
        }

    def classifier_layer(self) -> nn.Module:
        """The layer whose outputs are the classes, found (see ``classifier_layers``)."""
        return classifier_layers(self.net, self.num_classes)[0]

    def shallower(self, drop: int) -> nn.Module:
        raise ValueError(f"{self.ARCH} networks have no depth argument; prune them instead")

    @classmethod
    def has_batch_norm(cls, options: dict[str, Any]) -> bool:
        return True  # unknown before it is built: slim fails that candidate alone if it has none

    @classmethod
    def removable_blocks(cls, options: dict[str, Any]) -> int:
        return 0

    @classmethod
    def min_image_size(cls, options: dict[str, Any]) -> int:
        return 1


class TorchvisionNet(_Given):
    """``torchvision.models.get_model(name, num_classes=...)``, its standard stem, no weights."""

    ARCH: ClassVar[str] = "torchvision"
    Options: ClassVar[type[ArchOptions]] = TorchvisionOptions

    def __init__(self, name: str, kwargs: dict[str, Any] | None = None, **shape: Any) -> None:
        if name not in torchvision_classifiers():
            raise GivenError(f"torchvision has no classification model {name!r}")
        self.name, self.kwargs = name, dict(kwargs or {})
        super().__init__(**shape)

    def build(self) -> nn.Module:
        import torchvision

        return torchvision.models.get_model(
            self.name, weights=None, num_classes=self.num_classes, **self.kwargs
        )

    def description(self) -> dict[str, Any]:
        return {"name": self.name, "kwargs": self.kwargs}


class FactoryNet(_Given):
    """``factory(**kwargs)`` from the user's own code (imported from a trusted folder only)."""

    ARCH: ClassVar[str] = "factory"
    Options: ClassVar[type[ArchOptions]] = FactoryOptions

    def __init__(self, factory: str, kwargs: dict[str, Any] | None = None, **shape: Any) -> None:
        self.factory, self.kwargs = factory, dict(kwargs or {})
        super().__init__(**shape)

    def build(self) -> nn.Module:
        net = resolve_factory(self.factory)(**self.kwargs)
        if not isinstance(net, nn.Module):
            raise GivenError(f"factory {self.factory} returned a {type(net).__name__}, not a torch nn.Module")
        return net

    def description(self) -> dict[str, Any]:
        return {"factory": self.factory, "kwargs": self.kwargs}
