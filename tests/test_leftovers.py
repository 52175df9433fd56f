"""What a killed run leaves in MLflow is closed by the next run that resumes the work."""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid

from mlflow import MlflowClient

from shrinkflow.tasks.pipeline.stages import Context
from shrinkflow.tasks.store.tracking import KILLED_TAG, Tracker, tracking_uri
from tests.conftest import REPO


def test_runs_a_killed_process_left_running_are_marked_killed_by_the_next_run(project):
    uri, experiment = tracking_uri(project), f"leftovers-{uuid.uuid4().hex[:8]}"
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import os, signal; from shrinkflow.tasks.store.tracking import Tracker; "
            f"print(Tracker({uri!r}, {experiment!r}).start_run('orphan'), flush=True); "
            "os.kill(os.getpid(), signal.SIGKILL)",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    orphan = killed.stdout.split()[-1]
    live = Tracker(uri, experiment).start_run("live")  # this process's: still in progress
    client = MlflowClient(uri)
    assert client.get_run(orphan).info.status == "RUNNING"

    Context.load(project / "params.yaml", (f"tracking.experiment={experiment}",), project)

    closed = client.get_run(orphan)
    assert closed.info.status == "KILLED"
    assert "ended without finishing it" in closed.data.tags[KILLED_TAG]
    assert client.get_run(live).info.status == "RUNNING" and KILLED_TAG not in client.get_run(live).data.tags
