"""Crash-safe file output: every file a stage writes is written beside its target and renamed
into place, so a killed process never leaves a truncated file that a later stage or DVC would
trust."""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shrinkflow.models.checkpoint import checkpoint_payload, sha256_file
from shrinkflow.tasks.errors import ShrinkflowError


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success rename it over ``target``. A
    failure to write or replace it (disk full, a directory in the way) names ``target``, not the
    temporary file nobody asked for."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600 whatever the umask says
    finally:
        os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    except OSError as exc:
        if exc.filename not in (None, tmp):
            raise  # about some other file: its own name is the right one
        raise type(exc)(exc.errno, exc.strerror or str(exc), str(target)) from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def current_umask() -> int:
    """The process umask, read without changing it (``os.umask`` can only set it, and setting it
    even briefly would race with other threads creating files)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no /proc: the old way, briefly
    os.umask(mask)
    return mask


TEMPORARY_GLOB = ".*.tmp"


def sweep_temporaries(*directories: Path) -> list[Path]:
    """Delete the temporaries a killed process left behind (``atomic_path`` cannot clean up after
    SIGKILL); returns what was removed. Finished files are never touched."""
    removed = []
    for directory in directories:
        if directory.is_dir():
            for stale in directory.rglob(TEMPORARY_GLOB):
                stale.unlink(missing_ok=True)
                removed.append(stale)
    return removed


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, payload: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def write_torch(path: str | Path, obj: Any) -> None:
    """``torch.save`` made atomic and byte-reproducible (torch names the archive after the file
    it writes, so it is serialised in memory rather than into a randomly named temporary)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())


class DamagedFile(ShrinkflowError, ValueError):
    """A JSON file a stage wrote that no longer parses (truncated, edited by hand)."""


def read_json(path: str | Path) -> Any:
    text = Path(path).read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DamagedFile(
            f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); re-run the stage that writes it "
            "(or delete it)"
        ) from None


def save_checkpoint(model: nn.Module, path: str | Path, meta: dict[str, Any] | None = None) -> str:
    """Atomically write ``model`` as spec + state dict; return the file's sha256."""
    write_torch(path, checkpoint_payload(model, meta))
    return sha256_file(path)
