"""Compression benchmark: shrinkflow's promoted models against the seed's manual adjustment and
torch-pruning on real CIFAR-10, plus the pipeline's own efficiency figures.

    python -m benchmarks.compress [--setup cifar10|resnet56] [--quick] [--train-samples N|all]
                                  [--base-epochs N] [--tune-epochs N] [--out DIR] [--previous JSON]

Two setups, run separately: ``cifar10`` (the seed's BaseNet, whose parameters sit in fc1: low-rank
alone, pruning + low-rank allocated jointly under a params and a latency budget, the default
budget ladder, the best pruning-only recipe of 2026-12-01 and the seed's AdjustedNet) and
``resnet56`` (a network whose parameters sit in convolutions, on a reduced budget); ``--quick``
is a digits smoke run of the cifar10 setup's code. Every contender starts from the one baseline
the pipeline trains, gets the same fine-tuning budget in epochs and goes through the same
training loop (``shrinkflow.tasks.training.engine.fit``); every model is measured by
``shrinkflow.tasks.measurement.evaluate``'s own functions (latency single-threaded on the CPU). The flow
promotes by the setup's first objective; the promotion rule is applied again to the same table
for the others. torch-pruning peers are pruned to each promoted model's own size
(:mod:`benchmarks.contenders`). Results go to ``<out>/<date>-<machine>-<setup>.md`` (the tables,
the targets and every figure beside the previous run's), ``.json`` (raw figures) and
``-pareto.png`` (each method's front). Tracking (MLflow, Prefect) goes to a temporary directory.

How long each setup takes is worked out from measured rates by ``python -m benchmarks.estimate``
(the arithmetic and the figures are in docs/benchmarks.md); the defaults below were chosen from
it: the cifar10 setup keeps 2026-12-01's baseline (30 epochs on all 41,000 training images) and
fine-tunes every contender 15 epochs instead of 25, so that the new contenders fit 90 minutes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from benchmarks.contenders import PeerSpec, Roles, contenders
from benchmarks.efficiency import NONE, RUNNERS, Efficiency, measure_efficiency
from benchmarks.figures import Figures
from benchmarks.pareto import pareto_png
from benchmarks.report import machine, machine_slug, render
from benchmarks.targets import TARGETS
from shrinkflow.tasks.config import Params, apply_override, load_params
from shrinkflow.tasks.decision.decide import decide
from shrinkflow.tasks.layout import Layout
from shrinkflow.tasks.measurement.evaluate import load_predictions, load_table
from shrinkflow.tasks.records import load_manifest, load_record

REPO = Path(__file__).resolve().parents[1]
CIFAR_TARBALL = REPO.parent / "shared/data/cifar10-jpg.tar.gz"
RESULTS = REPO / "benchmarks/results"
log = logging.getLogger("benchmarks.compress")


@dataclass(frozen=True)
class Budget:
    """A setup's training budget: training images (None: all), baseline and fine-tuning epochs."""

    train_samples: int | None
    base_epochs: int
    tune_epochs: int


@dataclass(frozen=True)
class Setup:
    """One benchmark configuration: data, the pipeline's candidates (as params overrides), the
    objectives whose promoted models are compared (the flow promotes by the first), their
    torch-pruning peers, the efficiency figures, the targets and the run it is read beside."""

    name: str
    data: str  # what the data is, for the report
    overrides: tuple[str, ...]  # applied to the repository's params.yaml
    objectives: tuple[str, ...]
    peers: tuple[PeerSpec, ...]
    roles: Roles
    efficiency: Efficiency
    targets: str  # a key of benchmarks.targets.TARGETS
    minutes: float  # the time the whole run should fit
    previous: Path | None = None  # an earlier run's JSON, read beside this one


