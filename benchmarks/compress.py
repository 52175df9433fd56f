"""Compression benchmark: shrinkflow's promoted model against the seed's manual adjustment and
plain torch-pruning on real CIFAR-10, plus the pipeline's own efficiency figures.

    python -m benchmarks.compress [--quick] [--train-samples N|all] [--out DIR]

Every contender starts from the one baseline the pipeline trains, gets the same fine-tuning
budget in epochs and goes through the same training loop (``tasks.engine.fit``), and every
model is measured by ``tasks.evaluate``'s own functions (latency single-threaded on the CPU).
The only other loop is the deliberately bare reference loop the throughput figure compares with.
Results go to ``<out>/<date>-<machine>.md`` (the Markdown tables) and ``.json`` (raw figures).
Tracking (MLflow, Prefect) goes to a temporary directory, never to the project's own stores.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from torch import nn

from models import build_model, model_spec
from models.checkpoint import load_checkpoint
from tasks.config import Params, apply_override, load_params
from tasks.engine import Split, fit, resolve_device
from tasks.evaluate import MEASURED_SPLITS, evaluate_models, latency_ms, measure
from tasks.layout import Layout
from tasks.prepare import load_split, prepare
from tasks.records import load_record
from tasks.stages import fan_out
from tasks.train import candidate_train_config, seeded, shrink_candidate, threads_per_worker

REPO = Path(__file__).resolve().parents[1]
CIFAR_TARBALL = REPO.parent / "shared/data/cifar10-jpg.tar.gz"
RESULTS = REPO / "benchmarks/results"
THROUGHPUT_BATCH = 64
REPEATS = 2  # timed comparisons alternate their two sides and keep the best of each
log = logging.getLogger("benchmarks.compress")


@dataclass(frozen=True)
class Setup:
    """One benchmark configuration: data, budgets (epochs) and the pipeline's candidates."""

    name: str
    data: str  # what the data is, for the report
    overrides: tuple[str, ...]  # applied to the repository's params.yaml
    speedup_candidates: tuple[str, ...]  # trained with 1 and then 2 workers
    speedup_epochs: int
    throughput_epochs: int


CANDIDATES_CIFAR = (
    "{width-50: {strategy: width, ratio: 0.5}, width-75: {strategy: width, ratio: 0.75},"
    " l1-50: {strategy: prune_l1, ratio: 0.5, lr: 0.01}, l1-75: {strategy: prune_l1, ratio: 0.75, lr: 0.01},"
    " l1-87: {strategy: prune_l1, ratio: 0.875, lr: 0.01}, depth-50: {strategy: depth, ratio: 0.5, lr: 0.01}}"
)
CANDIDATES_QUICK = (
    "{width-50: {strategy: width, ratio: 0.5}, l1-50: {strategy: prune_l1, ratio: 0.5, lr: 0.01},"
    " l1-75: {strategy: prune_l1, ratio: 0.75, lr: 0.01}}"
)


def cifar_setup(data_root: Path, train_samples: int | None, base_epochs: int, tune_epochs: int) -> Setup:
    """The seed's BaseNet (64/128 channels, 1000 hidden) on 32x32 CIFAR-10: 2,000 validation
    images (4% of the 50,000 training images), a 5,000-image gate (10%) that certifies promotion,
    the full 10,000-image test split."""
    return Setup(
        name="cifar10",
        data=f"CIFAR-10 JPEGs ({CIFAR_TARBALL.name}, unpacked to a temporary directory)",
        overrides=(
            "data.source=imagefolder",
            f"data.root={data_root}",
            "data.val_fraction=0.04",
            "data.gate_fraction=0.1",
            "promote.tolerance=1.0",
            f"data.max_train_samples={'null' if train_samples is None else train_samples}",
            "model.channels=[64, 128]",
            "model.hidden=[1000]",
            f"train.epochs={base_epochs}",
            f"shrink.epochs={tune_epochs}",
            f"shrink.candidates={CANDIDATES_CIFAR}",
            "promote.model_name=shrinkflow-bench-cifar10",
        ),
        speedup_candidates=("width-50", "l1-50"),
        speedup_epochs=1,
        throughput_epochs=1,
    )


