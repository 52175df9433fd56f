"""The offline command examples of the README and of every page in docs/, run as written, so they
cannot drift from the code.

Covered: every ``-s``/``-S`` override and ``-p`` file in their commands validates against the
project's params.yaml; every configuration error they show is the one the CLI prints; and every
``dvc exp run -S ...`` example is accepted by DVC (``--dry``, up to ``prepare``). An example shown
on several pages is run once. The image-folder example needs images the reader brings
(``data/raw/flowers``), so DVC runs it with config only.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess

import pytest

from shrinkflow.tasks.config import load_params
from tests.conftest import BIN, REPO, run_cli

PAGES = {
    str(path.relative_to(REPO)): path.read_text()
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
}
PLACEHOLDERS = {"key", "key.sub"}  # `-s key.sub=value` in the usage line
NEEDS_USER_DATA = "data/raw/flowers"


def snippets(text: str) -> list[str]:
    """Every inline code span and every line of every fenced block of one page."""
    fenced = re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S)
    inline = re.findall(r"(?<!`)`([^`\n]+)`(?!`)", re.sub(r"```.*?```", "", text, flags=re.S))
    return inline + [line for block in fenced for line in block.splitlines()]


def all_snippets() -> dict[str, str]:
    """Each distinct snippet of all the pages, with the first page that shows it."""
    found: dict[str, str] = {}
    for page, text in PAGES.items():
        for snippet in snippets(text):
            found.setdefault(snippet, page)
    return found


def commands(prefix: str) -> dict[tuple[str, ...], str]:
    """The distinct commands that start with ``prefix``, each with a page that shows it."""
    found: dict[tuple[str, ...], str] = {}
    for snippet, page in all_snippets().items():
        text = snippet.split("#")[0].strip()  # a trailing shell comment
        if text.startswith(prefix):
            found.setdefault(tuple(shlex.split(text)), page)
    return found


def option_values(argv: list[str], *flags: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg in flags]


def overrides() -> dict[str, str]:
    """The distinct ``-s``/``-S`` values of the pages' commands and of the example fragments in
    their tables, each with a page that shows it."""
    values: dict[str, str] = {}
    for snippet, page in all_snippets().items():
        try:
            argv = shlex.split(snippet.split("#")[0])
        except ValueError:  # not a command
            continue
        if argv and (argv[0] in ("shrinkflow", "dvc", "python") or argv[0] in ("-s", "-S")):
            for value in option_values(argv, "-s", "-S", "--set"):
                if value.split("=", 1)[0] not in PLACEHOLDERS:
                    values.setdefault(value, page)
    return values


def test_the_pages_are_found():
    assert "README.md" in PAGES
    assert {"docs/configuration.md", "docs/dvc.md", "docs/promotion.md"} <= set(PAGES), sorted(PAGES)


def test_every_override_and_params_file_in_the_docs_is_valid():
    found = overrides()
    assert len(found) >= 15, found  # the examples were found at all
    assert "shrink.candidates.width-50.ratio=0.6" in found
    for override, page in found.items():
        try:
            load_params(REPO / "params.yaml", (override,))  # raises on an unknown key or bad value
        except Exception as error:
            raise AssertionError(f"{page}: -s {override}: {error}") from error
    files = {
        f: page
        for argv, page in commands("shrinkflow").items()
        for f in option_values(argv, "-p", "--params")
    }
    assert "examples/all-strategies.yaml" in files
    for path in files.keys() - {"params.yaml"}:
        load_params(REPO / path)


def test_every_config_error_shown_is_what_the_cli_prints(tmp_path):
    pattern = r"`(params\.yaml: (\S+): .+ \(got (.+)\))`"
    assert re.search(pattern, PAGES["README.md"]), "the README shows a configuration error"
    shown = {match: page for page, text in PAGES.items() for match in re.findall(pattern, text)}
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    for (line, key, value), page in shown.items():
        done = run_cli("run", "-s", f"{key}={value}", cwd=tmp_path)
        assert done.returncode == 1, page
        assert done.stderr.strip() == f"error: {line}", page


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


def test_the_dvc_experiments_shown_are_accepted(dvc_repo):
    examples = {
        argv: page
        for argv, page in commands("dvc exp run").items()
        if "-S" in argv and not any(v.split("=")[0] in PLACEHOLDERS for v in option_values(argv, "-S"))
    }
    assert len(examples) >= 2, examples
    dry_runs: dict[tuple[str, ...], str] = {}
    for argv, page in examples.items():
        if any(NEEDS_USER_DATA in arg for arg in argv):
            for override in option_values(list(argv), "-S"):
                load_params(REPO / "params.yaml", (override,))
            continue
        args = argv[3:]
        if len(args) >= 2 and not args[-2].startswith("-"):
            args = args[:-1]  # the example's own stage target (e.g. `evaluate`): dry-run up to prepare
        dry_runs.setdefault(args, page)
    for args, page in dry_runs.items():
        done = subprocess.run(
            [str(BIN / "dvc"), "exp", "run", "--dry", *args, "prepare"],
            cwd=dvc_repo,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, (page, args, done.stdout[-2000:], done.stderr[-2000:])