KD = "distill: {temperature: 4.0, alpha: 0.7}"
# Low-rank alone on BaseNet: fc1 (8.19 M of the 8.28 M params) by SVD at rank 64, and the same
# with conv2 (most of the FLOPs) by Tucker-2 at half its channel ranks
# (benchmarks/results/lowrank-layers-2026-12-07.md: 13.9x and 2.6x smaller layers).
LOWRANK = "strategy: lowrank, lr: 0.01"
# What 2026-12-01 ran and this run leaves out: l1-75-kd (3.3 points down at 25 epochs, and
# torch-pruning's uniform peer is the same prune), the alloc-* width-only budgets and their
# budget search (the joint allocation and the ladder allocate widths with ranks), and int8 (never
# the fastest at batch 1 here, and not smaller in params).
CANDIDATES_CIFAR = (
    "{width-50: {strategy: width, ratio: 0.5},"
    f" l1-50-kd: {{strategy: prune_l1, ratio: 0.5, lr: 0.01, {KD}}},"
    f" lowrank-fc64-kd: {{{LOWRANK}, ranks: {{classifier.1: 64}}, {KD}}},"
    f" lowrank-fc64-conv-kd: {{{LOWRANK}, ranks: {{classifier.1: 64, features.3: [32, 64]}}, {KD}}}}}"
)
PEERS_BASENET = (
    PeerSpec("params", "params"),
    PeerSpec("params", "params", global_pruning=True),
    PeerSpec("params", "latency_ms"),
    PeerSpec("params", "latency_ms", global_pruning=True),
    PeerSpec("FLOPs", "latency_ms"),
)
PREVIOUS_CIFAR = RESULTS / "2026-12-01-2core-amd-epyc-cpu-cifar10.json"
DEFAULTS = {"cifar10": Budget(None, 30, 15), "resnet56": Budget(10_000, 15, 8)}


def cifar_overrides(data_root: Path, budget: Budget, val_fraction: float) -> tuple[str, ...]:
    """CIFAR-10 from the JPEG folder with random crop and flip: of the 50,000 training images
    ``val_fraction`` validate and 7,500 (15%) form the gate, enough to certify a 1-point tolerance
    for a model that disagrees with the baseline on up to ~10% of images; the full 10,000-image
    test split vetoes and reports."""
    samples = "null" if budget.train_samples is None else budget.train_samples
    return (
        "data.source=imagefolder",
        f"data.root={data_root}",
        f"data.val_fraction={val_fraction}",
        "data.gate_fraction=0.15",
        "data.augment=crop_flip",
        "promote.tolerance=1.0",
        "promote.champion_tolerance=1.0",
        f"data.max_train_samples={samples}",
        f"train.epochs={budget.base_epochs}",
        f"shrink.epochs={budget.tune_epochs}",
        "evaluate.latency_repeats=100",
        # Candidates train for minutes each: processes sidestep the GIL that held two threads
        # to 1.37x (2026-11-29), and their start-up is seconds.
        "shrink.runner=process",
    )


def cifar_setup(data_root: Path, budget: Budget) -> Setup:
    """The seed's BaseNet (64/128 channels, 1000 hidden) on 32x32 CIFAR-10."""
    return Setup(
        name="cifar10",
        data=f"CIFAR-10 JPEGs ({CIFAR_TARBALL.name}, unpacked to a temporary directory)",
        overrides=(
            *cifar_overrides(data_root, budget, 0.03),
            "model.channels=[64, 128]",
            "model.hidden=[1000]",
            f"shrink.candidates={CANDIDATES_CIFAR}",
            "promote.model_name=shrinkflow-bench-cifar10",
        ),
        objectives=("latency_ms", "params"),
        peers=PEERS_BASENET,
        roles=Roles(adjusted="width-50", reference="l1-50-kd"),
        # One runner for the fan-out figure (the one the flow uses): the three of 2026-12-01 agreed
        # within 0.1 and cost 10 minutes.
        efficiency=Efficiency(
            speedup_runners=("process",), speedup_candidates=("l1-50-kd", "lowrank-fc64-kd")
        ),
        targets="basenet",
        minutes=90,
        previous=PREVIOUS_CIFAR,
    )


CANDIDATES_RESNET = (
    f"{{l1-50-kd: {{strategy: prune_l1, ratio: 0.5, lr: 0.01, {KD}}},"
    f" l1-30-kd: {{strategy: prune_l1, ratio: 0.3, lr: 0.01, {KD}}},"
    f" lowrank-50-kd: {{{LOWRANK}, ratio: 0.5, {KD}}}}}"
)


def resnet56_setup(data_root: Path, budget: Budget) -> Setup:
    """The CIFAR ResNet-56 (0.86 M params, nearly all in 3x3 convolutions) on a reduced budget:
    1% of the images validate (each epoch predicts them with a 56-layer network); promoted by
    FLOPs, against torch-pruning uniform and global at the same FLOPs."""
    return Setup(
        name="cifar10-resnet56",
        data=f"CIFAR-10 JPEGs ({CIFAR_TARBALL.name}, unpacked to a temporary directory)",
        overrides=(
            *cifar_overrides(data_root, budget, 0.01),
            "model={arch: resnet56}",
            f"shrink.candidates={CANDIDATES_RESNET}",
            "promote.model_name=shrinkflow-bench-resnet56",
        ),
        objectives=("flops", "latency_ms"),
        peers=(PeerSpec("FLOPs", "flops"), PeerSpec("FLOPs", "flops", global_pruning=True)),
        roles=Roles(adjusted=None, reference="l1-50-kd"),
        efficiency=NONE,
        targets="conv",
        minutes=45,
    )


