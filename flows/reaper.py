"""Stops the temporary Prefect server of a ``shrinkflow run`` that died without stopping it.

Prefect starts its temporary API server as a child process and stops it at exit; a run killed
with SIGKILL never exits, so the server would keep running, orphaned. ``shrinkflow run`` starts
this watcher with a pipe on its stdin: the pipe closes however the run ends, and the watcher then
terminates the run's server processes it has seen (re-checked, so a reused pid is never hit).
Linux only (it reads ``/proc``); elsewhere it is not started.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time
from pathlib import Path

SERVER_MARK = "prefect.server.api.server:create_app"  # in the temporary server's command line
PROC = Path("/proc")


def watch(parent: int) -> int | None:
    """Start a watcher of ``parent`` (this process) and return its pid; None where ``/proc`` is
    missing. The write end of its stdin pipe stays open, as a bare descriptor that no child
    inherits, until this process ends; no ``Popen`` object outlives the run to warn at exit that
    the watcher is still running (it is meant to be)."""
    if not (PROC / str(parent) / "cmdline").exists():
        return None
    read, _write = os.pipe()  # both close-on-exec: only the dup2 below reaches the watcher
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        return os.posix_spawn(
            sys.executable,
            [sys.executable, "-m", "shrinkflow.flows.reaper", str(parent)],
            os.environ,
            file_actions=[
                (os.POSIX_SPAWN_DUP2, read, 0),
                (os.POSIX_SPAWN_DUP2, devnull, 1),
                (os.POSIX_SPAWN_DUP2, devnull, 2),
            ],
            setsid=True,  # a Ctrl-C to the run's group must not stop the watcher first
        )
    finally:
        os.close(read)
        os.close(devnull)


def servers_of(parent: int) -> dict[int, str]:
    """The temporary Prefect servers ``parent`` has started: pid -> command line."""
    found = {}
    for stat in PROC.glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if ppid != parent:
                continue
            cmdline = _cmdline(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue  # exited while we looked
        if SERVER_MARK in cmdline:
            found[int(stat.parent.name)] = cmdline
    return found


def _cmdline(pid: int) -> str:
    return (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")


def still_running(pid: int, cmdline: str) -> bool:
    """Whether process ``pid`` still runs ``cmdline`` (not a reused pid, not a zombie)."""
    try:
        return _cmdline(pid) == cmdline
    except OSError:
        return False


def main(parent: int, poll_s: float = 0.5) -> None:
    seen: dict[int, str] = {}
    while True:
        seen |= servers_of(parent)
        ready, _, _ = select.select([sys.stdin], [], [], poll_s)
        if ready and not sys.stdin.buffer.read1(4096):
            break  # the pipe closed: the run is over
    time.sleep(1.0)  # a run that exits normally stops its server itself
    for pid, cmdline in seen.items():
        if still_running(pid, cmdline):
            os.kill(pid, signal.SIGTERM)


if __name__ == "__main__":
    main(int(sys.argv[1]))
