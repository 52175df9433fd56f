"""The documentation site builds with ``mkdocs build --strict`` (a broken link or anchor fails it),
every page in docs/ is in its navigation, and the README's own links lead to files that exist."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml

from tests.conftest import BIN, REPO


def build(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "mkdocs"), "build", "--strict", "--config-file", str(config), "--site-dir", str(site)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def nav_pages(nav: list) -> set[str]:
    pages = set()
    for entry in nav:
        for value in entry.values() if isinstance(entry, dict) else [entry]:
            pages |= nav_pages(value) if isinstance(value, list) else {value}
    return pages


def test_the_site_builds_strictly(tmp_path):
    done = build(REPO / "mkdocs.yml", tmp_path / "site")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "site/promotion/index.html").exists()
    assert (tmp_path / "site/results/index.html").exists()  # the benchmark history, from benchmarks/results


def test_a_broken_link_fails_the_build(tmp_path):
    """What the strict build above is worth: a link to a missing anchor is an error."""
    shutil.copytree(REPO / "docs", tmp_path / "docs")  # the results/ link copied as files
    shutil.copy(REPO / "mkdocs.yml", tmp_path / "mkdocs.yml")
    page = tmp_path / "docs/scale-out.md"
    page.write_text(page.read_text() + "\nSee [the gate](promotion.md#no-such-section).\n")
    done = build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert done.returncode != 0
    assert "no-such-section" in done.stderr


def test_every_page_is_in_the_navigation():
    nav = nav_pages(yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"])
    pages = {path.name for path in (REPO / "docs").glob("*.md")}
    assert pages <= nav, f"pages missing from mkdocs.yml's nav: {sorted(pages - nav)}"


def test_the_readmes_links_lead_somewhere():
    readme = (REPO / "README.md").read_text()
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [t for t in targets if not re.match(r"[a-z]+:", t)]
    assert "docs/promotion.md" in local, local
    missing = [t for t in local if not (REPO / t).exists()]
    assert not missing, missing
