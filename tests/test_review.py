"""The reviewer's day against a real `mlflow server`: review, approve a challenger, roll back,
a refused approval of a broken version, two approvals at once; and the version page in a real
headless Chromium. The registry state comes from two real promotions of the session's evaluated
project (a small champion, the big baseline as challenger); each test works on its own copy of
those versions (same logged models, registered again under a new name: no upload, no training)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient

from shrinkflow.tasks.config import load_params
from shrinkflow.tasks.layout import Layout
from shrinkflow.tasks.lock import registry_lock
from shrinkflow.tasks.promote import ServedTest
from shrinkflow.tasks.review import ReviewError, revalidate, rollback_target
from shrinkflow.tasks.stages import Context, run_promote
from shrinkflow.tasks.tracking import Tracker, this_process
from tests.conftest import BIN, copy_project, gate_refuses_all, mlflow_server_at, run_cli

SMALL_WINS = ("promote.tolerance=50", "promote.champion_tolerance=100")  # a small candidate wins


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real `mlflow server` (its own sqlite store, artefacts proxied under ``art/``)."""
    root = tmp_path_factory.mktemp("review-server")
    with mlflow_server_at(root) as url:
        yield {"url": url, "art": root / "art"}


@pytest.fixture(scope="module")
def promoted(evaluated, tmp_path_factory, server):
    """Two real promotions into the server: v1 a small candidate (@champion), v2 the baseline
    (@challenger: bigger, not more accurate). Returns the model name and the small project."""
    name, root = f"review-{uuid.uuid4().hex[:6]}", tmp_path_factory.mktemp("review")
    decisions = []
    for sub, overrides, tamper in (("small", SMALL_WINS, None), ("big", (), gate_refuses_all)):
        params, layout = copy_project(evaluated, root / sub, f"promote.model_name={name}", *overrides)
        if tamper:
            tamper(layout)
        tracker = Tracker(server["url"], params.tracking.experiment)
        decisions.append(run_promote(Context(params, layout, tracker)))
    assert [d.kind for d in decisions] == ["champion", "challenger"], decisions[1].kind_reason
    return {"name": name, "project": root / "small", "winner": decisions[0].winner}


@pytest.fixture
def registry(promoted, server):
    """A private copy of the promoted model: v1 @champion, v2 @challenger, v3 (v1's model again)."""
    client = MlflowClient(server["url"], server["url"])
    base, name = promoted["name"], f"{promoted['name']}-{uuid.uuid4().hex[:6]}"
    client.create_registered_model(name)
    for number in ("1", "2", "1"):
        v = client.get_model_version(base, number)
        client.create_model_version(
            name,
            v.source,
            v.run_id,
            v.tags,
            description=v.description,
            model_id=v.source.removeprefix("models:/"),
        )
    client.set_registered_model_alias(name, "champion", "1")
    client.set_registered_model_alias(name, "challenger", "2")
    return {**promoted, "name": name, "client": client, "url": server["url"]}


