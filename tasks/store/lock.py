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
import random
import socket
import time
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


class ProjectUnwritable(ShrinkflowError, RuntimeError):
    """The project directory (or its bookkeeping folder) cannot be written."""


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
    while True:
        fd = _open_lock_file(path)
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


def _open_lock_file(path: Path) -> int:
    """The lock file's descriptor, or one line saying the project cannot be written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        raise ProjectUnwritable(
            f"project {path.parent.parent} cannot be written: {exc.strerror or exc}{where}; every "
            f"command keeps its lock and log in {STATE_DIR}/ there: make it writable, or copy the "
            "project somewhere writable"
        ) from None


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


# The registry side ---------------------------------------------------------------------------
# MLflow has no compare-and-set on aliases. Creating a registered model is the one write that
# every backend store refuses atomically when the name exists (a unique key in the SQL stores
# behind `mlflow server`), so a short-lived registered model "<name>.alias-lock" serves as a mutex
# among all processes sharing one registry, wherever they run.
REGISTRY_LOCK_SUFFIX = ".alias-lock"
REGISTRY_LOCK_WAIT_S = 120.0  # a holder keeps it for milliseconds: re-read the alias, move it
REGISTRY_LOCK_STALE_S = 600.0  # a lock this old was left by a holder that died without deleting it


class RegistryLocked(ShrinkflowError, RuntimeError):
    """Another process held the registry's alias lock for longer than we waited."""


@contextlib.contextmanager
def registry_lock(client, name: str, owner: str, wait_s: float = REGISTRY_LOCK_WAIT_S) -> Iterator[None]:
    """Hold ``<name>.alias-lock`` in the registry of ``client`` (a tracker's ``registry``, or an
    ``MlflowClient``) for the block: other processes doing the same wait. A lock whose holder
    ended on this host (``owner`` is ``host:pid:start``) or that is older than
    :data:`REGISTRY_LOCK_STALE_S` is taken over."""
    import mlflow  # the project lock above needs no MLflow; only this does

    lock, token = f"{name}{REGISTRY_LOCK_SUFFIX}", f"{owner}:{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + wait_s
    while True:
        try:
            client.create_registered_model(
                lock,
                tags={"owner": token},
                description=f"held by {owner} while it moves an alias of {name}; deleted when done",
            )
            break
        except mlflow.exceptions.MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        holder = _registry_holder(client, lock)
        if holder is not None and _registry_lock_stale(holder):
            log.warning("took over %s, left by %s", lock, holder.tags.get("owner", "?"))
            _delete_registry_lock(client, lock, holder.tags.get("owner"))
            continue
        if time.monotonic() > deadline:
            who = holder.tags.get("owner", "?") if holder is not None else "?"
            raise RegistryLocked(
                f"registered model {lock} has been held by {who} for over {wait_s:g} s; if that "
                "process is gone, delete that registered model and run again"
            )
        time.sleep(0.05 + random.random() * 0.2)
    try:
        yield
    finally:
        _delete_registry_lock(client, lock, token)


def _registry_holder(client, lock: str):
    import mlflow

    try:
        return client.get_registered_model(lock)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":  # released between our create and get
            return None
        raise


def _registry_lock_stale(holder) -> bool:
    from shrinkflow.tasks.store.tracking import process_gone

    owner = holder.tags.get("owner", "")
    age_s = time.time() - (holder.creation_timestamp or 0) / 1000
    return age_s > REGISTRY_LOCK_STALE_S or (owner.count(":") >= 3 and process_gone(owner.rsplit(":", 1)[0]))


def _delete_registry_lock(client, lock: str, token: str | None) -> None:
    """Delete the lock if ``token`` still holds it (a taken-over holder must not free its successor)."""
    holder = _registry_holder(client, lock)
    if holder is not None and holder.tags.get("owner") == token:
        with contextlib.suppress(Exception):
            client.delete_registered_model(lock)