QUICK = Setup(
    name="quick-digits",
    data="scikit-learn's 8x8 digits",
    overrides=(
        "train.epochs=6",
        "shrink.epochs=3",
        f"shrink.candidates={CANDIDATES_QUICK}",
        "evaluate.latency_repeats=10",
        "promote.tolerance=2.0",
        "promote.model_name=shrinkflow-bench-quick",
    ),
    speedup_candidates=("width-50", "l1-50"),
    speedup_epochs=2,
    throughput_epochs=2,
)
# What every setup shares: an absolute tolerance and two shrink workers.
COMMON = ("promote.tolerance_mode=absolute", "shrink.workers=2", "seed=0")


@dataclass
class Contender:
    """One model of the comparison table and its measured figures."""

    name: str
    how: str
    test_acc: float
    params: int
    flops: int
    size_bytes: int
    latency_ms: float  # batch 1, median, one CPU thread
    throughput: float  # images/s at batch 64 (median batch time), one CPU thread


@dataclass
class Figures:
    """Everything one benchmark run measured, as written to the JSON file."""

    setup: str
    machine: dict
    config: dict
    contenders: list[Contender] = field(default_factory=list)
    candidates: list[dict] = field(default_factory=list)
    efficiency: dict = field(default_factory=dict)
    wall_seconds: float = 0.0


# --- the run ---------------------------------------------------------------------------------


