"""A stage's code dependencies are derived from what it imports: the closure follows every form of
import (subpackages included), the committed ``dvc.yaml`` files hold every module each stage runs,
and Prefect's cache keys change with any of them."""

from __future__ import annotations

import shutil
import subprocess
import textwrap

import pytest
import yaml

from shrinkflow.tasks.pipeline import cache
from shrinkflow.tasks.stage_specs import CODE_ROOT, STAGES, WHOLE, code_of, dvc_yaml, import_closure
from tests.conftest import BIN, REPO

# A package laid out as tasks/ may become: stages in subpackages, relative imports two levels up,
# imports inside functions, a submodule named in `from package import name`.
TOY = {
    "pkg/__init__.py": "",
    "pkg/tasks/__init__.py": '"""stages"""',
    "pkg/tasks/stage.py": """
        import numpy
        from pkg.tasks.data import load
        from pkg.tasks.config import Params

        def run():
            from pkg.tasks import late
            import pkg.models.net
    """,
    "pkg/tasks/config.py": "Params = dict",
    "pkg/tasks/late.py": "",
    "pkg/tasks/shared.py": "",
    "pkg/tasks/unused.py": "import pkg.tasks.stage",
    "pkg/tasks/data/__init__.py": "",
    "pkg/tasks/data/load.py": "from .util import x\nfrom ..shared import *\n",
    "pkg/tasks/data/util.py": "x = 1",
    "pkg/tasks/data/other.py": "",
    "pkg/models/__init__.py": "",
    "pkg/models/net.py": "",
}


def test_the_import_closure_follows_every_form_of_import_into_subpackages(tmp_path):
    for path, text in TOY.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(textwrap.dedent(text))
    root = tmp_path / "pkg"
    closure = import_closure(["pkg.tasks.stage"], root, "pkg")
    assert {p.relative_to(tmp_path).as_posix() for p in closure} == set(TOY) - {
        "pkg/tasks/unused.py",
        "pkg/tasks/data/other.py",
    }
    with pytest.raises(ValueError, match="'pkg.tasks.gone' is no module of pkg"):
        import_closure(["pkg.tasks.gone"], root, "pkg")


def _committed_deps(dvc_file) -> dict[str, list[str]]:
    stages = yaml.safe_load(dvc_file.read_text())["stages"]
    return {name: stage.get("do", stage)["deps"] for name, stage in stages.items()}


def _covered(path: str, deps: list[str]) -> bool:
    return any(path == dep or path.startswith(f"{dep}/") for dep in deps)


def test_every_module_a_stage_imports_is_among_its_committed_dependencies():
    """Fails on a stale or hand-edited dvc.yaml, or a spec whose code misses a module its entry
    points import."""
    committed = _committed_deps(REPO / "dvc.yaml")
    assert set(committed) == set(STAGES)
    for name, spec in STAGES.items():
        closure = {p.relative_to(CODE_ROOT).as_posix() for p in import_closure(spec.entries)}
        assert f"{spec.entries[0].removeprefix('shrinkflow.').replace('.', '/')}.py" in closure
        for where, deps in (("dvc.yaml", committed[name]), ("its spec's code", list(spec.code))):
            missing = sorted(f for f in closure if not _covered(f, deps))
            assert not missing, f"{name} imports {missing}, which {where} does not declare"


def test_what_the_stages_load_at_run_time_is_in_their_derived_code():
    """The derivation's blind spot, imports no statement shows (the registries'), is covered: a
    fresh interpreter that imports every stage's entry points loads no file of shrinkflow outside
    their closures and the folders declared whole."""
    entries = sorted({name for spec in STAGES.values() for name in spec.entries})
    probe = (
        "import importlib, sys; from pathlib import Path; root = Path(sys.argv[1])\n"
        "for name in sys.argv[2:]: importlib.import_module(name)\n"
        "files = [Path(m.__file__) for m in list(sys.modules.values()) if getattr(m, '__file__', None)]\n"
        "files = [f.resolve() for f in files if f.is_absolute()]\n"
        "env = Path(sys.prefix).resolve()  # a virtual environment inside the checkout is not its code\n"
        "ours = [f for f in files if f.is_relative_to(root) and not f.is_relative_to(env)]\n"
        "print('\\n'.join(str(f.relative_to(root)) for f in ours))"
    )
    done = subprocess.run(
        [str(BIN / "python"), "-c", probe, str(CODE_ROOT), *entries],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = set(done.stdout.split())
    derived = {p.relative_to(CODE_ROOT).as_posix() for p in import_closure(entries)}
    assert "models/strategies/prune_l1.py" in loaded - derived, (
        "a registry's import, which no statement shows"
    )
    assert not sorted(f for f in loaded - derived if not _covered(f, list(WHOLE))), (
        "loaded, but in no stage's code"
    )


def test_the_examples_dvc_yaml_is_generated_from_its_params():
    example = REPO / "examples/byo"
    assert (example / "dvc.yaml").read_text() == dvc_yaml(example / "params.yaml"), (
        "run: cd examples/byo && python -m shrinkflow.tasks.stage_specs params.yaml > dvc.yaml"
    )
    for deps in _committed_deps(example / "dvc.yaml").values():
        assert "../../models/preprocess.py" in deps and "../../tasks/config.py" in deps


def test_a_change_to_any_file_a_stage_runs_changes_its_cache_digest(tmp_path, monkeypatch):
    """The code Prefect's cache keys hash is the derived code: a change to a file a stage
    imports (models/preprocess.py for prepare, tasks/training/given.py for the baseline) changes its
    digest; a change elsewhere (the runner) does not."""
    for folder in ("tasks", "models"):
        shutil.copytree(CODE_ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(cache, "PROJECT", tmp_path)
    edits = {
        "prepare": "models/preprocess.py",
        "baseline": "tasks/training/given.py",
        "evaluate": "tasks/data/prepare.py",
    }
    for name, edited in edits.items():
        code = STAGES[name].code
        before = cache.code_digest(code)
        with (tmp_path / "tasks/pipeline/stages.py").open("a") as f:
            f.write("# the runner changed\n")
        assert cache.code_digest(code) == before, f"{name} does not run tasks/pipeline/stages.py"
        with (tmp_path / edited).open("a") as f:
            f.write("# changed\n")
        assert cache.code_digest(code) != before, f"{name} runs {edited}"
    assert code_of(("shrinkflow.tasks.data.prepare",))[0] == "models", "models/ is declared as one folder"
