"""What each stage reads and writes, declared once: ``dvc.yaml`` is generated from these specs
(``python -m shrinkflow.tasks.stage_specs > dvc.yaml``; a test checks the committed file is what
they generate), and Prefect's cache keys (:mod:`shrinkflow.tasks.pipeline.cache`) hash the same code
and params, so DVC and Prefect always agree on what must re-run. Directories come from
``params.yaml``'s ``paths`` section and file names from :class:`shrinkflow.tasks.layout.Files`.

A stage's code is derived, never listed: it is the import closure, within shrinkflow, of the
modules that do the stage's work (:data:`ENTRIES`), so a module a stage starts to import joins its
dependencies by itself. Every import statement counts (function-level and relative ones too), and a
module brings its packages' ``__init__``. The entry points are the modules whose functions the
runner (:mod:`shrinkflow.tasks.pipeline.stages`) calls for that stage, not the runner or the CLI: those
import every stage in order to sequence and log them, so their closure would make each stage depend
on all the code. The runner's own lines only open and close MLflow runs and set the thread count
(from :func:`shrinkflow.tasks.training.train.threads_per_worker`, which the entry points cover).

- ``prepare``: :mod:`~shrinkflow.tasks.data.prepare` (``prepare``: the sources, the data checks, and the
  resizing through :mod:`shrinkflow.models.preprocess`);
- ``baseline`` and ``shrink``: :mod:`~shrinkflow.tasks.training.train` (``train_baseline``,
  ``shrink_candidate``: a brought model's intake, the training loop, searches, allocation);
- ``sensitivity``: :mod:`~shrinkflow.tasks.training.sensitivity` (``sensitivity_stage``: the measured
  tables budget candidates allocate from), plus :mod:`~shrinkflow.tasks.training.train`, whose
  ``threads_per_worker`` sets the thread count its floats are measured with;
- ``evaluate``: :mod:`~shrinkflow.tasks.measurement.evaluate` (``evaluate_models``);
- ``promote``: :mod:`~shrinkflow.tasks.promotion.promote` (``promote``), plus
  :mod:`~shrinkflow.tasks.decision.report` and :mod:`~shrinkflow.tasks.promotion.reproduce`, whose
  report, Pareto plot and provenance tags the runner adds to the promote stage's outputs and to the
  version it registers.

``models/`` is declared as one folder: its registries import every module of ``models/arch/`` and
``models/strategies/`` at run time (an architecture or strategy is found, not imported by name),
which no import statement shows, and every stage reaches it through the config.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from shrinkflow.tasks.layout import Files

CODE_ROOT = Path(__file__).resolve().parents[1]  # where tasks/ and models/ are
PACKAGE = "shrinkflow"  # what CODE_ROOT installs as
# Folders declared whole: their registries find their modules at run time (see the docstring).
WHOLE = ("models",)
PREPARED, BASELINE, SENSITIVITY, CANDIDATES, REPORTS = (
    f"${{paths.{p}}}" for p in ("prepared", "baseline", "sensitivity", "candidates", "reports")
)
REPORT = {name: f"{REPORTS}/{getattr(Files, name)}" for name in vars(Files) if name.isupper()}
# A foreach stage's item: one candidate's name.
KEY = "${key}"


@dataclass(frozen=True)
class Out:
    path: str
    cache: bool = True  # False: small files kept in git rather than DVC's cache
    metric: bool = False
    persist: bool = False  # True: DVC leaves it in place when the stage re-runs

    def entry(self) -> str | dict:
        flags = {
            **({"cache": False} if not self.cache else {}),
            **({"persist": True} if self.persist else {}),
        }
        return {self.path: flags} if flags else self.path


@dataclass(frozen=True)
class StageSpec:
    cmd: str
    data: tuple[str, ...]  # data the stage reads (DVC deps; the cache keys use fingerprints)
    entries: tuple[str, ...]  # the modules that do its work; its code is their import closure
    params: tuple[str, ...]  # params.yaml keys it reads (dotted; ${key} is a foreach item)
    outs: tuple[Out, ...] = field(default=())
    foreach: str | None = None

    def dvc(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "cmd": self.cmd,
            "deps": [*self.data, *self.code],
            "params": list(self.params),
        }
        if outs := [o.entry() for o in self.outs if not o.metric]:
            body["outs"] = outs
        if metrics := [o.entry() for o in self.outs if o.metric]:
            body["metrics"] = metrics
        return {"foreach": self.foreach, "do": body} if self.foreach else body

    @property
    def code(self) -> tuple[str, ...]:
        """The source files and folders whose change re-runs the stage (relative to the code root)."""
        return code_of(self.entries)


@functools.cache
def code_of(entries: tuple[str, ...]) -> tuple[str, ...]:
    """The files the modules ``entries`` can run, relative to :data:`CODE_ROOT`, with the
    :data:`WHOLE` folders they reach as one entry each; sorted."""
    files = sorted(f.relative_to(CODE_ROOT).as_posix() for f in import_closure(entries))
    whole = [top for top in WHOLE if any(f.startswith(f"{top}/") for f in files)]
    return (*whole, *(f for f in files if not f.startswith(tuple(f"{top}/" for top in whole))))


def import_closure(entries: Iterable[str], root: Path = CODE_ROOT, package: str = PACKAGE) -> set[Path]:
    """The files of ``package`` (its source at ``root``) that importing the modules ``entries``
    can run: every import statement of every file reached, function-level and relative ones
    included, followed within the package; a module brings its packages' ``__init__``."""
    seen: set[Path] = set()
    todo = list(entries)
    for name in todo:
        if not module_files(name, root, package):
            raise ValueError(f"entry point {name!r} is no module of {package} under {root}")
    while todo:
        for file in module_files(todo.pop(), root, package):
            if file not in seen:
                seen.add(file)
                todo.extend(_imports(file, root, package))
    return seen


