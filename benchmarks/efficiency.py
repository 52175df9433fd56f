"""The pipeline's own efficiency on a benchmark run: orchestration overhead (the flow's wall time
over its stages' own work), fan-out scaling (the shrink work on 1 and 2 single-thread workers of
each runner), training throughput (``engine.fit`` against a bare PyTorch loop) and ``dvc repro``
with nothing changed. Each is optional (:class:`Efficiency`): on CIFAR-10 each costs minutes."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn

from shrinkflow.models import build_model, model_spec
from shrinkflow.models.checkpoint import load_checkpoint
from shrinkflow.tasks.config import Params, apply_override, load_params
from shrinkflow.tasks.data.prepare import load_split, prepare
from shrinkflow.tasks.layout import Layout
from shrinkflow.tasks.measurement.evaluate import evaluate_models
from shrinkflow.tasks.pipeline.stages import fan_out_work
from shrinkflow.tasks.records import load_record
from shrinkflow.tasks.training.engine import (
    FP32,
    Precision,
    Split,
    augment_batch,
    fit,
    resolve_device,
    resolve_precision,
)
from shrinkflow.tasks.training.sensitivity import sensitivity_stage
from shrinkflow.tasks.training.train import seeded, shrink_candidate

REPO = Path(__file__).resolve().parents[1]
THROUGHPUT_IMAGES = 8192  # training images per throughput epoch (a rate needs no more)
VAL_BATCH = 1024  # the bare loop's validation batch (engine.predict's for small images)
REPEATS = 2  # timed comparisons alternate their two sides and keep the best of each
RUNNERS = ("thread", "process", "dask")
log = logging.getLogger("benchmarks.compress")


@dataclass(frozen=True)
class Efficiency:
    """Which efficiency figures a setup measures: the overhead (re-runs prepare, sensitivity and
    evaluate), fan-out scaling on ``speedup_runners`` (none: no figure) with
    ``speedup_candidates`` for ``speedup_epochs`` each, training throughput over
    ``throughput_epochs`` (0: none) and ``dvc repro``."""

    overhead: bool = True
    speedup_runners: tuple[str, ...] = RUNNERS
    speedup_candidates: tuple[str, ...] = ()
    speedup_epochs: int = 1
    throughput_epochs: int = 1
    dvc: bool = True


NONE = Efficiency(False, (), (), 0, 0, False)


def measure_efficiency(
    eff: Efficiency, params_file: Path, params: Params, project: Path, tmp: Path, flow_s: float
) -> dict:
    """The figures ``eff`` asks for, after the flow ran in ``project`` (in ``flow_s`` seconds)."""
    layout = Layout.from_params(params, project)
    out: dict = {}
    if eff.overhead:
        work = stage_work_seconds(params, layout, tmp / "stage-timing")
        out["overhead"] = {"flow_s": flow_s, "work_s": work, "ratio": flow_s / sum(work.values())}
    if eff.speedup_runners:
        out["speedup"] = parallel_speedup(params_file, project, tmp, eff) | {
            "candidates": list(eff.speedup_candidates),
            "epochs": eff.speedup_epochs,
        }
    if eff.throughput_epochs:
        out["throughput"] = training_throughput(params, layout, eff.throughput_epochs) | {
            "epochs": eff.throughput_epochs
        }
    if eff.dvc:
        out["dvc"] = dvc_repro_seconds(tmp)
    return out


def stage_work_seconds(params: Params, layout: Layout, scratch: Path) -> dict[str, float]:
    """Time spent in the stages' own work along the flow's critical path: prepare, sensitivity
    and evaluate re-run here on the same inputs (same work, no orchestration; sensitivity in a
    scratch copy with the flow's baseline, so its tables are measured again), training from the
    records; concurrent candidates (and a search's trials) count once, as the 2-worker schedule
    of their training times in the flow's order."""
    here = Layout.from_params(params, scratch)
    start = time.perf_counter()
    prepare(params, here)
    prepare_s = time.perf_counter() - start
    shutil.copytree(layout.baseline, here.baseline, dirs_exist_ok=True)
    start = time.perf_counter()
    sensitivity_stage(params, here)
    sensitivity_s = time.perf_counter() - start
    start = time.perf_counter()
    evaluate_models(params, layout)
    evaluate_s = time.perf_counter() - start
    shrink_s = fan_out_work(params, layout)  # a search's trials each a job, as the flow runs them
    baseline_s = load_record(layout, "baseline").train_seconds
    return {
        "prepare": prepare_s,
        "baseline_train": baseline_s,
        "sensitivity": sensitivity_s,
        "shrink_train": shrink_s,
        "evaluate": evaluate_s,
    }


def makespan(durations: list[float], workers: int) -> float:
    """When the last of ``durations`` ends if each goes, in order, to the first free worker (how
    a thread pool runs submitted tasks)."""
    free = [0.0] * workers
    for seconds in durations:
        free[free.index(min(free))] += seconds
    return max(free, default=0.0)


def _shrink_one(params_file: Path, overrides: tuple[str, ...], root: Path, name: str) -> tuple[float, str]:
    """One candidate's shrink work on one torch thread (what a worker of any runner does), with
    the params read in the worker (they do not pickle); returns its best validation accuracy and
    its checkpoint's sha256."""
    torch.set_num_threads(1)
    params = load_params(params_file, overrides)
    record = shrink_candidate(params, Layout.from_params(params, root), name)
    return record.best_val_acc, record.sha256


def _ready() -> None:
    """A worker's first task: import what the shrink work needs (its start-up, timed apart)."""
    import torch_pruning  # noqa: F401

    import shrinkflow.tasks.training.train  # noqa: F401


class _Pool:
    """``workers`` single-thread workers of ``runner``: threads of this process, spawned
    processes (how Prefect's ProcessPoolTaskRunner starts them) or a Dask LocalCluster on
    loopback (``threads_per_worker=1``, what the pipeline's dask runner starts)."""

    def __init__(self, runner: str, workers: int):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

        self.runner, self.workers, self.cluster = runner, workers, None
        if runner == "thread":
            self.pool = ThreadPoolExecutor(max_workers=workers)
        elif runner == "process":
            self.pool = ProcessPoolExecutor(
                max_workers=workers, mp_context=multiprocessing.get_context("spawn")
            )
        else:
            from dask.distributed import Client, LocalCluster

            self.cluster = LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address=None,
                silence_logs=logging.ERROR,
            )
            self.pool = Client(self.cluster)
        # Every worker started and its imports done before the work is timed.
        if runner == "dask":
            self.pool.run(_ready)
        else:
            for future in [self.pool.submit(_ready) for _ in range(workers)]:
                future.result()

    def map(
        self, params_file: Path, overrides: tuple[str, ...], root: Path, names: tuple[str, ...], workers: int
    ) -> list[tuple[float, str]]:
        """Each of ``names`` on the pool; with ``workers=1`` one at a time, each submitted when
        the previous is done (one worker busy: the 1-worker case on the same warm pool)."""
        if workers == 1:
            return [
                self.pool.submit(_shrink_one, params_file, overrides, root, n, **self._pure()).result()
                for n in names
            ]
        futures = [
            self.pool.submit(_shrink_one, params_file, overrides, root, n, **self._pure()) for n in names
        ]
        return [f.result() for f in futures]

    def _pure(self) -> dict:
        return {"pure": False} if self.runner == "dask" else {}

    def close(self) -> None:
        if self.runner == "dask":
            self.pool.close()
            self.cluster.close()
        else:
            self.pool.shutdown()


def shrink_seconds(
    pool: _Pool,
    workers: int,
    params_file: Path,
    overrides: tuple[str, ...],
    project: Path,
    scratch: Path,
    names: tuple[str, ...],
) -> dict:
    """The shrink stage's work for ``names`` on ``pool``, on a copy of the prepared data and
    baseline: its wall time and each candidate's (best val_acc, checkpoint sha256)."""
    overrides = (*overrides, f"shrink.workers={workers}", f"shrink.runner={pool.runner}")
    params = load_params(params_file, overrides)
    for sub in (params.paths.prepared, params.paths.baseline):
        shutil.copytree(project / sub, scratch / sub, dirs_exist_ok=True)
    start = time.perf_counter()
    results = pool.map(params_file, overrides, scratch, names, workers)
    work = time.perf_counter() - start
    return {"work_s": work, "results": dict(zip(names, results, strict=True))}


def parallel_speedup(params_file: Path, project: Path, tmp: Path, eff: Efficiency) -> dict:
    """Per runner of ``eff.speedup_runners``, the shrink stage on the same candidates with 1
    single-thread worker and with 2. Each runner's 2-worker pool is started once (its start-up
    timed: workers up, imports done); the 1-worker case runs the candidates on it one after
    another. Each (runner, workers) pair runs the work in turn, ``REPEATS`` rounds, best of
    each: load from elsewhere on a shared machine then hits every side alike, and the first
    round's lazy initialisation in a fresh worker does not count. Two single-thread workers on
    two cores can show scaling; two threads each could not. The speedup is of the work alone; a
    pool's start-up is reported beside it (a flow run pays it once). ``identical``: every run of
    every runner trained the same candidates (val_acc and checkpoint sha256)."""
    runners = eff.speedup_runners
    pools, startup = {}, {}
    try:
        for runner in runners:
            start = time.perf_counter()
            pools[runner] = _Pool(runner, 2)
            startup[runner] = time.perf_counter() - start
        runs = _timed_rounds(pools, params_file, project, tmp, eff)
    finally:
        for pool in pools.values():
            pool.close()
    results = {json.dumps(run["results"], sort_keys=True) for done in runs.values() for run in done}
    per_runner = {}
    for runner in runners:
        one = min(r["work_s"] for r in runs[runner, 1])
        two = min(r["work_s"] for r in runs[runner, 2])
        per_runner[runner] = {
            "one_worker_s": one,
            "two_workers_s": two,
            "speedup": one / two,
            "startup_s": startup[runner],
        }
    best = max(runners, key=lambda r: per_runner[r]["speedup"])
    first = runs[runners[0], 1][0]["results"]
    return {
        "runners": per_runner,
        "best_runner": best,
        "speedup": per_runner[best]["speedup"],
        "identical": len(results) == 1,
        "results": {n: {"val_acc": acc, "sha256": sha} for n, (acc, sha) in first.items()},
        "repeats": REPEATS,
        # Every run's (val_acc, sha256) per candidate, to find which differ when not identical.
        "runs": {f"{r}-{w}": [run["results"] for run in done] for (r, w), done in runs.items()},
    }


def _timed_rounds(
    pools: dict[str, _Pool], params_file: Path, project: Path, tmp: Path, eff: Efficiency
) -> dict[tuple[str, int], list[dict]]:
    """``REPEATS`` rounds of every (runner, workers) pair in turn, each on a fresh scratch copy."""
    overrides = (f"shrink.epochs={eff.speedup_epochs}",)
    runs: dict[tuple[str, int], list[dict]] = {(r, w): [] for r in pools for w in (1, 2)}
    for i in range(REPEATS):
        for runner, workers in runs:
            scratch = tmp / f"speedup-{runner}-{workers}-{i}"
            runs[runner, workers].append(
                shrink_seconds(
                    pools[runner], workers, params_file, overrides, project, scratch, eff.speedup_candidates
                )
            )
            shutil.rmtree(scratch)
    return runs


def bare_loop(
    model: nn.Module, train: Split, val: Split, params: Params, epochs: int, precision: Precision
) -> float:
    """The reference: a plain PyTorch loop (shuffle, the same crop/flip, forward and loss under
    ``precision``, backward, SGD step) and after each epoch a forward pass over the whole ``val``
    split in float32 (what fit's validation computes), with nothing else. Returns training images
    per second of the whole, validation included."""
    cfg, device = params.train, resolve_device(params.train.device)
    fmt = torch.channels_last if precision.channels_last else torch.contiguous_format
    model.to(device, memory_format=fmt)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    generator = torch.Generator().manual_seed(params.seed)
    x, y = train
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(y), generator=generator)
        for i in range(0, len(y), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            inputs = augment_batch(x[idx], params.data.augment, generator).to(device, memory_format=fmt)
            with torch.autocast(
                device.type, dtype=precision.autocast or torch.float32, enabled=precision.autocast is not None
            ):
                loss = nn.functional.cross_entropy(model(inputs), y[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.inference_mode():
            correct = sum(
                int(
                    (
                        model(val[0][i : i + VAL_BATCH].to(device)).argmax(1).cpu()
                        == val[1][i : i + VAL_BATCH]
                    ).sum()
                )
                for i in range(0, len(val[1]), VAL_BATCH)
            )
        assert 0 <= correct <= len(val[1])
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    model.to("cpu", memory_format=torch.contiguous_format)
    return epochs * len(y) / seconds


def throughput(initial: nn.Module, train: Split, val: Split, params: Params, epochs: int) -> dict:
    """Images/s of ``shrinkflow.tasks.training.engine.fit`` as the pipeline runs it (``train.precision``,
    validation on all of ``val`` each epoch), of the bare loop (same validation) in float32 and of
    the bare loop in the pipeline's precision, from the same seeded initial weights of
    ``initial``'s architecture; the three alternate, best of ``REPEATS`` each."""
    cfg = params.train.model_copy(update={"epochs": epochs})
    used = resolve_precision(cfg, resolve_device(cfg.device), initial)
    bare, same, engine = [], [], []
    for _ in range(REPEATS):
        bare.append(bare_loop(fresh_copy(initial, params.seed), train, val, params, epochs, FP32))
        same.append(bare_loop(fresh_copy(initial, params.seed), train, val, params, epochs, used))
        result = fit(fresh_copy(initial, params.seed), train, val, cfg, params.seed, params.data.augment)
        engine.append(result.images_seen / result.seconds)
    return {
        "precision": result.precision,
        "engine_images_per_s": max(engine),
        "bare_fp32_images_per_s": max(bare),
        "bare_same_images_per_s": max(same),
        "ratio": max(engine) / max(bare),
        "ratio_same_precision": max(engine) / max(same),
        "images": len(train[1]),
        "val_images": len(val[1]),
    }


def training_throughput(params: Params, layout: Layout, epochs: int) -> dict[str, float]:
    """:func:`throughput` on the baseline's architecture over the first ``THROUGHPUT_IMAGES``
    training images (repeated where the split has fewer), validating on the whole validation
    split, with every core."""
    torch.set_num_threads(os.cpu_count() or 1)
    x, y = load_split(layout, "train")
    val = load_split(layout, "val")
    initial, _ = load_checkpoint(layout.checkpoint("baseline"))
    # A smaller split (digits) is repeated up to the epoch's size: a few hundred images would time
    # milliseconds, where the per-epoch fixed costs of either side decide the ratio.
    rows = torch.arange(THROUGHPUT_IMAGES) % len(y)
    return throughput(initial, (x[rows], y[rows]), val, params, epochs)


def fresh_copy(model: nn.Module, seed: int) -> nn.Module:
    """The same architecture with seeded fresh weights (what a training run starts from)."""
    with seeded(seed):
        return build_model(model_spec(model))


# --- dvc -------------------------------------------------------------------------------------

DVC_FILES = ("dvc.yaml", "pyproject.toml", ".dvc", ".dvcignore", ".gitignore", "tasks", "models", "flows")
DVC_SMALL = (
    "train.epochs=3",
    "shrink.epochs=2",
    "shrink.candidates={w50: {strategy: width, ratio: 0.5}}",
    "evaluate.latency_repeats=5",
    "promote.model_name=shrinkflow-bench-dvc",
)


def dvc_repro_seconds(tmp: Path) -> dict[str, float]:
    """``dvc repro`` in a git copy of the project on digits with small params: the first run, and
    the second one, with nothing changed (which must run no stage)."""
    root = tmp / "dvc"
    root.mkdir()
    for item in DVC_FILES:
        src = REPO / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, root / item)
    for scratch in (".dvc/tmp", ".dvc/cache"):
        shutil.rmtree(root / scratch, ignore_errors=True)
    (root / "data/raw").mkdir(parents=True)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for item in DVC_SMALL:
        raw = apply_override(raw, item)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    git = ["git", "-c", "user.email=bench@example.com", "-c", "user.name=bench"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "benchmark"]):
        subprocess.run([*git, *args], cwd=root, check=True, capture_output=True)
    first, _ = _dvc_repro(root)
    second, out = _dvc_repro(root)
    if "Running stage" in out:
        raise RuntimeError(f"dvc repro with nothing changed ran stages:\n{out}")
    return {"first_s": first, "nothing_changed_s": second}


def _dvc_repro(root: Path) -> tuple[float, str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    start = time.perf_counter()
    done = subprocess.run(
        [str(Path(sys.executable).parent / "dvc"), "repro"], cwd=root, env=env, capture_output=True, text=True
    )
    if done.returncode:
        raise RuntimeError(f"dvc repro failed:\n{done.stdout}\n{done.stderr}")
    return time.perf_counter() - start, done.stdout
