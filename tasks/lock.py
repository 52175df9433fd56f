"""One writer per project directory at a time, as DVC's own repo lock does for ``dvc repro``.

``shrinkflow run`` holds the lock across all its stages and ``shrinkflow stage`` takes it for its
one stage; a second writer is refused with one line naming the holder. The lock is an ``flock``
on ``<project>/.shrinkflow/lock``, so the kernel releases it when its holder dies (even by
SIGKILL) and a stale lock file is simply taken over. A process started by the holder (a stage of
a run, a worker) inherits :data:`HOLDER_ENV` and does not wait for its own parent.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

from shrinkflow.tasks.errors import ShrinkflowError

log = logging.getLogger(__name__)

STATE_DIR = ".shrinkflow"  # the project's own bookkeeping: this lock and the command log
LOCK_NAME = f"{STATE_DIR}/lock"
HOLDER_ENV = "SHRINKFLOW_LOCK_TOKEN"


class ProjectLocked(ShrinkflowError, RuntimeError):
    """Another shrinkflow process is writing to the same project directory."""


@contextlib.contextmanager
def project_lock(root: str | Path, command: str) -> Iterator[None]:
    """Hold the project's lock for the block; refuse at once (no waiting) if another process has
    it. Nested use by the holder, or by a process it started, passes straight through."""
    path = Path(root).resolve() / LOCK_NAME
    token = os.environ.get(HOLDER_ENV)
    held = _acquire(path, command, token)
    if held is None:  # our own run (or a parent of ours) holds it
        yield
        return
    fd, os.environ[HOLDER_ENV] = held
    try:
        yield
    finally:
        _release(path, fd, token)


def _acquire(path: Path, command: str, inherited: str | None) -> tuple[int, str] | None:
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = _holder(path)
            if inherited and holder.get("token") == inherited:
                return None
            raise ProjectLocked(_describe(path, holder)) from None
        # The previous holder may have unlinked the file between our open and our flock; a lock
        # on a deleted file guards nothing, so start again on the current one.
        if _same_file(fd, path):
            break
        os.close(fd)
    stale = _holder(path)
    if stale.get("pid"):
        log.warning("took over the lock of pid %s (%s), which is no longer running", stale["pid"], path)
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command,
        "started": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "token": uuid.uuid4().hex,
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    return fd, info["token"]


def _release(path: Path, fd: int, previous_token: str | None) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # while still holding it, so no one can lock the old file in between
    os.close(fd)
    if previous_token is None:
        os.environ.pop(HOLDER_ENV, None)
    else:
        os.environ[HOLDER_ENV] = previous_token


def _same_file(fd: int, path: Path) -> bool:
    try:
        here = path.stat()
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (opened.st_dev, opened.st_ino)


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(path: Path, holder: dict) -> str:
    who = f"pid {holder.get('pid', '?')}"
    if holder.get("host") and holder["host"] != socket.gethostname():
        who += f" on {holder['host']}"
    what = holder.get("command", "another shrinkflow process")
    since = holder.get("started", "an unknown time")
    return (
        f"{path.parent.parent} is in use by `shrinkflow {what}` ({who}, started {since}); "
        "one run or stage per project at a time: wait for it to finish or stop it"
    )
