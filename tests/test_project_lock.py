"""One writer per project: a second process is refused in one line naming the holder; a dead
holder's lock is taken over; a stage started by the holder does not wait for it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest

from shrinkflow.tasks.store.lock import HOLDER_ENV, LOCK_NAME, ProjectLocked, project_lock
from tests.conftest import BIN, run_cli, write_params

# A second real process: takes the project's lock, says so, then runs argv[2:] (if any) under it
# and waits for its stdin to close.
HOLDER = textwrap.dedent(
    """
    import subprocess, sys
    from shrinkflow.tasks.store.lock import project_lock
    with project_lock(sys.argv[1], "run"):
        print("held", flush=True)
        if sys.argv[2:]:
            done = subprocess.run(sys.argv[2:], cwd=sys.argv[1], capture_output=True, text=True)
            print("child", done.returncode, done.stderr.strip().splitlines()[-1:], flush=True)
        sys.stdin.read()
    """
)


def _hold(root, *command: str) -> subprocess.Popen:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(root), *command],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if k != HOLDER_ENV},
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


@pytest.fixture
def digits_project(tmp_path):
    write_params(tmp_path)
    return tmp_path


def test_second_writer_is_refused_naming_the_holder(digits_project):
    holder = _hold(digits_project)
    try:
        out = run_cli("stage", "prepare", cwd=digits_project)
        report = run_cli("report", cwd=digits_project)  # read-only: takes no lock
    finally:
        holder.communicate("", timeout=30)
    assert out.returncode == 1
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    assert re.fullmatch(
        rf"error: {re.escape(str(digits_project))} is in use by `shrinkflow run` \(pid {holder.pid}, "
        r"started \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC\); one run or stage per project at a time: .*",
        lines[0],
    ), lines[0]
    assert not (digits_project / "data").exists(), "the refused stage wrote nothing"
    assert "in use" not in report.stderr and "run the pipeline first" in report.stderr
    assert not (digits_project / LOCK_NAME).exists(), "the holder removes its lock file"


def test_lock_of_a_killed_holder_is_taken_over(digits_project):
    holder = _hold(digits_project)
    refused = pytest.raises(ProjectLocked, match=f"pid {holder.pid}")
    with refused, project_lock(digits_project, "stage prepare"):
        pass
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert (digits_project / LOCK_NAME).exists(), "SIGKILL leaves the lock file behind"
    with project_lock(digits_project, "stage prepare"):
        assert f'"pid": {os.getpid()}' in (digits_project / LOCK_NAME).read_text()
    assert not (digits_project / LOCK_NAME).exists()


def test_stage_started_by_the_holder_runs_under_its_lock(digits_project):
    holder = _hold(digits_project, str(BIN / "shrinkflow"), "stage", "prepare")
    child = holder.stdout.readline().split()
    holder.communicate("", timeout=30)
    assert child[:2] == ["child", "0"], child
    assert (digits_project / "data/prepared/manifest.json").is_file()


def test_nested_use_in_one_process_passes_through(tmp_path):
    with project_lock(tmp_path, "run"):
        token = os.environ[HOLDER_ENV]
        with project_lock(tmp_path, "stage prepare"):
            assert os.environ[HOLDER_ENV] == token
        assert (tmp_path / LOCK_NAME).exists(), "the inner use does not release the outer lock"
    assert HOLDER_ENV not in os.environ