def module_files(name: str, root: Path, package: str) -> list[Path]:
    """The files importing module ``name`` runs: its packages' ``__init__`` and its own file;
    none when ``name`` is outside ``package`` or not a module (a class imported from one)."""
    if name != package and not name.startswith(f"{package}."):
        return []
    parts = name.split(".")[1:]
    own = [root.joinpath(*parts[:-1], f"{parts[-1]}.py")] if parts else []
    found = next((f for f in (*own, root.joinpath(*parts, "__init__.py")) if f.is_file()), None)
    if found is None:
        return []
    inits = (root.joinpath(*parts[:i], "__init__.py") for i in range(len(parts)))
    return [*(f for f in inits if f.is_file()), found]


def _imports(file: Path, root: Path, package: str) -> list[str]:
    """Every module name ``file`` imports, absolute; ``from m import x`` names both ``m`` and
    ``m.x``, which is a module when ``x`` is a submodule."""
    parts = file.relative_to(root).with_suffix("").parts
    here = ".".join((package, *parts))
    parent = here.removesuffix(".__init__") if file.name == "__init__.py" else here.rpartition(".")[0]
    names: list[str] = []
    for node in ast.walk(ast.parse(file.read_bytes(), str(file))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), parent)
            names += [base, *(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")]
    return names


# The modules that do each stage's work (see the module docstring for why these).
ENTRIES = {
    "prepare": ("shrinkflow.tasks.data.prepare",),
    "train": ("shrinkflow.tasks.training.train",),
    "sensitivity": ("shrinkflow.tasks.training.sensitivity", "shrinkflow.tasks.training.train"),
    "evaluate": ("shrinkflow.tasks.measurement.evaluate",),
    "promote": (
        "shrinkflow.tasks.promotion.promote",
        "shrinkflow.tasks.decision.report",
        "shrinkflow.tasks.promotion.reproduce",
    ),
}
# Every model's paired comparison with the baseline, and the ratio searches, read these.
GATE_PARAMS = ("promote.tolerance", "promote.tolerance_mode", "promote.confidence")

STAGES: dict[str, StageSpec] = {
    "prepare": StageSpec(
        cmd="shrinkflow stage prepare",
        data=("${data.root}",),
        entries=ENTRIES["prepare"],
        params=(
            "seed",
            *(
                f"data.{k}"
                for k in (
                    "source",
                    "root",
                    "download",
                    "image_size",
                    "channels",
                    "val_fraction",
                    "gate_fraction",
                    "test_fraction",
                    "max_train_samples",
                    "resize",
                    "heldout_root",
                )
            ),
            "model",  # a brought model's input (size, channels, mean, std) and whether it comes trained
        ),
        outs=(Out(PREPARED),),
    ),
    "baseline": StageSpec(
        cmd="shrinkflow stage baseline",
        data=(PREPARED,),
        entries=ENTRIES["train"],
        params=("seed", "data.augment", "model", "train"),
        outs=(Out(BASELINE),),
    ),
    # Persistent: a table whose key (baseline, data, strategy, ratios) still holds is kept, not
    # measured again, so a change to any candidate re-runs this stage in a moment and its output,
    # unchanged, re-runs nothing downstream.
    "sensitivity": StageSpec(
        cmd="shrinkflow stage sensitivity",
        data=(PREPARED, BASELINE),
        entries=ENTRIES["sensitivity"],
        params=("shrink.workers", "shrink.calibration_size", "shrink.candidates", "shrink.ladder"),
        outs=(Out(SENSITIVITY, persist=True),),
    ),
    "shrink": StageSpec(
        cmd=f"shrinkflow stage shrink --candidate {KEY}",
        foreach="${shrink.candidates}",
        data=(PREPARED, BASELINE, SENSITIVITY),
        entries=ENTRIES["train"],
        params=(
            "seed",
            "data.augment",
            "train",
            "shrink.workers",
            "shrink.epochs",
            "shrink.lr",
            "shrink.calibration_size",
            f"shrink.candidates.{KEY}",
            *GATE_PARAMS,
        ),
        outs=(Out(f"{CANDIDATES}/{KEY}"),),
    ),
    "evaluate": StageSpec(
        cmd="shrinkflow stage evaluate",
        data=(PREPARED, BASELINE, CANDIDATES),
        entries=ENTRIES["evaluate"],
        params=("shrink.candidates", "shrink.ladder", "evaluate", *GATE_PARAMS),
        outs=(
            Out(REPORT["CANDIDATES"]),
            Out(REPORT["PREDICTIONS"]),
            Out(REPORT["ONNX"]),
            Out(REPORT["CURVES"], cache=False),
            Out(REPORT["METRICS"], cache=False, metric=True),
        ),
    ),
    "promote": StageSpec(
        cmd="shrinkflow stage promote",
        data=(REPORT["CANDIDATES"], REPORT["PREDICTIONS"], REPORT["ONNX"], PREPARED, BASELINE, CANDIDATES),
        entries=ENTRIES["promote"],
        params=("promote",),
        outs=(
            Out(REPORT["PARETO"], cache=False),
            Out(REPORT["REPORT"], cache=False),
            Out(REPORT["PROMOTION"], cache=False, metric=True),
        ),
    ),
}

# The ladder's rungs are candidates too, built from the rung's budgets and the keys every rung
# shares (tasks/config.py's LadderConfig; a test checks the list): the shrink stage once per rung.
LADDER_KEYS = ("strategy", "lr", "epochs", "distill", "lowrank")
STAGES["ladder"] = replace(
    STAGES["shrink"],
    foreach="${shrink.ladder.rungs}",
    params=(
        *(key for key in STAGES["shrink"].params if not key.startswith("shrink.candidates")),
        *(f"shrink.ladder.{key}" for key in LADDER_KEYS),
        f"shrink.ladder.rungs.{KEY}",
    ),
)

PLOTS = [
    {
        "accuracy-vs-size": {
            "title": "Accuracy against model size (every model)",
            "template": "scatter",
            "x": "size_bytes",
            "y": {REPORT["CANDIDATES"]: ["val_acc", "gate_acc", "test_acc"]},
            "x_label": "checkpoint size (bytes)",
            "y_label": "accuracy (%)",
        }
    },
    REPORT["PARETO"],
    {
        REPORT["CURVES"]: {
            "x": "epoch",
            "y": "val_acc",
            "x_label": "epoch",
            "y_label": "validation accuracy (%)",
        }
    },
]

HEADER = """\
# Generated by `python -m shrinkflow.tasks.stage_specs > dvc.yaml` from tasks/stage_specs.py, which also
# feeds Prefect's cache keys: edit the specs there, not this file. The same six stages as the
# Prefect flow, each calling the same function (`shrinkflow stage`); directories come from
# params.yaml's `paths` section.
"""


def dvc_yaml(params_file: str | Path | None = None) -> str:
    """The text of ``dvc.yaml``: this repository's, or (``params_file``) the one beside a project
    elsewhere in the repository, whose code dependencies point back here and whose baseline also
    depends on a brought model's weights file and package."""
    stages = {name: spec.dvc() for name, spec in STAGES.items()}
    header = HEADER
    if params_file is not None:
        project = Path(params_file).resolve().parent
        for body in stages.values():
            body = body.get("do", body)
            body["deps"] = [path for dep in body["deps"] for path in _relocated(dep, project)]
        raw = yaml.safe_load(Path(params_file).read_text()) or {}
        if not _present(raw, "shrink.ladder.rungs"):  # DVC cannot iterate what the file lacks
            del stages["ladder"]
        for body in stages.values():  # DVC refuses a key the file lacks; its default is code (config.py)
            body = body.get("do", body)
            body["params"] = [key for key in body["params"] if KEY in key or _present(raw, key)]
        stages["baseline"]["deps"] += _given_deps(raw.get("model") or {})
        header = HEADER.replace(
            "> dvc.yaml`", f"{Path(params_file).name} > dvc.yaml` (in this project's folder)"
        )
    body = yaml.safe_dump({"stages": stages, "plots": PLOTS}, sort_keys=False, width=110)
    return header + body


def _present(raw: dict[str, Any], key: str) -> bool:
    node: Any = raw
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _relocated(dep: str, project: Path) -> list[str]:
    """A code path of this repository as seen from ``project`` (data paths stay as they are). A
    folder becomes its Python files: DVC hashes a folder outside the project whole, and its
    ``.dvcignore`` does not reach there, so compiled ``__pycache__`` files would re-run stages."""
    if dep.startswith("$") or not (CODE_ROOT / dep).exists():
        return [dep]
    files = sorted((CODE_ROOT / dep).rglob("*.py")) if (CODE_ROOT / dep).is_dir() else [CODE_ROOT / dep]
    return [os.path.relpath(file, project) for file in files]


def _given_deps(model: dict[str, Any]) -> list[str]:
    """A brought model's own files: its weights, and the package its factory is in."""
    deps = ["${model.weights}"] if model.get("weights") else []
    if model.get("arch") == "factory" and model.get("factory"):
        top = str(model["factory"]).split(":")[0].split(".")[0]
        deps.append(str(Path(model.get("code_path", ".")) / top))
    return deps


def resolve(raw: dict[str, Any], key: str) -> Any:
    """The value at a dotted ``params.yaml`` key (``None`` where it is absent)."""
    node: Any = raw
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


if __name__ == "__main__":
    sys.stdout.write(dvc_yaml(sys.argv[1] if len(sys.argv) > 1 else None))