def write_params(root: Path, setup: Setup) -> Path:
    """The benchmark's params.yaml: the repository's, with the setup's overrides."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for item in (*setup.overrides, *COMMON):
        raw = apply_override(raw, item)
    root.mkdir(parents=True, exist_ok=True)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run_flow(params_file: Path, root: Path) -> float:
    """The whole Prefect flow once, as a user runs it (``shrinkflow run``, which calls
    ``flows.pipeline.run``), in its own process: Prefect's background threads and temporary
    server then never compete with the measurements that follow. Returns its wall time
    (interpreter and Prefect server start included: both are orchestration)."""
    shrinkflow = Path(sys.executable).parent / "shrinkflow"
    command = [str(shrinkflow), "run", "-p", str(params_file), "--root", str(root)]
    start = time.perf_counter()
    with open(root / "flow.log", "w") as log:
        done = subprocess.run(command, cwd=root, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(
            f"shrinkflow run failed; its output ends:\n{(root / 'flow.log').read_text()[-3000:]}"
        )
    return seconds


def stage_work_seconds(params: Params, layout: Layout, scratch: Path) -> dict[str, float]:
    """Time spent in the stages' own work along the flow's critical path: prepare and evaluate
    re-run here on the same inputs (same work, no orchestration), training from the records;
    concurrent candidates count once, as the 2-worker schedule of their training times."""
    start = time.perf_counter()
    prepare(params, Layout.from_params(params, scratch))
    prepare_s = time.perf_counter() - start
    start = time.perf_counter()
    evaluate_models(params, layout)
    evaluate_s = time.perf_counter() - start
    together, alone = fan_out(params)
    seconds = {name: load_record(layout, name).train_seconds for name in params.shrink.candidates}
    shrink_s = makespan([seconds[n] for n in together], params.shrink.workers) + sum(
        seconds[n] for n in alone
    )
    baseline_s = load_record(layout, "baseline").train_seconds
    return {
        "prepare": prepare_s,
        "baseline_train": baseline_s,
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


def shrink_seconds(
    params: Params, project: Path, scratch: Path, names: tuple[str, ...], workers: int
) -> float:
    """Wall time of the shrink stage's work for ``names`` with ``workers`` concurrent threads, each
    with the thread share the pipeline gives it, on a copy of the prepared data and baseline."""
    from concurrent.futures import ThreadPoolExecutor

    for sub in (params.paths.prepared, params.paths.baseline):
        shutil.copytree(project / sub, scratch / sub, dirs_exist_ok=True)
    params = params.model_copy(update={"shrink": params.shrink.model_copy(update={"workers": workers})})
    layout = Layout.from_params(params, scratch)

    def one(name: str) -> None:
        torch.set_num_threads(threads_per_worker(workers))  # as stages.run_candidate does
        shrink_candidate(params, layout, name)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, names))
    return time.perf_counter() - start


def parallel_speedup(params: Params, project: Path, tmp: Path, setup: Setup) -> dict[str, float]:
    """The shrink stage on the same candidates with 1 worker and with 2, alternately, best of
    ``REPEATS`` each: load from elsewhere on a shared machine then hits both alike."""
    budget = params.shrink.model_copy(update={"epochs": setup.speedup_epochs})
    params = params.model_copy(update={"shrink": budget})
    times: dict[int, list[float]] = {1: [], 2: []}
    for i in range(REPEATS):
        for workers in times:
            scratch = tmp / f"speedup-{workers}-{i}"
            times[workers].append(shrink_seconds(params, project, scratch, setup.speedup_candidates, workers))
    one, two = min(times[1]), min(times[2])
    return {"one_worker_s": one, "two_workers_s": two, "speedup": one / two, "repeats": REPEATS}


def bare_loop(model: nn.Module, train: Split, params: Params, epochs: int) -> float:
    """The reference: a plain PyTorch loop (shuffle, forward, cross-entropy, backward, SGD step)
    with nothing else. Returns images per second."""
    cfg, device = params.train, resolve_device(params.train.device)
    model.to(device).train()
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    generator = torch.Generator().manual_seed(params.seed)
    x, y = train
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for i in range(0, len(y), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            loss = nn.functional.cross_entropy(model(x[idx].to(device)), y[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    model.to("cpu")
    return epochs * len(y) / seconds


def training_throughput(params: Params, layout: Layout, epochs: int) -> dict[str, float]:
    """Images/s of ``tasks.engine.fit`` (validation each epoch and best-weights copies included)
    and of the bare loop, on the baseline's architecture from the same initial weights; the two
    alternate, best of ``REPEATS`` each."""
    torch.set_num_threads(os.cpu_count() or 1)
    train, val = load_split(layout, "train"), load_split(layout, "val")
    initial, _ = load_checkpoint(layout.checkpoint("baseline"))
    cfg = params.train.model_copy(update={"epochs": epochs})
    bare, engine = [], []
    for _ in range(REPEATS):
        bare.append(bare_loop(fresh_copy(initial, params.seed), train, params, epochs))
        result = fit(fresh_copy(initial, params.seed), train, val, cfg, params.seed, params.data.augment)
        engine.append(result.images_seen / result.seconds)
    return {
        "engine_images_per_s": max(engine),
        "bare_images_per_s": max(bare),
        "ratio": max(engine) / max(bare),
    }


def fresh_copy(model: nn.Module, seed: int) -> nn.Module:
    """The same architecture with seeded fresh weights (what a training run starts from)."""
    with seeded(seed):
        return build_model(model_spec(model))


# --- contenders ------------------------------------------------------------------------------


def torch_pruning_peer(
    baseline: nn.Module, example: torch.Tensor, num_classes: int, ratio: float
) -> nn.Module:
    """torch-pruning used as its README shows: one-shot group L1 magnitude pruning of every
    prunable layer but the final classifier, at ``ratio``."""
    import torch_pruning as tp

    model = copy.deepcopy(baseline)
    ignored = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    pruner = tp.pruner.MetaPruner(
        model,
        example,
        importance=tp.importance.GroupMagnitudeImportance(p=1),
        pruning_ratio=ratio,
        ignored_layers=ignored,
    )
    pruner.step()
    return model


def measured(name: str, how: str, model: nn.Module, params: Params, splits: dict[str, Split]) -> Contender:
    """One model through ``tasks.evaluate``: accuracy, params, FLOPs, size, batch-1 latency, and the
    same latency function on a batch of 64 for throughput."""
    m, _ = measure(model, splits, params.evaluate)
    test = splits["test"]
    batch_ms = latency_ms(model, test[0][:THROUGHPUT_BATCH], params.evaluate)
    return Contender(
        name,
        how,
        m.test_acc,
        m.params,
        m.flops,
        m.size_bytes,
        m.latency_ms,
        THROUGHPUT_BATCH * 1000 / batch_ms,
    )


def contenders(params: Params, layout: Layout, decision: dict) -> list[Contender]:
    """Baseline, the seed's manual adjustment, plain torch-pruning and shrinkflow's promoted model."""
    splits = {split: load_split(layout, split) for split in MEASURED_SPLITS}
    val, test = splits["val"], splits["test"]
    baseline, _ = load_checkpoint(layout.checkpoint("baseline"))
    seed_adjusted, _ = load_checkpoint(layout.checkpoint("width-50"))
    torch.set_num_threads(os.cpu_count() or 1)  # the shrink stage left each thread with its share
    train = load_split(layout, "train")
    pruned = torch_pruning_peer(baseline, test[0][:1], num_classes=len(test[1].unique()), ratio=0.5)
    # The same fine-tuning recipe and budget as the pipeline's own L1 candidate at ratio 0.5.
    fit(pruned, train, val, candidate_train_config(params, "l1-50"), params.seed, params.data.augment)
    winner = decision["winner"]
    promoted, _ = load_checkpoint(layout.checkpoint(winner))
    epochs, data = params.shrink.epochs, (params, splits)
    return [
        measured("baseline", f"BaseNet, {params.train.epochs} epochs", baseline, *data),
        measured("seed: AdjustedNet", f"width x0.5, fresh init, {epochs} epochs", seed_adjusted, *data),
        measured("torch-pruning", f"MetaPruner L1 0.5 one-shot, {epochs} epochs", pruned, *data),
        measured(
            f"shrinkflow: {winner}", f"promoted at tolerance {params.promote.tolerance}", promoted, *data
        ),
    ]


# --- dvc -------------------------------------------------------------------------------------

DVC_FILES = ("dvc.yaml", "pyproject.toml", ".dvc", ".dvcignore", ".gitignore", "tasks", "models", "flows")
DVC_SMALL = (
    "train.epochs=3",
    "shrink.epochs=2",
    "shrink.candidates={w50: {strategy: width, ratio: 0.5},"
    " l1-50: {strategy: prune_l1, ratio: 0.5, lr: 0.01}}",
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


# --- report ----------------------------------------------------------------------------------


def machine() -> dict:
    """What the figures were measured on."""
    cpu = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE)
        cpu = names[0] if names else cpu
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "training_device": gpu or "cpu",
        "python": platform.python_version(),
    }


def machine_slug(info: dict) -> str:
    device = "cuda" if info["training_device"] != "cpu" else "cpu"
    cpu = re.sub(r"[^a-z0-9]+", "-", re.sub(r"\(R\)|\(TM\)|processor", "", info["cpu"], flags=re.I).lower())
    return f"{info['cores']}core-{cpu.strip('-')}-{device}"


def _ratio(base: float, value: float) -> str:
    return f"{base / value:.2f}x" if value else "-"


def contenders_table(rows: list[Contender]) -> str:
    """The comparison table; ratios say how many times smaller (params, FLOPs, size, latency) or
    faster (throughput) than the baseline."""
    base = rows[0]
    lines = [
        "| model | how | test acc % | drop (pts) | params | params / | FLOPs | FLOPs / | size (KB) | size / "
        "| latency b1 (ms) | latency / | throughput b64 (img/s) | throughput x |",
        "|" + "---|" * 14,
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.how} | {r.test_acc:.2f} | {base.test_acc - r.test_acc:+.2f} | {r.params:,} "
            f"| {_ratio(base.params, r.params)} | {r.flops:,} | {_ratio(base.flops, r.flops)} "
            f"| {r.size_bytes / 1024:,.0f} | {_ratio(base.size_bytes, r.size_bytes)} | {r.latency_ms:.3f} "
            f"| {_ratio(base.latency_ms, r.latency_ms)} | {r.throughput:,.0f} "
            f"| {_ratio(r.throughput, base.throughput)} |"
        )
    return "\n".join(lines)


def candidates_table(rows: list[dict], winner: str) -> str:
    """Every model the pipeline trained, as its evaluate stage measured them."""
    lines = [
        "| candidate | strategy | ratio | val acc % | test acc % | params | latency b1 (ms) |",
        "|" + "---|" * 7,
    ]
    for r in rows:
        mark = " (promoted)" if r["name"] == winner else ""
        lines.append(
            f"| {r['name']}{mark} | {r['strategy']} | {r['ratio']:.3f} | {r['val_acc']:.2f} "
            f"| {r['test_acc']:.2f} | {int(r['params']):,} | {r['latency_ms']:.3f} |"
        )
    return "\n".join(lines)


def targets(figures: Figures) -> list[tuple[str, bool]]:
    """The issue's targets as (line, passed); figures only, nothing is asserted."""
    base, seed, tp_peer, won = figures.contenders
    fewer, faster = base.params / won.params, base.latency_ms / won.latency_ms
    drop = base.test_acc - won.test_acc
    overhead = figures.efficiency["overhead"]["ratio"]
    speedup = figures.efficiency["speedup"]["speedup"]
    throughput = figures.efficiency["throughput"]["ratio"]

    def beats(peer: Contender) -> bool:
        return won.size_bytes < peer.size_bytes and won.test_acc >= peer.test_acc

    return [
        (f"promoted has >= 12x fewer params: {fewer:.2f}x", fewer >= 12),
        (f"promoted batch-1 latency >= 4x lower: {faster:.2f}x", faster >= 4),
        (f"promoted test accuracy drop <= 1.0 point: {drop:+.2f}", drop <= 1.0),
        ("promoted smaller than the seed's AdjustedNet at equal or better accuracy", beats(seed)),
        ("promoted smaller than plain torch-pruning at equal or better accuracy", beats(tp_peer)),
        (f"orchestration overhead <= 1.10: {overhead:.3f}", overhead <= 1.10),
        (f"shrink speed-up with 2 workers >= 1.6: {speedup:.2f}", speedup >= 1.6),
        (f"training throughput >= 0.9 of a bare loop: {throughput:.3f}", throughput >= 0.9),
    ]


