"""Terminal progress: one line per model in training (epochs), shown only to a person.

The training loop calls :func:`epoch_done`; whoever runs a stage wraps it in :func:`showing`.
The listener lives in a context variable, so concurrent candidates in threads each update their
own line, and nothing is threaded through the training code. In CI, in a pipe, or in a worker
process nothing is drawn at all.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextvars import ContextVar

Listener = Callable[[int, int, dict], None]
_listener: ContextVar[Listener | None] = ContextVar("shrinkflow_epoch_listener", default=None)
_lock = threading.Lock()
_display = None  # the one rich Progress of this process, started on first use


def enabled() -> bool:
    return (
        sys.stderr.isatty()
        and not os.environ.get("CI")
        and multiprocessing.current_process().name == "MainProcess"
    )


def epoch_done(epoch: int, total: int, row: dict) -> None:
    """Called by the training loop after each epoch."""
    if (listener := _listener.get()) is not None:
        listener(epoch, total, row)


def _progress():
    global _display
    with _lock:
        if _display is None:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            _display = Progress(
                TextColumn("{task.description:<28}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            _display.start()
        return _display


@contextlib.contextmanager
def showing(name: str, what: str = "epochs") -> Iterator[None]:
    """Show a line for ``name`` while the block trains it (no-op when nobody is watching)."""
    if not enabled():
        yield
        return
    display = _progress()
    line = display.add_task(f"{name} ({what})", total=None, status="")

    def update(epoch: int, total: int, row: dict) -> None:
        status = f"val {row['val_acc']:.2f}%" if "val_acc" in row else ""
        display.update(line, completed=epoch, total=total, status=status)

    token = _listener.set(update)
    try:
        yield
    finally:
        _listener.reset(token)
        display.update(line, status=display.tasks[line].fields["status"] + " done")


def stop() -> None:
    """Finish the display (call once the run is over, before printing the final table)."""
    global _display
    with _lock:
        if _display is not None:
            _display.stop()
            _display = None
