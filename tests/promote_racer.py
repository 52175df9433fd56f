"""`shrinkflow stage promote`, exactly as the CLI runs it, with one pause: after the version is
registered and before its alias moves (the seconds of ONNX export, logging and validation that a
real promotion spends there), until the file ``$RACER_GO`` exists. ``$RACER_READY`` is created
when the pause begins. Used by tests/test_integrity.py to order two promotions, or to signal one
inside that window."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from shrinkflow.flows import cli
from shrinkflow.tasks.promotion import promote

_register = promote.register_model


def _register_then_wait(*args, **kwargs):
    version = _register(*args, **kwargs)
    Path(os.environ["RACER_READY"]).touch()
    while not Path(os.environ["RACER_GO"]).exists():
        time.sleep(0.05)
    return version


if __name__ == "__main__":
    # Started from a non-interactive shell's background job, SIGINT arrives ignored; a terminal's
    # Ctrl-C reaches the CLI with Python's own handler, which is what this stands for.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    promote.register_model = _register_then_wait
    sys.argv = ["shrinkflow", "stage", "promote", *sys.argv[1:]]
    sys.exit(cli.main())
