"""Stopping a run part-way, cleanly. A signal reaches only the main thread; candidates training
in the thread runner's other threads hear of it here and stop at their next batch, so each ends
its MLflow run KILLED and the process exits promptly instead of after their last epoch."""

from __future__ import annotations

import threading

_requested = threading.Event()
_reason = ["stopped"]


class Stopped(KeyboardInterrupt):
    """Raised in a training loop when the run it belongs to was interrupted."""


def request(reason: str) -> None:
    """Ask every training loop of this process to stop (the main thread was interrupted)."""
    _reason[0] = reason
    _requested.set()


def clear() -> None:
    """A new run in this process starts unstopped."""
    _requested.clear()


def check() -> None:
    """Raise :class:`Stopped` if the run was interrupted; training loops call this per batch."""
    if _requested.is_set():
        raise Stopped(_reason[0])
