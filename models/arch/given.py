"""Networks a user brings: a torchvision classification model by name, or a factory of the user's
own (``package.module:callable``). Either is wrapped (``net``) so the pipeline can describe, prune
and rebuild it like its own architectures.

A pruned network of arbitrary code has no constructor argument for its widths, so its spec is
the description it was built from plus torch-pruning's pruning history (plain JSON: module name,
outputs or inputs, channel indices). Rebuilding builds the original network and replays the
history (``DependencyGraph.load_pruning_history``); the checkpoint's tensors then fit exactly.
Nothing is unpickled, and no weights are downloaded.

A factory named by a spec is imported only from a folder declared as the user's code, and only
while that declaration holds (:func:`user_code`): a checkpoint cannot make the pipeline call an
arbitrary installed function, and the user's folder never shadows an installed module.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import site
import sys
import sysconfig
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import torch
import torch_pruning as tp
from pydantic import Field, field_validator
from torch import Tensor, nn

from shrinkflow.models.architecture import ArchOptions, classifier_layers, record_pruning
from shrinkflow.models.preprocess import InputOptions

FACTORY = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"


class GivenError(ValueError):
    """A model description that cannot be built: unknown name, untrusted or missing factory."""


def torchvision_classifiers() -> list[str]:
    """Every builder ``torchvision.models.get_model`` knows for image classification."""
    import torchvision  # loads torch._dynamo (~2 s): only where a torchvision network is named

    return sorted(torchvision.models.list_models(module=torchvision.models))


# --- the user's own code ---------------------------------------------------------------------


@functools.cache
def _installed_names() -> frozenset[str]:
    """Top-level names the standard library and the installed distributions provide."""
    return frozenset(
        {*sys.stdlib_module_names, *sys.builtin_module_names, *importlib.metadata.packages_distributions()}
    )


@functools.cache
def _site_folders() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    folders = [*site.getsitepackages(), site.getusersitepackages(), paths["purelib"], paths["platlib"]]
    return tuple(dict.fromkeys(f for f in folders if Path(f).is_dir()))


def installed(name: str) -> bool:
    """Whether an installed or standard module is called ``name`` (a folder of the working
    directory or of ``PYTHONPATH`` does not count: it is nobody's installation)."""
    if name in _installed_names():
        return True
    return importlib.machinery.PathFinder.find_spec(name, _site_folders()) is not None


@dataclass(frozen=True)
class UserCode:
    """A folder of the user's code: the top-level modules and packages served from it
    (``names``), and those never imported from it because an installed or standard module has
    the same name (``shadowing``)."""

    root: Path
    names: tuple[str, ...]
    shadowing: tuple[str, ...]

    @classmethod
    def scan(cls, path: str | Path) -> UserCode:
        root = Path(path).resolve()
        if not root.is_dir():
            raise GivenError(f"model.code_path {path} is not a directory")
        found = sorted(
            {
                entry.stem if entry.suffix == ".py" else entry.name
                for entry in root.iterdir()
                if (entry.suffix == ".py" and entry.is_file()) or (entry / "__init__.py").is_file()
            }
        )
        names = [name for name in found if name.isidentifier()]
        return cls(root, tuple(n for n in names if not installed(n)), tuple(n for n in names if installed(n)))


# Top-level name -> the folders serving it now, innermost last (a registered model's code/ loaded
# during a run serves the user's package while it loads, then the run's folder does again).
_SERVED: dict[str, list[Path]] = {}
_SHADOWED: dict[str, list[Path]] = {}
_ENTERED: list[Path] = []  # the folders of the blocks open now, outermost first
_LOCK = threading.Lock()


class _UserFinder(importlib.abc.MetaPathFinder):
    """Finds only the user's own top-level names, each in the folder that serves it; submodules
    are then found through their package's ``__path__``, inside that folder. It may go first on
    ``sys.meta_path`` because it never answers for a name an installed or standard module has,
    and going first keeps a same-named folder in the working directory from shadowing the user's."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        root = _serving(fullname) if "." not in fullname else None
        return None if root is None else importlib.machinery.PathFinder.find_spec(fullname, [str(root)])


_FINDER = _UserFinder()


def _serving(name: str) -> Path | None:
    with _LOCK:
        roots = _SERVED.get(name)
        return roots[-1] if roots else None


def _push(table: dict[str, list[Path]], names: tuple[str, ...], root: Path) -> None:
    for name in names:
        table.setdefault(name, []).append(root)


def _pop(table: dict[str, list[Path]], names: tuple[str, ...], root: Path) -> None:
    for name in names:
        roots = table[name]
        del roots[len(roots) - 1 - roots[::-1].index(root)]
        if not roots:
            del table[name]


@contextlib.contextmanager
def user_code(path: str | Path) -> Iterator[UserCode]:
    """Inside the block, the user's own top-level modules and packages in ``path`` import from
    there, and factories are resolved from there (and from nowhere else). The folder is not put
    on ``sys.path``: a name in it that an installed or standard module has (``matplotlib``,
    ``json``) is never imported from it. Nested and concurrent blocks are fine (threads of one
    run each hold one); the innermost folder serves a name both hold."""
    code = UserCode.scan(path)
    with _LOCK:
        _push(_SERVED, code.names, code.root)
        _push(_SHADOWED, code.shadowing, code.root)
        _ENTERED.append(code.root)
        if _FINDER not in sys.meta_path:
            sys.meta_path.insert(0, _FINDER)
    try:
        yield code
    finally:
        with _LOCK:
            _pop(_SERVED, code.names, code.root)
            _pop(_SHADOWED, code.shadowing, code.root)
            del _ENTERED[len(_ENTERED) - 1 - _ENTERED[::-1].index(code.root)]
            if not _SERVED and _FINDER in sys.meta_path:
                sys.meta_path.remove(_FINDER)


def user_code_folders() -> list[Path]:
    """The folders :func:`user_code` serves now, outermost first: what another process must
    serve, in that order, to build the same networks."""
    with _LOCK:
        return list(dict.fromkeys(_ENTERED))


def _imported_from(root: Path) -> None:
    """Forget the modules of the names ``root`` serves now (and their submodules) that were
    imported from anywhere else, so the next import reads the folder that serves them now."""
    for top in [name for name, roots in _SERVED.items() if roots[-1] == root]:
        cached = sys.modules.get(top)
        origin = getattr(cached, "__file__", None) if cached is not None else None
        if cached is None or (origin and Path(origin).resolve().is_relative_to(root)):
            continue
        for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
            del sys.modules[name]


def resolve_factory(factory: str) -> Any:
    """The callable ``package.module:name`` names, imported from the user's code folder that
    serves its package now (see :func:`user_code`)."""
    module_name, _, attr = factory.partition(":")
    top = module_name.split(".")[0]
    root = _serving(top)
    if root is None:
        raise GivenError(_unserved(factory, top))
    with _LOCK:
        _imported_from(root)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise GivenError(f"factory {factory}: cannot import {module_name} from {root}: {exc}") from None
    origin = Path(getattr(module, "__file__", "") or "/").resolve()
    if not origin.is_relative_to(root):
        raise GivenError(f"factory {factory}: {module_name} is at {origin}, outside its code folder {root}")
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise GivenError(f"factory {factory}: {module_name} has no callable {attr!r}")
    return fn


def _unserved(factory: str, top: str) -> str:
    with _LOCK:
        shadowed = (_SHADOWED.get(top) or [None])[-1]
        folders = sorted({str(r) for roots in _SERVED.values() for r in roots})
    if shadowed is not None:
        return (
            f"factory {factory}: the package {top!r} in {shadowed} has the name of an installed or "
            "standard module, so it is never imported from there; rename the package"
        )
    where = ", ".join(folders) or "no folder (set model.code_path)"
    return f"factory {factory}: no package {top!r} in the user's code ({where})"


def code_packages(factory: str) -> list[Path]:
    """The top-level package (or module) a factory lives in and those of the same code folder it
    imports, directly or through one another (read from their source): what travels with a
    registered model so that it loads elsewhere. A name the folder does not serve (an installed
    module's) never travels."""
    top = factory.partition(":")[0].split(".")[0]
    root = _serving(top)
    if root is None:
        raise GivenError(_unserved(factory, top))
    with _LOCK:
        served = {name for name, roots in _SERVED.items() if roots[-1] == root}
    found, queue = [top], [top]
    while queue:
        for name in sorted(_imported_names(_location(root, queue.pop())) & served - set(found)):
            found.append(name)
            queue.append(name)
    return [_location(root, name) for name in found]


def _location(root: Path, name: str) -> Path:
    return root / name if (root / name / "__init__.py").is_file() else root / f"{name}.py"


def _imported_names(location: Path) -> set[str]:
    """The top-level names the Python files at ``location`` import (absolute imports)."""
    names: set[str] = set()
    for file in sorted(location.rglob("*.py")) if location.is_dir() else [location]:
        try:
            tree = ast.parse(file.read_bytes(), str(file))
        except SyntaxError:
            continue  # Python refuses it when it is imported, with its own message
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


# --- what a network returns ---------------------------------------------------------------------


def logits_of(output: Any, key: str | None = None) -> Tensor:
    """The logits in a network's output: the tensor itself, a tuple's first element (auxiliary
    outputs follow it: GoogLeNet, Inception), or a mapping's ``key`` (default ``logits``)."""
    if isinstance(output, Tensor) and key is None:
        return output
    if isinstance(output, Mapping):
        wanted = key or "logits"
        if wanted not in output:
            keys = ", ".join(repr(k) for k in list(output)[:8])
            raise GivenError(
                f"the network returns a mapping with keys {keys} and no {wanted!r}; set model.output "
                "to the key of its logits"
            )
        output = output[wanted]
    elif key is not None:
        raise GivenError(f"model.output is {key!r} but the network returns {_kind(output)}, not a mapping")
    elif isinstance(output, tuple | list):
        output = output[0] if output else None
    if not isinstance(output, Tensor):
        raise GivenError(
            f"the network returns {_kind(output)} where its logits should be; it must return one tensor "
            "(or a tuple whose first element, or a mapping whose 'logits' or model.output entry, is one)"
        )
    return output


def _kind(value: Any) -> str:
    if isinstance(value, tuple | list):
        return f"a {type(value).__name__} of {len(value)}"
    return "None" if value is None else f"a {type(value).__name__}"


class GivenOptions(ArchOptions):
    """What every model brought from outside declares besides how to build it: ``weights`` (a
    plain state dict, ``.pt`` or ``.safetensors``, relative to the project; none: a fresh
    initialisation trained as a baseline), its ``input`` (see :class:`InputOptions`), ``classes``
    (its outputs' class names, in output order, when that differs from the data's sorted folder
    order), ``output`` (the key of the logits when the network returns a mapping; default
    ``logits``) and ``finetune`` (epochs of training before it becomes the baseline; 0 takes it as
    it is)."""

    weights: Annotated[str, Field(min_length=1)] | None = None
    input: InputOptions = InputOptions()
    classes: tuple[str, ...] | None = None
    output: Annotated[str, Field(min_length=1)] | None = None
    finetune: Annotated[int, Field(ge=0)] = 0

    def description(self) -> dict[str, Any]:
        """The constructor arguments that build the network (less the data's shape)."""
        raise NotImplementedError

    def _output(self) -> dict[str, Any]:
        return {"output": self.output} if self.output else {}  # absent: the specs of older checkpoints

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
        return {"name": self.name, "kwargs": dict(self.kwargs), **self._output()}


class FactoryOptions(GivenOptions):
    arch: Literal["factory"] = "factory"
    factory: Annotated[str, Field(pattern=FACTORY)]
    kwargs: dict[str, Any] = {}
    code_path: Annotated[str, Field(min_length=1)] = "."  # the folder holding the package, from the project

    def description(self) -> dict[str, Any]:
        return {"factory": self.factory, "kwargs": dict(self.kwargs), **self._output()}


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
        output: str | None = None,
    ) -> None:
        super().__init__()
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes
        self.output = output
        self.net = self.build()
        self.pruning_history: list = []
        if pruning_history:
            self.replay(list(pruning_history))

    def build(self) -> nn.Module:
        raise NotImplementedError

    def description(self) -> dict[str, Any]:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return logits_of(self.net(x), self.output)

    def _output(self) -> dict[str, Any]:
        return {"output": self.output} if self.output else {}

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
        return {"name": self.name, "kwargs": self.kwargs, **self._output()}


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
        return {"factory": self.factory, "kwargs": self.kwargs, **self._output()}
