"""The reviewer's day against a real `mlflow server`: review, approve a challenger, roll back,
a refused approval of a broken version, two approvals at once; and the version page in a real
headless Chromium. The registry state comes from two real promotions of the session's evaluated
project (a small champion, the big baseline as challenger); each test works on its own copy of
those versions (same logged models, registered again under a new name: no upload, no training)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid

import pytest
from mlflow import MlflowClient

from shrinkflow.tasks.config import load_params
from shrinkflow.tasks.data.prepare import prepare
from shrinkflow.tasks.layout import Layout
from shrinkflow.tasks.pipeline.stages import Context, run_promote, summarise
from shrinkflow.tasks.promotion.promote import ServedTest
from shrinkflow.tasks.promotion.review import (
    ReviewError,
    record_of,
    registered,
    revalidate,
    rollback_target,
    side_by_side,
)
from shrinkflow.tasks.store.lock import registry_lock
from shrinkflow.tasks.store.registry import RegistryError
from shrinkflow.tasks.store.tracking import Tracker, this_process
from tests.conftest import (
    BIN,
    aliases,
    copy_project,
    gate_refuses_all,
    mlflow_server_at,
    run_cli,
    stored_checkpoint,
)

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


def _tags(registry, version: str) -> dict[str, str]:
    return registry["client"].get_model_version(registry["name"], version).tags


def _verdict(registry, version: str) -> str:
    return _tags(registry, version)["verdict"]


def _description(registry, version: str) -> str:
    return registry["client"].get_model_version(registry["name"], version).description


def _event(registry, number: str) -> dict[str, str]:
    """Event ``number`` of the model's history, as the registered model's tag holds it."""
    tags = registry["client"].get_registered_model(registry["name"]).tags
    return json.loads(tags[f"audit.{int(number):04d}"])


def _state(registry) -> tuple:
    """Everything an approval may change: the aliases, every version's tags and description, and
    the registered model's tags."""
    client, name = registry["client"], registry["name"]
    versions = {v.version: (v.tags, v.description) for v in client.search_model_versions(f"name='{name}'")}
    return aliases(registry["name"], registry["client"]), versions, client.get_registered_model(name).tags


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
    assert "on the 360 test images it was certified on (data " in approved.stdout
    assert f"approved {name} v2 as @champion (was v1), by alice" in approved.stdout
    assert aliases(registry["name"], registry["client"]) == {"champion": 2}, (
        "the challenger alias left the approved version"
    )
    first = _event(registry, "1")
    assert (first["what"], first["who"], first["champion"]) == ("approve", "alice", "v1 -> v2")
    assert first["why"] == "the big one is safer" and first["when"].endswith("UTC")
    assert _tags(registry, "2")["audit.0001"] == json.dumps(first) and _tags(registry, "1")["audit.0001"]
    # The verdict follows the alias: the approved challenger reads champion, the old champion retired.
    assert (_verdict(registry, "2"), _verdict(registry, "1")) == ("champion", "retired")
    assert _tags(registry, "2")["previous_champion"] == "1"
    assert _description(registry, "2").startswith("**Approved as `champion`** (event 1, v1 -> v2) by alice")
    assert _description(registry, "1").startswith("**No longer `champion`**, now `retired` (event 1")

    back = _cli(registry, "rollback", name, "--reason", "too slow on the edge boxes", env={"USER": "carol"})
    assert back.returncode == 0, back.stderr[-2000:]
    assert f"rolled back to {name} v1 as @champion (was v2), by carol" in back.stdout
    assert aliases(registry["name"], registry["client"]) == {"champion": 1}
    assert (_verdict(registry, "1"), _verdict(registry, "2")) == ("champion", "retired")
    assert _event(registry, "1") == first, "an event is never rewritten"
    second = _event(registry, "2")
    assert (second["what"], second["who"], second["champion"]) == ("rollback", "carol", "v2 -> v1")
    assert _tags(registry, "1")["previous_champion"] == "2"
    assert _description(registry, "1").startswith("**Made `champion` by a rollback** (event 2, v2 -> v1)")
    assert "Rolled back to as" not in _description(registry, "1")

    further = _cli(registry, "rollback", name, "--to", "3", "--reason", "the one signed off", "--by", "bob")
    assert further.returncode == 0 and f"{name} v3 as @champion (was v1)" in further.stdout, further.stderr
    again = _cli(registry, "review", name, "--with", "2")
    assert again.returncode == 0 and "version v2 minus champion v3 on today's" in again.stdout, again.stderr
    assert "rollback by bob" in again.stdout and "rollback by carol" in again.stdout
    history = again.stdout.split("history (every approve and rollback, oldest first):\n")[1].splitlines()[:3]
    assert [line.split(" UTC ")[1] for line in history] == [
        "approve v1 -> v2 by alice: the big one is safer",
        "rollback v2 -> v1 by carol: too slow on the edge boxes",
        "rollback v1 -> v3 by bob: the one signed off",
    ]
    assert [line.split()[0] for line in history] == ["#1", "#2", "#3"]
    assert sorted(k for k in _tags(registry, "1") if k.startswith("audit.")) == [
        "audit.0001",
        "audit.0002",
        "audit.0003",
    ], "v1 keeps every event that moved @champion to or from it"


