"""The structure itself: imports go one way with no cycles, dvc.yaml and Prefect's cache keys
come from one declaration, and every registered strategy and architecture is usable."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import tomllib

import pytest

from shrinkflow.models import ARCHITECTURES, STRATEGIES, build_model
from shrinkflow.models.arch.given import user_code
from shrinkflow.models.architecture import Architecture
from shrinkflow.tasks.config import ConfigError, parse_params
from shrinkflow.tasks.layout import Layout
from shrinkflow.tasks.pipeline.cache import candidate_key
from shrinkflow.tasks.stage_specs import STAGES, dvc_yaml
from tests.conftest import BIN, REPO, small_raw


def test_import_contracts_hold():
    """Layers flows -> tasks -> models and the groups' layers inside tasks/, Prefect only in
    flows, models pure torch, the decision pure, MLflow only in the store and the registry's
    review, no cycles (function-level imports included): the contracts in pyproject.toml."""
    done = subprocess.run([str(BIN / "lint-imports")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "8 kept, 0 broken" in done.stdout


def test_every_module_of_tasks_has_its_layer():
    """A new group or top-level module of tasks/ must be placed in the layers contract, so the
    contract keeps saying which may use which (what import-linter's ``exhaustive`` checks, here
    read from the folder itself)."""
    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    (layers,) = [c["layers"] for c in contracts if c.get("containers") == ["shrinkflow.tasks"]]
    named = {name.strip() for layer in layers for name in re.split(r"[|:]", layer)}
    tasks = REPO / "tasks"
    present = {p.stem for p in tasks.glob("*.py") if p.stem != "__init__"}
    present |= {p.parent.name for p in tasks.glob("*/__init__.py")}
    assert present == named


def test_committed_dvc_yaml_is_generated_from_the_stage_specs():
    assert (REPO / "dvc.yaml").read_text() == dvc_yaml(), (
        "run: python -m shrinkflow.tasks.stage_specs > dvc.yaml"
    )
    for name, spec in STAGES.items():
        for path in spec.code:
            assert (REPO / path).exists(), f"{name} declares {path}, which does not exist"


def test_candidate_cache_key_follows_exactly_what_the_shrink_stage_declares(trained_layout):
    def key(*overrides):
        params = parse_params(small_raw(*overrides))
        return candidate_key(params, Layout.from_params(params, trained_layout.root), "l1-50", "store")

    assert key() == key()
    for changed in (
        "promote.confidence=0.9",
        "promote.tolerance=3",
        "shrink.epochs=9",
        "train.lr=0.01",
        "shrink.candidates.l1-50.ratio=0.6",
    ):
        assert key(changed) != key(), changed
    for unread in ("promote.alias=best", "evaluate.latency_repeats=3", "shrink.candidates.w50.ratio=0.6"):
        assert key(unread) == key(), unread


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_is_declarable_in_params(name):
    strategy = STRATEGIES[name]
    entry = {"strategy": name, **({"ratio": 0.5} if "ratio" in strategy.options.model_fields else {})}
    overrides = ["model.batch_norm=true"] if strategy.needs_batch_norm else []
    params = parse_params(small_raw(*overrides, f"shrink.candidates={json.dumps({'c': entry})}"))
    candidate = params.shrink.candidates["c"]
    assert candidate.strategy == name and set(candidate.options()) <= set(strategy.options.model_fields)
    with pytest.raises(ConfigError, match="unknown key"):
        parse_params(small_raw(*overrides, f"shrink.candidates={json.dumps({'c': {**entry, 'colour': 1}})}"))


# A network brought from outside names what builds it; its candidates prune rather than narrow.
BROUGHT = {
    "torchvision": "{arch: torchvision, name: resnet18}",
    "factory": "{arch: factory, factory: 'models.tinynet:build', kwargs: {num_classes: 4}, "
    f"code_path: '{REPO / 'examples' / 'byo'}'}}",
}


def test_the_architecture_table_names_every_network_and_starts_without_torchvision():
    """Every class with an ARCH in models/arch/ is in the table under its name; a process that
    loads the config and the stages for BaseNet never imports torchvision (it loads torch._dynamo:
    seconds at every `shrinkflow` start), one that builds a torchvision network does."""
    import importlib
    import pkgutil

    import shrinkflow.models.arch as package

    defined = {
        obj.ARCH: obj
        for module in pkgutil.iter_modules(package.__path__)
        for obj in vars(importlib.import_module(f"{package.__name__}.{module.name}")).values()
        if isinstance(obj, type) and "ARCH" in vars(obj)
    }
    assert defined == dict(ARCHITECTURES.items())
    probe = (
        "import sys; import shrinkflow.flows.cli, shrinkflow.tasks.pipeline.stages; "
        "from shrinkflow.models import build_model; "
        "build_model({'arch': 'basenet', 'in_channels': 1, 'image_size': 8, 'num_classes': 3}); "
        "print('torchvision' in sys.modules, end=' '); build_model({'arch': 'resnet18', 'in_channels': 1, "
        "'image_size': 8, 'num_classes': 3}); print('torchvision' in sys.modules)"
    )
    done = subprocess.run([str(BIN / "python"), "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.stdout.split() == ["False", "True"], done.stderr[-2000:]


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_is_declarable_and_keeps_the_protocol(arch):
    cls = ARCHITECTURES[arch]
    candidate = (
        "{p: {strategy: prune_l1, ratio: 0.5}}" if arch in BROUGHT else "{w: {strategy: width, ratio: 0.5}}"
    )
    params = parse_params(
        small_raw(f"model={BROUGHT.get(arch, f'{{arch: {arch}}}')}", f"shrink.candidates={candidate}")
    )
    options = params.model.arch_options()
    assert options["arch"] == arch and type(params.model) is cls.Options
    size = max(cls.min_image_size(options), 8)
    channels = 1 if arch == "factory" else 3  # the example's network reads grey images by default
    with user_code(params.model.code_path) if arch == "factory" else contextlib.nullcontext():
        model = build_model({**options, "in_channels": channels, "image_size": size, "num_classes": 4})
        assert build_model(model.spec()).spec() == model.spec(), "a spec rebuilds its model"
    assert isinstance(model, Architecture) and model.spec()["arch"] == arch
    assert model.classifier_layer().out_features == 4
