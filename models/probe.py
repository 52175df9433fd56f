"""A bounded look at torch-pruning's dependency graph of a network, before anything relies on it.

Building the graph and enumerating its groups runs arbitrary tracing over a network nobody here
wrote: on ShuffleNetV2 it raises ``ZeroDivisionError`` deep in torch-pruning, on Swin its group
enumeration grows memory without bound (23 GB before the kernel killed a run, with nothing
printed). So the probe runs in a child process (a fresh interpreter: no fork of a process whose
other threads may hold locks) under an address-space limit and a timeout, and hands back a small
:class:`GraphProbe`. The baseline's record keeps it; a candidate whose strategy needs the graph is
refused at once when the probe failed, while the other strategies still run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

# Address space the child may take beyond what it holds once torch is imported and the network
# built (about 3.5 GB, mostly shared mappings). Measured: 7-20 MB for the zoo's families at 32 px,
# 113-195 MB for ConvNeXt-T, DenseNet-121, ViT-B/16 and ResNet-152 at 224 px; Swin-T's group
# enumeration grows about 40 MB/s and never ends (2 GiB after about a minute).
MEMORY_BYTES = 2 << 30
TIMEOUT_S = 180.0  # the child's imports included (3-10 s on a busy 2-core machine)


@dataclass(frozen=True)
class GraphProbe:
    """What torch-pruning's graph of ``family`` shows: the prunable ``groups``, the layers with
    weights it leaves alone (the classifier always), or why there is no usable graph."""

    family: str
    ok: bool
    groups: int = 0
    left_alone: list[str] = field(default_factory=list)
    reason: str = ""  # why not ok: the error, the memory or the time bound
    seconds: float = 0.0
    memory_mb: int = 0  # address space the graph took beyond the built network

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        """The one log line a reader needs about the graph."""
        if not self.ok:
            return no_graph_line(self.family, self.reason)
        alone = ", ".join(self.left_alone) or "nothing"
        return f"{self.family}: torch-pruning finds {self.groups} prunable groups; it leaves alone: {alone}"


class NoGraph(RuntimeError):
    """A strategy needs torch-pruning's graph of a network whose probe found none."""


def no_graph_line(name: str, reason: str) -> str:
    """One line: the network, why it has no graph, what cannot run and what still applies."""
    from shrinkflow.models.strategies import STRATEGIES  # not in the child, which needs none

    needs = [s.name for s in STRATEGIES.values() if s.needs_graph]
    still = [s.name for s in STRATEGIES.values() if not (s.needs_graph or s.needs_parametric)]
    return (
        f"{name}: torch-pruning has no usable graph ({reason}), so {', '.join(needs)} cannot run; "
        f"{', '.join(still)} still apply (each with distill)"
    )


def refuse_without_graph(strategy: str, probe: dict[str, Any] | None) -> None:
    """Raise :class:`NoGraph` when ``strategy`` needs the graph and the baseline's ``probe``
    (its record's ``pruning``; None: never probed, a network of our own) found none."""
    from shrinkflow.models.strategies import STRATEGIES

    if probe is not None and not probe.get("ok", True) and STRATEGIES[strategy].needs_graph:
        raise NoGraph(no_graph_line(probe.get("family", "this network"), probe.get("reason", "")))


def probe_model(model: Any) -> GraphProbe:
    """:func:`probe_graph` of a built network (its spec, the user code folders this process
    trusts). Never raises: a probe that cannot even start is a finding like any other."""
    from shrinkflow.models.arch.given import user_code_folders

    try:
        spec = model.spec()
        # The user code folders served now that are still there (a loaded model's went with it).
        code = [str(p) for p in user_code_folders() if p.is_dir()]
        return probe_graph(spec, code)
    except Exception as exc:
        text = (str(exc).strip().splitlines() or [""])[0][:200]
        return GraphProbe(type(model).__name__, False, reason=f"the probe failed: {text}")


def family(spec: dict[str, Any]) -> str:
    """A network's name as a user gave it: ``torchvision swin_t``, ``factory pkg.mod:build``, or
    the architecture's own name."""
    if spec.get("arch") == "torchvision":
        return f"torchvision {spec['name']}"
    if spec.get("arch") == "factory":
        return f"factory {spec['factory']}"
    return str(spec.get("arch"))