def test_a_broken_version_is_refused_in_one_line_and_nothing_moves(registry, server, evaluated):
    name = registry["name"]
    stored = stored_checkpoint(registry["name"], "2", registry["client"], server["art"])
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
    assert aliases(registry["name"], registry["client"]) == {"champion": 1, "challenger": 2}
    assert not any(k.startswith("audit.") for k in _tags(registry, "2"))

    # The other refusals, through the functions the commands call (the same one-line errors).
    cfg = load_params(registry["project"] / "params.yaml")
    tracker = Tracker(registry["url"], cfg.tracking.experiment)
    test = ServedTest.load(Layout.from_params(cfg, registry["project"]))
    registry["client"].set_model_version_tag(name, "2", "task_classes", '["cat", "dog"]')  # another task
    with pytest.raises(ReviewError, match=r"v2 is for another task than this project's \(classes"):
        revalidate(tracker, name, "2", test, cfg)
    registry["client"].set_model_version_tag(name, "3", "test_acc", "12.5")  # a record it does not score
    with pytest.raises(
        ReviewError, match=r"v3 scores .* certified on, but its record says 12.50; nothing moved"
    ):
        revalidate(tracker, name, "3", test, cfg)
    with pytest.raises(ReviewError, match=r"v1 records no previous champion .*--to VERSION"):
        rollback_target(tracker, name, cfg.promote, None)
    with pytest.raises(RegistryError, match=r"has no version 9 \(it has 1, 2, 3\)"):
        revalidate(tracker, name, "9", test, cfg)
    assert aliases(registry["name"], registry["client"]) == {"champion": 1, "challenger": 2}


def test_registry_commands_refuse_a_missing_model_or_version_in_one_line(registry):
    """Every registry command takes its version through one helper: a missing model, a missing
    version and a malformed version are each one line on stderr, the same from every command,
    exit 1, nothing moved; the traceback goes to the project's log only."""
    name, project = registry["name"], registry["project"]
    (project / ".shrinkflow").mkdir(exist_ok=True)  # a project that has run keeps its log here
    before = _state(registry)
    missing = f"{name} has no version 9 (it has 1, 2, 3)"
    nosuch = f"there is no registered model 'nosuch' in {registry['url']}"
    malformed = f"version 'abc' of {name} is not a version number (1, 2, ...)"
    env = {"MLFLOW_TRACKING_URI": registry["url"]}
    for args, line in (((name, "9"), missing), (("nosuch", "1"), nosuch), ((name, "abc"), malformed)):
        done = run_cli("reproduce", *args, "--root", str(project), cwd=project, env=env)
        assert (done.returncode, done.stdout, done.stderr) == (1, "", f"error: {line}\n"), done.stderr
    done = _cli(registry, "approve", name, "abc", "--reason", "r")
    assert (done.returncode, done.stdout, done.stderr) == (1, "", f"error: {malformed}\n"), done.stderr
    log = (project / ".shrinkflow" / "shrinkflow.log").read_text()
    assert log.count("Traceback") >= 4 and "RegistryError: there is no registered model 'nosuch'" in log
    # review, rollback --to and the comparisons take theirs the same way (the CLI prints the error).
    cfg = load_params(project / "params.yaml")
    tracker = Tracker(registry["url"], cfg.tracking.experiment)
    with pytest.raises(RegistryError, match=f"^{re.escape(nosuch)}$"):
        registered(tracker, "nosuch")
    with pytest.raises(RegistryError, match=f"^{re.escape(missing)}$"):
        record_of(tracker, name, "9")
    assert _state(registry) == before


