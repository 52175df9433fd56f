"""What each stage reads and writes, declared once: ``dvc.yaml`` is generated from these specs
(``python -m shrinkflow.tasks.stage_specs > dvc.yaml``; a test checks the committed file is what they
generate), and Prefect's cache keys (:mod:`shrinkflow.tasks.cache`) hash the same code and params, so DVC
and Prefect always agree on what must re-run. Directories come from ``params.yaml``'s ``paths``
section and file names from :class:`shrinkflow.tasks.layout.Files`.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from shrinkflow.tasks.layout import Files

CODE_ROOT = Path(__file__).resolve().parents[1]  # where tasks/ and models/ are
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
    code: tuple[str, ...]  # source files and packages whose change re-runs the stage
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


# The code every model stage runs: the networks, the config (which holds defaults), the data
# loading, the one training loop and the checkpoint writer.
TRAINING_CODE = (
    "models",
    "tasks/config.py",
    "tasks/prepare.py",
    "tasks/records.py",
    "tasks/train.py",
    "tasks/engine.py",
    "tasks/io.py",
)
GATE_CODE = ("tasks/gate.py", "tasks/stats.py")
# Every model's paired comparison with the baseline, and the ratio searches, read these.
GATE_PARAMS = ("promote.tolerance", "promote.tolerance_mode", "promote.confidence")

STAGES: dict[str, StageSpec] = {
    "prepare": StageSpec(
        cmd="shrinkflow stage prepare",
        data=("${data.root}",),
        code=(
            "tasks/prepare.py",
            "tasks/sources.py",
            "tasks/datachecks.py",
            "tasks/records.py",
            "tasks/config.py",
            "tasks/io.py",
        ),
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
        code=TRAINING_CODE,
        params=("seed", "data.augment", "model", "train"),
        outs=(Out(BASELINE),),
    ),
    # Persistent: a table whose key (baseline, data, strategy, ratios) still holds is kept, not
    # measured again, so a change to any candidate re-runs this stage in a moment and its output,
    # unchanged, re-runs nothing downstream.
    "sensitivity": StageSpec(
        cmd="shrinkflow stage sensitivity",
        data=(PREPARED, BASELINE),
        code=(*TRAINING_CODE, "tasks/sensitivity.py"),
        params=("shrink.workers", "shrink.calibration_size", "shrink.candidates"),
        outs=(Out(SENSITIVITY, persist=True),),
    ),
    "shrink": StageSpec(
        cmd=f"shrinkflow stage shrink --candidate {KEY}",
        foreach="${shrink.candidates}",
        data=(PREPARED, BASELINE, SENSITIVITY),
        code=(*TRAINING_CODE, "tasks/search.py", "tasks/sensitivity.py", "tasks/allocate.py", *GATE_CODE),
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
        code=(
            "models",
            "tasks/config.py",
            "tasks/evaluate.py",
            "tasks/records.py",
            "tasks/export.py",
            "tasks/engine.py",
            "tasks/io.py",
            *GATE_CODE,
        ),
        params=("shrink.candidates", "evaluate", *GATE_PARAMS),
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
        code=(
            "models",
            "tasks/config.py",
            "tasks/promote.py",
            "tasks/decide.py",
            "tasks/registry.py",
            "tasks/reproduce.py",
            *GATE_CODE,
            "tasks/evaluate.py",
            "tasks/records.py",
            "tasks/tracking.py",
            "tasks/serving.py",
            "tasks/export.py",
            "tasks/report.py",
        ),
        params=("promote",),
        outs=(
            Out(REPORT["PARETO"], cache=False),
            Out(REPORT["REPORT"], cache=False),
            Out(REPORT["PROMOTION"], cache=False, metric=True),
        ),
    ),
}

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
            body["deps"] = [_relocated(dep, project) for dep in body["deps"]]
        raw = yaml.safe_load(Path(params_file).read_text()) or {}
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


def _relocated(dep: str, project: Path) -> str:
    """A code path of this repository as seen from ``project`` (data paths stay as they are)."""
    if dep.startswith("$") or not (CODE_ROOT / dep).exists():
        return dep
    return os.path.relpath(CODE_ROOT / dep, project)


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