def _cli(registry, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    params = str(registry["project"] / "params.yaml")
    env = {"MLFLOW_TRACKING_URI": registry["url"], **(env or {})}
    return run_cli(*args, "-p", params, cwd=registry["project"], env=env)


def _aliases(registry) -> dict[str, int]:
    model = registry["client"].get_registered_model(registry["name"])
    return {alias: int(v) for alias, v in model.aliases.items()}


def _tags(registry, version: str) -> dict[str, str]:
    return registry["client"].get_model_version(registry["name"], version).tags


def test_review_approve_and_roll_back(registry):
    name = registry["name"]
    shown = _cli(registry, "review", name)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "@challenger v2, @champion v1" in shown.stdout
    assert "challenger v2 minus champion v1 on today's" in shown.stdout and "bounds [" in shown.stdout
    assert "test_acc today" in shown.stdout and registry["winner"] in shown.stdout

    approved = _cli(registry, "approve", name, "2", "--reason", "the big one is safer", "--by", "alice")
    assert approved.returncode == 0, approved.stderr[-2000:]
    assert f"{name} v2 re-validated: loads from the registry, sha256" in approved.stdout
    assert f"approved {name} v2 as @champion (was v1), by alice" in approved.stdout
    assert _aliases(registry) == {"champion": 2}, "the challenger alias left the approved version"
    tags = _tags(registry, "2")
    assert (tags["approved_by"], tags["approval"], tags["previous_champion"]) == ("alice", "approve", "1")
    assert tags["approval_reason"] == "the big one is safer" and tags["approved_at"].endswith("UTC")
    description = registry["client"].get_model_version(name, "2").description
    assert (
        description.startswith("**Approved as `champion`** by alice")
        and "Previous champion: v1" in description
    )

    back = _cli(registry, "rollback", name, "--reason", "too slow on the edge boxes", env={"USER": "carol"})
    assert back.returncode == 0, back.stderr[-2000:]
    assert f"rolled back to {name} v1 as @champion (was v2), by carol" in back.stdout
    assert _aliases(registry) == {"champion": 1}
    tags = _tags(registry, "1")
    assert (tags["approval"], tags["approved_by"], tags["previous_champion"]) == ("rollback", "carol", "2")

    further = _cli(registry, "rollback", name, "--to", "3", "--reason", "the one signed off", "--by", "bob")
    assert further.returncode == 0 and f"{name} v3 as @champion (was v1)" in further.stdout, further.stderr
    again = _cli(registry, "review", name, "--with", "2")
    assert again.returncode == 0 and "version v2 minus champion v3 on today's" in again.stdout, again.stderr
    assert "rollback by bob" in again.stdout and "rollback by carol" in again.stdout


def _stored_checkpoint(registry, art: Path, version: str) -> Path:
    """The version's model.pt as it lies in the server's artefact store."""
    model_id = registry["client"].get_model_version(registry["name"], version).source.removeprefix("models:/")
    (found,) = (p for p in art.rglob("model.pt") if model_id in p.parts)
    return found


def test_a_broken_version_is_refused_in_one_line_and_nothing_moves(registry, server, evaluated):
    name = registry["name"]
    stored = _stored_checkpoint(registry, server["art"], "2")
    other = next(
        p for p in (evaluated / "artifacts").rglob("model.pt") if p.read_bytes() != stored.read_bytes()
    )
    original = stored.read_bytes()
    shutil.copyfile(other, stored)  # another valid checkpoint of the same task, swapped in the store
    try:
        swapped = _cli(registry, "approve", name, "2", "--reason", "looks fine", "--by", "mallory")
    finally:
        stored.write_bytes(original)  # the logged model is shared with the other tests' copies
    assert swapped.returncode == 1 and swapped.stdout.count("\n") == 0, swapped.stdout
    assert len(swapped.stderr.strip().splitlines()) == 1, swapped.stderr
    assert f"error: {name} v2 does not load from the registry" in swapped.stderr
    assert "registry recorded" in swapped.stderr and "nothing moved" in swapped.stderr
    assert _aliases(registry) == {"champion": 1, "challenger": 2}
    assert "approved_by" not in _tags(registry, "2")

    # The other refusals, through the functions the commands call (the same one-line errors).
    cfg = load_params(registry["project"] / "params.yaml")
    tracker = Tracker(registry["url"], cfg.tracking.experiment)
    test = ServedTest.load(Layout.from_params(cfg, registry["project"]))
    registry["client"].set_model_version_tag(name, "2", "task_classes", '["cat", "dog"]')  # another task
    with pytest.raises(ReviewError, match=r"v2 is for another task than this project's \(classes"):
        revalidate(tracker, name, "2", cfg.promote, test)
    registry["client"].set_model_version_tag(name, "3", "test_acc", "12.5")  # a record it does not score
    with pytest.raises(
        ReviewError, match=r"v3 scores .* certified on, but its record says 12.50; nothing moved"
    ):
        revalidate(tracker, name, "3", cfg.promote, test)
    with pytest.raises(ReviewError, match=r"v1 records no previous champion .*--to VERSION"):
        rollback_target(tracker, name, cfg.promote, None)
    with pytest.raises(ReviewError, match=r"has no version 9 \(it has 1, 2, 3\)"):
        revalidate(tracker, name, "9", cfg.promote, test)
    assert _aliases(registry) == {"champion": 1, "challenger": 2}


def test_two_approvals_at_once_are_serialised(registry):
    """Both approvals validate, then wait on the registry lock (held here); released, they move
    @champion one after the other: each records the champion the other left, none the same one."""
    name, client = registry["name"], registry["client"]
    params = str(registry["project"] / "params.yaml")
    env = {**os.environ, "MLFLOW_TRACKING_URI": registry["url"], "PATH": f"{BIN}:{os.environ['PATH']}"}
    with registry_lock(client, name, this_process()):
        procs = {
            v: subprocess.Popen(
                [
                    str(BIN / "shrinkflow"),
                    "approve",
                    name,
                    v,
                    "--reason",
                    f"race {v}",
                    "--by",
                    f"r{v}",
                    "-p",
                    params,
                ],
                cwd=registry["project"],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for v in ("2", "3")
        }
        for proc in procs.values():
            assert "re-validated" in proc.stdout.readline(), proc.communicate()[1][-2000:]
        time.sleep(1.0)  # both are past validation: only the lock holds them
        assert all(proc.poll() is None for proc in procs.values()), (
            "an approval moved @champion past the lock"
        )
        assert _aliases(registry) == {"champion": 1, "challenger": 2}
    for proc in procs.values():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    final = _aliases(registry)["champion"]
    other = "3" if final == 2 else "2"
    assert final in (2, 3) and _tags(registry, str(final))["previous_champion"] == other
    assert _tags(registry, other)["previous_champion"] == "1", "the two approvals interleaved"
    assert not client.search_registered_models(f"name='{name}.alias-lock'"), "the lock is released"


def test_the_version_page_shows_the_verdict_and_the_champion_comparison(promoted, server):
    """The challenger's page in `mlflow server`'s own UI, rendered by a real headless Chromium."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:  # .ci/run installs it (as root); a developer's machine may not have it
        pytest.skip("no chromium on PATH to render the MLflow UI: apt-get install chromium (Debian's)")
    url = f"{server['url']}/#/models/{promoted['name']}/versions/2"
    dom = ""
    # A loaded machine (the other test worker training) may not finish the page within one
    # virtual-time budget: the UI's script bundle and the registry calls are real requests.
    for budget in (15_000, 30_000, 60_000, 60_000):
        dom = _dump_dom(chromium, url, budget)
        if "Verdict:" in dom:
            break
    # The description rendered from Markdown: the verdict, and the table beside the champion.
    verdict = re.search(r"<strong>Verdict: <code>challenger</code></strong>: ([^<]*)", dom)
    assert verdict and "not better than champion v1" in verdict[1], dom[-3000:]
    assert re.search(r"<th[^>]*>champion v1 \(<code>", dom), "the champion's column"
    assert re.search(r"<td[^>]*>this version minus the champion on today's test images", dom)
    assert "<strong>Worst classes on test</strong>" in dom and ">Pareto plot</a>" in dom


def _dump_dom(chromium: str, url: str, budget_ms: int) -> str:
    """The page as a real headless Chromium renders it (MLflow's UI is a script-built page)."""
    with tempfile.TemporaryDirectory(prefix="shrinkflow-chromium-") as profile:
        return subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-background-networking",
                f"--user-data-dir={profile}",
                f"--virtual-time-budget={budget_ms}",
                "--dump-dom",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