def efficiency_table(eff: dict) -> str:
    over, speed, thr, dvc = eff["overhead"], eff["speedup"], eff["throughput"], eff["dvc"]
    work = ", ".join(f"{k} {v:.1f}" for k, v in over["work_s"].items())
    return "\n".join(
        [
            "| figure | value | how |",
            "|---|---|---|",
            f"| orchestration overhead | {over['ratio']:.3f} | flow wall {over['flow_s']:.1f} s / stage work "
            f"{sum(over['work_s'].values()):.1f} s ({work}) |",
            f"| shrink speed-up, 2 workers vs 1 | {speed['speedup']:.2f} | {speed['one_worker_s']:.1f} s -> "
            f"{speed['two_workers_s']:.1f} s on {', '.join(speed['candidates'])} "
            f"({speed['epochs']} epoch(s) each; best of {speed['repeats']}) |",
            f"| training throughput, engine.fit / bare loop | {thr['ratio']:.3f} "
            f"| {thr['engine_images_per_s']:.0f} vs {thr['bare_images_per_s']:.0f} images/s "
            f"({thr['epochs']} epoch(s), baseline model; best of {REPEATS}) |",
            f"| `dvc repro`, nothing changed | {dvc['nothing_changed_s']:.1f} s | digits, small params; "
            "first "
            f"repro {dvc['first_s']:.1f} s |",
        ]
    )