def test_approve_completes_a_pending_registration_or_refuses_it(registry):
    """A version a run registered but never completed (``registration=pending``) becomes champion
    only through the reload check a re-run makes, and is then marked complete; failing it, or
    while its run may still be completing it, it is refused in one line and nothing changes."""
    name, client = registry["name"], registry["client"]
    gone = f"{socket.gethostname()}:{2**22 + 1}:0"  # above Linux's largest pid: no such process
    for version in ("2", "3"):
        client.set_model_version_tag(name, version, "registration", "pending")
        client.set_model_version_tag(name, version, "shrinkflow.process", gone)
    client.set_model_version_tag(name, "2", "test_acc", "12.5")  # it does not reproduce its record
    before = _state(registry)
    refused = _cli(registry, "approve", name, "2", "--reason", "looks fine", "--by", "alice")
    assert refused.returncode == 1 and refused.stdout == "", refused.stderr[-2000:]
    (line,) = refused.stderr.splitlines()
    assert line.startswith(f"error: {name} v2 is registration=pending (its run registered it but")
    assert "fails the reload check now too: " in line and "record says 12.50; it stays pending" in line
    assert line.endswith("run the pipeline again; nothing moved")
    assert _state(registry) == before

    cfg = load_params(registry["project"] / "params.yaml")
    tracker = Tracker(registry["url"], cfg.tracking.experiment)
    test = ServedTest.load(Layout.from_params(cfg, registry["project"]))
    client.set_model_version_tag(name, "3", "shrinkflow.process", this_process())  # alive: this test
    with pytest.raises(ReviewError, match=r"v3 is registration=pending and .* is still running: let it"):
        revalidate(tracker, name, "3", test, cfg)
    client.set_model_version_tag(name, "3", "shrinkflow.process", gone)

    done = _cli(registry, "approve", name, "3", "--reason", "its run died", "--by", "bob")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "as recorded; its pending registration is completed with the move" in done.stdout
    assert f"approved {name} v3 as @champion (was v1), by bob: its run died; its pending" in done.stdout
    assert aliases(registry["name"], registry["client"]) == {"champion": 3, "challenger": 2}
    assert (_tags(registry, "3")["registration"], _verdict(registry, "3")) == ("complete", "champion")
    assert _tags(registry, "2")["registration"] == "pending", "only the approved version is completed"


def test_approve_refuses_a_version_certified_on_another_split(registry, evaluated, tmp_path):
    """Data prepared here with another seed may hold a version's own training images: approving
    it is refused in one line that says how to prepare its split again, and nothing moves."""
    name, client = registry["name"], registry["client"]
    cfg = load_params(registry["project"] / "params.yaml")
    tracker = Tracker(registry["url"], cfg.tracking.experiment)
    # v4: v1's model, registered by a pipeline run that logged its params, as `shrinkflow run` does.
    parent = tracker.start_run("pipeline")
    summarise(Context(cfg, Layout.from_params(cfg, registry["project"]), tracker, parent), {})
    v1 = client.get_model_version(name, "1")
    model_id = v1.source.removeprefix("models:/")
    client.create_model_version(
        name, v1.source, tracker.start_run("promote", parent), v1.tags, model_id=model_id
    )
    params, layout = copy_project(evaluated, tmp_path, f"promote.model_name={name}", "seed=7")
    ours = prepare(params, layout).fingerprint  # the same images, split with another seed
    theirs = v1.tags["data_fingerprint"]
    assert ours != theirs
    before = _state(registry)
    env = {"MLFLOW_TRACKING_URI": registry["url"]}
    done = run_cli(
        "approve", name, "4", "--reason", "r", "-p", str(tmp_path / "params.yaml"), cwd=tmp_path, env=env
    )
    assert done.returncode == 1 and done.stdout == "", done.stderr[-2000:]
    (line,) = done.stderr.splitlines()
    assert line.startswith(
        f"error: {name} v4 was certified on data {theirs[:12]}, but the data prepared here is {ours[:12]}"
    )
    assert line.endswith(
        "get its split back with `shrinkflow stage prepare -s seed=0` (the params its run logged), "
        "then try again"
    )
    assert _state(registry) == before
    # A version whose run logged no params (a DVC stage promoted it) is refused the same way.
    test = ServedTest.load(layout)
    with pytest.raises(
        ReviewError, match=r"v1 was certified on data .*`shrinkflow stage prepare` and the seed"
    ):
        revalidate(tracker, name, "1", test, params)
    # `review` still compares them here, and says that these test images may have trained them.
    shown = "\n".join(side_by_side(tracker, name, {"champion": "1", "version": "4"}, test, params.promote))
    assert f"champion v1 was certified on other data ({theirs[:12]}): today's test images may" in shown


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
        assert aliases(registry["name"], registry["client"]) == {"champion": 1, "challenger": 2}
    for proc in procs.values():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    final = aliases(registry["name"], registry["client"])["champion"]
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