def probe_graph(
    spec: dict[str, Any],
    code: list[str] | tuple[str, ...] = (),
    memory_bytes: int = MEMORY_BYTES,
    timeout_s: float = TIMEOUT_S,
) -> GraphProbe:
    """Build the network ``spec`` describes in a child process (user code imported from the
    folders in ``code``, as the pipeline trusts them) and summarise its graph there, within
    ``memory_bytes`` of extra address space and ``timeout_s`` seconds."""
    name = family(spec)
    request = {"path": sys.path, "code": [str(c) for c in code], "spec": spec, "memory": memory_bytes}
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-c", _CHILD],
            input=json.dumps(request),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    except subprocess.TimeoutExpired:  # run() has killed the child
        return GraphProbe(name, False, reason=f"not done within {timeout_s:g} s", seconds=timeout_s)
    seconds = round(time.perf_counter() - start, 2)
    answer = _answer(done.stdout)
    if answer is None:
        return GraphProbe(name, False, reason=_death(done, memory_bytes), seconds=seconds)
    return GraphProbe(name, seconds=seconds, **answer)


def _answer(stdout: str) -> dict[str, Any] | None:
    """The child's record: the last line of its output, if it got that far."""
    lines = stdout.strip().splitlines()
    try:
        return json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        return None


def _death(done: subprocess.CompletedProcess, memory_bytes: int) -> str:
    """Why the child gave no record: out of its memory bound (an allocation refused, which some
    C++ code turns into an abort), or another death."""
    text = done.stderr.strip().splitlines()
    last = text[-1][:200] if text else f"exit status {done.returncode}"
    if done.returncode < 0 or any(word in done.stderr for word in ("MemoryError", "allocate", "bad_alloc")):
        return f"{_bound(memory_bytes)} ({last})"
    return f"the probe died: {last}"


def _bound(memory_bytes: int) -> str:
    return f"stopped at its memory bound of {memory_bytes / 2**30:g} GiB"


# The child: the parent's import path, the memory bound set once torch is imported (its own
# mappings are not the network's), then the summary as one JSON line on stdout.
_CHILD = """
import json, sys
request = json.loads(sys.stdin.read())
sys.path[:] = request["path"]
from shrinkflow.models.probe import child_main
print(json.dumps(child_main(request)))
"""


def child_main(request: dict[str, Any]) -> dict[str, Any]:
    """In the child: bound memory, build the network, summarise its graph; an exception from
    torch-pruning is the record's ``reason``, named after the layer it was tracing when known."""
    import contextlib
    import resource

    import torch

    from shrinkflow.models.arch.given import user_code
    from shrinkflow.models.architecture import pruning_summary
    from shrinkflow.models.registry import build_model

    torch.set_num_threads(1)
    spec = request["spec"]
    with contextlib.ExitStack() as scope:
        for folder in request["code"]:
            scope.enter_context(user_code(folder))
        model = build_model(spec).eval()
    example = torch.zeros(1, spec["in_channels"], spec["image_size"], spec["image_size"])
    try:
        used = _address_space()
        resource.setrlimit(resource.RLIMIT_AS, (used + request["memory"], resource.RLIM_INFINITY))
    except (OSError, ValueError):  # no /proc (not Linux): the time bound alone holds
        used = None
    try:
        summary = pruning_summary(model, example)
        grown = (_address_space("VmPeak") - used) >> 20 if used is not None else 0
        return {"ok": True, **summary, "memory_mb": grown}
    except Exception as exc:  # torch-pruning's own failure on this network: the probe's finding
        if isinstance(exc, MemoryError) or "can't allocate memory" in str(exc):
            return {"ok": False, "reason": _bound(request["memory"])}
        return {"ok": False, "reason": _traced(exc, model)}


def _address_space(key: str = "VmSize") -> int:
    """This process's virtual memory size (``VmPeak``: its peak) in bytes (Linux)."""
    with open("/proc/self/status") as fh:
        line = next(row for row in fh if row.startswith(f"{key}:"))
    return int(line.split()[1]) * 1024


def _traced(exc: BaseException, model: Any) -> str:
    """``Type: first line``, naming the layer torch-pruning was handling when it failed: the
    innermost frame's module of ``model``, or the nearest one feeding the graph node there (a
    reshape or concatenation is no layer of the model)."""
    names = {id(m): n for n, m in model.named_modules() if n}
    where, tb = "", exc.__traceback__
    while tb is not None:
        found = (_layer(value, names) for value in tb.tb_frame.f_locals.values())
        where = next((name for name in found if name), where)
        tb = tb.tb_next
    text = (str(exc).strip().splitlines() or [""])[0][:160]
    error = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return f"{error} at {where}" if where else error


def _layer(value: Any, names: dict[int, str]) -> str:
    """The model layer ``value`` is, or (a graph node) the nearest one upstream of it."""
    seen, queue = set(), [value]
    while queue and len(seen) < 64:
        item = queue.pop(0)
        module = getattr(item, "module", item)
        if id(module) in names:
            found = f"{names[id(module)]} ({type(module).__name__})"
            if item is value or module is value:
                return found
            op = getattr(getattr(value, "type", None), "name", "an operation").lower()
            return f"the {op} after {found}"
        seen.add(id(item))
        queue += [n for n in getattr(item, "inputs", ()) if id(n) not in seen]
    return ""