def render(figures: Figures) -> str:
    """The whole result file: setup, machine, both tables, efficiency and targets."""
    m, c = figures.machine, figures.config
    winner = figures.contenders[-1].name.removeprefix("shrinkflow: ")
    lines = [
        f"# Compression benchmark: {figures.setup}, {dt.date.today().isoformat()}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
        f"training on {m['training_device']}; latency and throughput on one CPU thread (medians).",
        "",
        f"Data: {c['data']}. Baseline: {c['model']}, {c['base_epochs']} epochs; every contender "
        f"fine-tuned/trained {c['tune_epochs']} epochs. Whole benchmark: "
        f"{figures.wall_seconds / 60:.1f} min.",
        "",
        contenders_table(figures.contenders),
        "",
        "Ratios: times smaller than the baseline (params, FLOPs, size, latency) or faster (throughput).",
        "",
        "Every candidate of the pipeline run:",
        "",
        candidates_table(figures.candidates, winner),
        "",
        efficiency_table(figures.efficiency),
        "",
        "Targets (reported, not asserted):",
        "",
        *[f"- {'PASS' if ok else 'FAIL'}: {line}" for line, ok in targets(figures)],
    ]
    return "\n".join(lines) + "\n"


# --- entry point -----------------------------------------------------------------------------