SETUPS = {"cifar10": cifar_setup, "resnet56": resnet56_setup}

# The smoke run of the cifar10 setup's code on digits: every kind of contender, every figure.
CANDIDATES_QUICK = (
    "{width-50: {strategy: width, ratio: 0.5}, l1-50: {strategy: prune_l1, ratio: 0.5, lr: 0.01},"
    " lowrank-50: {strategy: lowrank, ratio: 0.5, lr: 0.01},"
    f" alloc-p25: {{strategy: prune_l1, lr: 0.01, allocation: sensitivity,"
    f" budget: {{objective: params, keep: 0.25}}, {KD}}}}}"
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
    objectives=("latency_ms", "params"),
    peers=PEERS_BASENET,
    roles=Roles(adjusted="width-50", reference="l1-50"),
    efficiency=Efficiency(
        speedup_runners=RUNNERS, speedup_candidates=("width-50", "l1-50"), speedup_epochs=2
    ),
    targets="basenet",
    minutes=15,
)
# What every setup shares: an absolute tolerance and two shrink workers.
COMMON = ("promote.tolerance_mode=absolute", "shrink.workers=2", "seed=0")


# --- the run ---------------------------------------------------------------------------------


def write_params(root: Path, setup: Setup) -> Path:
    """The benchmark's params.yaml: the repository's, with the setup's overrides."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for item in (*setup.overrides, f"promote.objective={setup.objectives[0]}", *COMMON):
        raw = apply_override(raw, item)
    root.mkdir(parents=True, exist_ok=True)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def setup_params(name: str) -> tuple[Setup, Params]:
    """Setup ``name`` at its default budget and the params it runs (the data need not be there)."""
    setup = SETUPS[name](Path(tempfile.gettempdir()) / "cifar10", DEFAULTS[name])
    with tempfile.TemporaryDirectory() as scratch:
        return setup, load_params(write_params(Path(scratch), setup))


def run_flow(params_file: Path, root: Path) -> float:
    """The whole Prefect flow once, as a user runs it (``shrinkflow run``), in its own process:
    Prefect's background threads and temporary server then never compete with the measurements
    that follow. Returns its wall time (interpreter and Prefect server start included: both are
    orchestration)."""
    shrinkflow = Path(sys.executable).parent / "shrinkflow"
    command = [str(shrinkflow), "run", "-p", str(params_file), "--root", str(root)]
    start = time.perf_counter()
    with open(root / "flow.log", "w") as out:
        done = subprocess.run(command, cwd=root, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(
            f"shrinkflow run failed; its output ends:\n{(root / 'flow.log').read_text()[-3000:]}"
        )
    return seconds


def decisions(params: Params, layout: Layout, objectives: tuple[str, ...]) -> dict[str, dict]:
    """The promotion rule on the flow's table under each objective (the flow's own decision is
    the first objective's): the winner, why, and the models it certified."""
    table, predictions = load_table(layout.candidates_csv), load_predictions(layout.predictions_csv)
    out = {}
    for objective in objectives:
        verdict = decide(table, predictions, params.promote.model_copy(update={"objective": objective}))
        out[objective] = {
            "winner": verdict.winner,
            "reason": verdict.reason,
            "eligible": list(verdict.eligible),
        }
    flow = json.loads(layout.promotion_json.read_text())["winner"]
    if flow != out[objectives[0]]["winner"]:
        log.warning("the flow promoted %s, the same rule here %s", flow, out[objectives[0]]["winner"])
    return out


def pipeline_rows(params: Params, layout: Layout, eligible: list[str]) -> list[dict]:
    """Every model the flow measured (ok status), with whether it was certified and its shape as
    evaluate's ``widths`` column gives it: kept channels per group and each factorised layer's
    rank (``classifier.1=750r96``; a structured candidate's, read off the model if not allocated)."""
    table = load_table(layout.candidates_csv)
    rows = table[table["status"] == "ok"].to_dict("records")
    for row in rows:
        row["eligible"] = row["name"] in eligible
        shape = row.get("widths")
        row["widths"] = shape if isinstance(shape, str) and shape and row["name"] != "baseline" else None
    return rows


