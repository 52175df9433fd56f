"""Every third-party package the repository imports is declared in pyproject.toml: shrinkflow's own
code (flows/, tasks/, models/) in its dependencies, the tests, benchmarks and example there or in an
extra, so an install from pyproject alone runs all of them."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib

from tests.conftest import REPO

PACKAGE = ("flows", "tasks", "models")
AROUND = ("tests", "benchmarks", "examples")
# The repository's own top-level names; `models` is also examples/byo's package, the user's own.
LOCAL = {"shrinkflow", "tests", "benchmarks", "models"}


def _name(requirement: str) -> str:
    """A requirement's distribution name, normalised (PEP 503)."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement)[0]).lower()


def _imported(folders: tuple[str, ...]) -> dict[str, str]:
    """Each top-level module the folders' files import (function-level imports too), with one
    file that does."""
    found: dict[str, str] = {}
    for folder in folders:
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_bytes(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], str(path.relative_to(REPO)))
    return found


def _undeclared(folders: tuple[str, ...], declared: set[str]) -> list[str]:
    distributions = importlib.metadata.packages_distributions()
    return [
        f"{module} ({where})"
        for module, where in sorted(_imported(folders).items())
        if module not in sys.stdlib_module_names
        and module not in LOCAL
        and not {_name(d) for d in distributions.get(module, [])} & declared
    ]


def test_every_third_party_import_is_declared_in_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = {_name(r) for r in project["dependencies"]}
    extras = {name: {_name(r) for r in reqs} for name, reqs in project["optional-dependencies"].items()}
    assert not _undeclared(PACKAGE, core), "imported by shrinkflow itself but not a dependency"
    assert not _undeclared(AROUND, core.union(*extras.values())), "imported but in no dependency or extra"
    assert {"dask", "distributed"} <= extras["dask"]