def isolate_tracking(tmp: Path) -> None:
    """MLflow and Prefect state of the benchmark go to ``tmp``, not to the project's stores."""
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    os.environ["PREFECT_HOME"] = str(tmp / "prefect")
    os.environ.pop("PREFECT_API_URL", None)
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


def unpack_cifar(tmp: Path) -> Path:
    """The CIFAR-10 JPEG tarball unpacked in a temporary directory (train/ and test/ trees)."""
    root = tmp / "cifar10"
    with tarfile.open(CIFAR_TARBALL) as archive:
        archive.extractall(root, filter="data")
    return root


def benchmark(setup: Setup, tmp: Path) -> Figures:
    """Run the flow, the peers and the efficiency measurements; return every figure."""
    start = time.perf_counter()
    project = tmp / "project"
    params_file = write_params(project, setup)
    params = load_params(params_file)
    log.info("running the flow (shrinkflow run) on %s", setup.name)
    flow_s = run_flow(params_file, project)
    log.info("flow done in %.1f s; timing the stages' own work", flow_s)
    layout = Layout.from_params(params, project)
    decision = json.loads(layout.promotion_json.read_text())
    work = stage_work_seconds(params, layout, tmp / "prepare-timing")
    figures = Figures(setup.name, machine(), describe(params, layout, setup.data))
    figures.candidates = [r for r in _table_rows(layout) if r["status"] == "ok"]
    log.info("measuring the contenders (fine-tuning the torch-pruning peer)")
    figures.contenders = contenders(params, layout, decision)
    log.info("shrink speed-up, training throughput, dvc repro")
    speedup = parallel_speedup(params, project, tmp, setup)
    figures.efficiency = {
        "overhead": {"flow_s": flow_s, "work_s": work, "ratio": flow_s / sum(work.values())},
        "speedup": speedup | {"candidates": list(setup.speedup_candidates), "epochs": setup.speedup_epochs},
        "throughput": training_throughput(params, layout, setup.throughput_epochs)
        | {"epochs": setup.throughput_epochs},
        "dvc": dvc_repro_seconds(tmp),
    }
    figures.wall_seconds = time.perf_counter() - start
    return figures


def _table_rows(layout: Layout) -> list[dict]:
    from tasks.evaluate import load_table

    return load_table(layout.candidates_csv).to_dict("records")


def describe(params: Params, layout: Layout, data: str) -> dict:
    from tasks.records import load_manifest

    manifest = load_manifest(layout)
    sizes = ", ".join(f"{k} {v:,}" for k, v in manifest.sizes.items())
    m = params.model
    return {
        "data": f"{data} ({'x'.join(map(str, manifest.input_shape))}; {sizes})",
        "model": f"{m.arch} channels {list(m.channels)}, hidden {list(m.hidden)}",
        "base_epochs": params.train.epochs,
        "tune_epochs": params.shrink.epochs,
        "candidates": list(params.shrink.candidates),
        "device": params.train.device,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.compress", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="digits, a few epochs (a smoke run, < 3 min)")
    parser.add_argument(
        "--train-samples", default="10000", help="CIFAR-10 training images, or 'all' (48,000)"
    )
    parser.add_argument("--base-epochs", type=int, default=10, help="the baseline's training budget")
    parser.add_argument("--tune-epochs", type=int, default=5, help="every contender's training budget")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the .md and .json results go")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    """Run the benchmark, print its Markdown and write it (and the raw JSON) under ``--out``."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="shrinkflow-bench-") as scratch:
        tmp = Path(scratch)
        isolate_tracking(tmp)
        if args.quick:
            setup = QUICK
        else:
            samples = None if args.train_samples == "all" else int(args.train_samples)
            setup = cifar_setup(unpack_cifar(tmp), samples, args.base_epochs, args.tune_epochs)
        figures = benchmark(setup, tmp)
    text = render(figures)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{dt.date.today().isoformat()}-{machine_slug(figures.machine)}-{figures.setup}"
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps(asdict(figures), indent=2, default=str) + "\n")
    return stem.with_suffix(".md")


if __name__ == "__main__":
    main()