def benchmark(setup: Setup, tmp: Path) -> Figures:
    """Run the flow, the peers and the efficiency measurements; return every figure."""
    start = time.perf_counter()
    project = tmp / "project"
    params_file = write_params(project, setup)
    params = load_params(params_file)
    log.info("running the flow (shrinkflow run) on %s", setup.name)
    flow_s = run_flow(params_file, project)
    log.info("flow done in %.1f s", flow_s)
    layout = Layout.from_params(params, project)
    figures = Figures(setup.name, machine(), describe(params, layout, setup.data))
    figures.decisions = decisions(params, layout, setup.objectives)
    figures.candidates = pipeline_rows(params, layout, figures.decisions[setup.objectives[0]]["eligible"])
    log.info("measuring the contenders (fine-tuning the torch-pruning peers)")
    winners = {objective: d["winner"] for objective, d in figures.decisions.items()}
    figures.contenders, figures.gaps = contenders(
        params, layout, params_file, winners, setup.peers, setup.roles
    )
    log.info("efficiency figures: %s", setup.efficiency)
    figures.efficiency = measure_efficiency(setup.efficiency, params_file, params, project, tmp, flow_s)
    figures.wall_seconds = time.perf_counter() - start
    return figures


def describe(params: Params, layout: Layout, data: str) -> dict:
    manifest = load_manifest(layout)
    sizes = ", ".join(f"{k} {v:,}" for k, v in manifest.sizes.items())
    m = params.model.model_dump(exclude_defaults=False)
    return {
        "data": f"{data} ({'x'.join(map(str, manifest.input_shape))}; {sizes})",
        "model": ", ".join(f"{k} {v}" for k, v in m.items()),
        "augment": params.data.augment,
        "precision": load_record(layout, "baseline").precision,
        # The baseline's validation accuracy along training: is it near its plateau?
        "baseline_val_curve": {
            int(row["epoch"]): row["val_acc"]
            for row in load_record(layout, "baseline").history
            if row["epoch"] % 5 == 0 or row["epoch"] == 1
        },
        "base_epochs": params.train.epochs,
        "tune_epochs": params.shrink.epochs,
        "tolerance": params.promote.tolerance,
        "gate_images": manifest.sizes["gate"],
        "test_images": manifest.sizes["test"],
        "candidates": list(params.shrink.candidates),
        "device": params.train.device,
    }


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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.compress", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--setup", choices=sorted(SETUPS), default="cifar10", help="which network")
    parser.add_argument("--quick", action="store_true", help="digits, a few epochs (a smoke run)")
    parser.add_argument(
        "--train-samples", help="CIFAR-10 training images, or 'all' (41,000 after val and gate)"
    )
    parser.add_argument("--base-epochs", type=int, help="the baseline's training budget")
    parser.add_argument("--tune-epochs", type=int, help="every contender's training budget")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the .md and .json results go")
    parser.add_argument(
        "--previous", type=Path, help="an earlier run's JSON to read beside (default: the setup's)"
    )
    return parser.parse_args(argv)


def budget_of(args: argparse.Namespace) -> Budget:
    """The setup's default budget with the options given on the command line."""
    default = DEFAULTS[args.setup]
    samples = default.train_samples if args.train_samples is None else args.train_samples
    return Budget(
        None if samples in (None, "all") else int(samples),
        args.base_epochs or default.base_epochs,
        args.tune_epochs or default.tune_epochs,
    )


def write_results(figures: Figures, setup: Setup, out: Path, previous: Path | None) -> Path:
    """The Markdown (printed too), the JSON and the Pareto plot under ``out``."""
    raw = json.loads(json.dumps(asdict(figures), default=str))
    before = (previous.stem, raw, json.loads(previous.read_text())) if previous else None
    text = render(figures, TARGETS[setup.targets](figures, setup.minutes), before)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{dt.date.today().isoformat()}-{machine_slug(figures.machine)}-{figures.setup}"
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps(raw, indent=2) + "\n")
    pareto_png(figures, stem.with_name(stem.name + "-pareto.png"))
    return stem.with_suffix(".md")


def main(argv: list[str] | None = None) -> Path:
    """Run the benchmark, print its Markdown and write it (and the raw JSON) under ``--out``."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="shrinkflow-bench-") as scratch:
        tmp = Path(scratch)
        isolate_tracking(tmp)
        setup = QUICK if args.quick else SETUPS[args.setup](unpack_cifar(tmp), budget_of(args))
        figures = benchmark(setup, tmp)
    return write_results(figures, setup, args.out, args.previous or setup.previous)


if __name__ == "__main__":
    main()
