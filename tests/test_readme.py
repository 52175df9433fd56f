"""The README's offline command examples, run as written, so they cannot drift from the code.

Covered: every ``-s``/``-S`` override and ``-p`` file in its commands validates against the
project's params.yaml; the configuration error it shows is the one the CLI prints; and every
``dvc exp run -S ...`` example is accepted by DVC (``--dry``, up to ``prepare``). The image-folder
example needs images the reader brings (``data/raw/flowers``), so DVC runs it with config only.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess

import pytest

from shrinkflow.tasks.config import load_params
from tests.conftest import BIN, REPO, run_cli

README = (REPO / "README.md").read_text()
PLACEHOLDERS = {"key", "key.sub"}  # `-s key.sub=value` in the usage line
NEEDS_USER_DATA = "data/raw/flowers"


def snippets() -> list[str]:
    """Every inline code span and every line of every fenced block."""
    fenced = re.findall(r"```[^\n]*\n(.*?)```", README, flags=re.S)
    inline = re.findall(r"(?<!`)`([^`\n]+)`(?!`)", re.sub(r"```.*?```", "", README, flags=re.S))
    return inline + [line for block in fenced for line in block.splitlines()]


def commands(prefix: str) -> list[list[str]]:
    found = []
    for snippet in snippets():
        text = snippet.split("#")[0].strip()  # a trailing shell comment
        if text.startswith(prefix):
            found.append(shlex.split(text))
    return found


def option_values(argv: list[str], *flags: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg in flags]


def overrides() -> list[str]:
    """``-s``/``-S`` values of the README's commands and of the example fragments in its tables."""
    values = []
    for snippet in snippets():
        try:
            argv = shlex.split(snippet.split("#")[0])
        except ValueError:  # not a command
            continue
        if argv and (argv[0] in ("shrinkflow", "dvc", "python") or argv[0] in ("-s", "-S")):
            values += option_values(argv, "-s", "-S", "--set")
    return [v for v in values if v.split("=", 1)[0] not in PLACEHOLDERS]


def test_every_override_and_params_file_in_the_readme_is_valid():
    found = overrides()
    assert len(found) >= 15, found  # the examples were found at all
    assert "shrink.candidates.width-50.ratio=0.6" in found
    for override in found:
        load_params(REPO / "params.yaml", (override,))  # raises on an unknown key or bad value
    files = {f for argv in commands("shrinkflow") for f in option_values(argv, "-p", "--params")}
    assert "examples/all-strategies.yaml" in files
    for path in files - {"params.yaml"}:
        load_params(REPO / path)


def test_the_readmes_config_error_is_what_the_cli_prints(tmp_path):
    shown = re.search(r"`(params\.yaml: (\S+): .+ \(got (.+)\))`", README)
    assert shown, "the README shows a configuration error"
    line, key, value = shown.groups()
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    done = run_cli("run", "-s", f"{key}={value}", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip() == f"error: {line}"


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme-dvc")
    for item in (
        "dvc.yaml",
        "params.yaml",
        "pyproject.toml",
        ".dvc",
        ".dvcignore",
        ".gitignore",
        "tasks",
        "models",
    ):
        (shutil.copytree if (REPO / item).is_dir() else shutil.copy)(REPO / item, root / item)
    for stale in (".dvc/tmp", ".dvc/cache"):
        shutil.rmtree(root / stale, ignore_errors=True)
    (root / "data/raw").mkdir(parents=True)
    shutil.copy(REPO / "data/raw/README.md", root / "data/raw/README.md")
    git = ["git", "-c", "user.email=ci@example.com", "-c", "user.name=ci"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "init"]):
        subprocess.run([*git, *args], cwd=root, check=True, timeout=60)
    return root


def test_readmes_dvc_experiments_are_accepted(dvc_repo):
    examples = [
        argv
        for argv in commands("dvc exp run")
        if "-S" in argv and not any(v.split("=")[0] in PLACEHOLDERS for v in option_values(argv, "-S"))
    ]
    assert len(examples) >= 2, examples
    for argv in examples:
        if any(NEEDS_USER_DATA in arg for arg in argv):
            for override in option_values(argv, "-S"):
                load_params(REPO / "params.yaml", (override,))
            continue
        args = argv[3:]
        if len(args) >= 2 and not args[-2].startswith("-"):
            args = args[:-1]  # the example's own stage target (e.g. `evaluate`): dry-run up to prepare
        done = subprocess.run(
            [str(BIN / "dvc"), "exp", "run", "--dry", *args, "prepare"],
            cwd=dvc_repo,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, (argv, done.stdout[-2000:], done.stderr[-2000:])
