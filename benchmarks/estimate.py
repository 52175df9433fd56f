"""How long each compression benchmark setup takes on a quiet 2-core machine, worked out from
rates measured here, before spending 90 minutes on it.

    python -m benchmarks.estimate [--setup cifar10 resnet56] [--images 4096]

Measured (on random images of CIFAR's shape: the cost of a step does not depend on the pixels):
images per second of ``engine.fit`` (one epoch with crop+flip and validation on the setup's
share of validation images) for every model shape a setup trains (the baseline, each candidate,
a torch-pruning peer), in CPU time at one thread and in wall time at one and two threads; the
CPU seconds of evaluate's measurement of each shape (predictions on every split, the latency
timers, the ONNX export and its parity check), of the sensitivity tables and of one
torch-pruning prune. On a machine shared with other work the wall rates say little (two threads
under load ran at a sixth of one thread's rate), so the estimate uses the one-thread CPU-time
rates, turned into quiet wall seconds by three factors calibrated on 2026-12-01's quiet run
(:data:`benchmarks.compress.PREVIOUS_CIFAR`), whose models are measured here too:

- two threads (the baseline): its recorded 994 s over its predicted one-thread CPU seconds;
- a shrink worker (two side by side on two cores): the recorded shrink makespan (3,108 s) over
  the makespan of that run's candidates predicted from their CPU rates;
- evaluate: the recorded 102 s over the predicted CPU seconds of its 8 models.

A candidate whose widths are allocated (a budget, a ladder rung) is costed at a shape that keeps
BaseNet's convolutions whole and fc1 at a tenth (ResNet-56: the whole network), distilled: at a
10% params budget 2026-12-01's allocations kept both convolutions whole, so this bounds them from
above. Peers are costed as the 50% uniform prune, plainly fine-tuned, one per ``PeerSpec``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from benchmarks.compress import PREVIOUS_CIFAR, SETUPS, Setup, setup_params
from benchmarks.contenders import torch_pruning_peer
from benchmarks.efficiency import REPEATS, THROUGHPUT_IMAGES, makespan
from shrinkflow.models import apply_strategy, build_model, model_spec
from shrinkflow.tasks.config import Params
from shrinkflow.tasks.measurement.evaluate import measure, onnx_columns
from shrinkflow.tasks.training.engine import Hooks, distillation_loss, fit
from shrinkflow.tasks.training.sensitivity import measure as sensitivity_table
from shrinkflow.tasks.training.train import seeded

CIFAR_TRAIN, CIFAR_TEST, GATE_FRACTION = 50_000, 10_000, 0.15
PREPARE_S = 29.2  # 2026-12-01's prepare of the CIFAR-10 JPEGs (the same work in every setup)
UNPACK_S = 10.0  # the tarball into a temporary directory
DVC_S = 52.7  # 2026-12-01's two dvc repro runs (digits: the same in every setup)
POOL_START_S = 5.0  # a spawned 2-worker pool up with its imports (4.6 s on 2026-12-01)
FLOW_FIXED_S = 30.0  # the flow's own start: interpreter, Prefect's temporary server, MLflow
FLOW_SHARE = 0.05  # orchestration on top of the stages' work (the 1.10 target allows twice this)
SEARCH_STEPS = 12  # bisection steps of one peer's ratio (to within 1%: 7-10 seen)


@dataclass(frozen=True)
class Rate:
    """One model shape: training images/s in CPU time at one thread (what the estimate uses) and
    in wall time at one and two threads (what this machine's load left), and the CPU seconds of
    evaluate's measurement of it: a fixed part and a part per image predicted."""

    cpu_1t: float
    wall_1t: float
    wall_2t: float
    evaluate_fixed_s: float
    evaluate_image_s: float

    def evaluate_s(self, images: int) -> float:
        """CPU seconds of measuring the model on ``images`` images."""
        return self.evaluate_fixed_s + self.evaluate_image_s * images


@dataclass(frozen=True)
class Splits:
    """How many images a setup's splits hold."""

    train: int
    val: int
    gate: int
    test: int

    @classmethod
    def of(cls, params: Params) -> Splits:
        val, gate = round(CIFAR_TRAIN * params.data.val_fraction), round(CIFAR_TRAIN * GATE_FRACTION)
        train = params.data.max_train_samples or CIFAR_TRAIN - val - gate
        return cls(train, val, gate, CIFAR_TEST)


def random_images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, 32, 32, generator=generator), torch.randint(0, 10, (n,), generator=generator)


def _fit_seconds(
    model: nn.Module, train, val, params: Params, hooks: Hooks, threads: int
) -> tuple[float, float]:
    torch.set_num_threads(threads)
    start, cpu = time.perf_counter(), time.process_time()
    fit(
        copy.deepcopy(model), train, val, params.train.model_copy(update={"epochs": 1}), 0, "crop_flip", hooks
    )
    return time.process_time() - cpu, time.perf_counter() - start


def measure_rate(model: nn.Module, teacher: nn.Module | None, params: Params, n: int, splits: Splits) -> Rate:
    """``model``'s training rates on ``n`` random images (``n // 4`` at two threads, which a loaded
    machine slows most), validation on its share of them, and its evaluate cost."""
    train, val = random_images(n), random_images(max(n * splits.val // splits.train, 32))
    hooks = Hooks(loss=distillation_loss(teacher, 4.0, 0.7)) if teacher is not None else Hooks()
    cpu, wall_1t = _fit_seconds(model, train, val, params, hooks, 1)
    quarter = (train[0][: n // 4], train[1][: n // 4])
    _, wall_2t = _fit_seconds(model, quarter, (val[0][: n // 16], val[1][: n // 16]), params, hooks, 2)
    torch.set_num_threads(1)
    return Rate(n / cpu, n / wall_1t, n // 4 / wall_2t, *evaluate_cpu_s(model, params, splits))


def _evaluate_cpu(model: nn.Module, params: Params, sizes: dict[str, int]) -> float:
    sized = {split: random_images(n) for split, n in sizes.items()}
    with tempfile.TemporaryDirectory() as scratch:
        return cpu_seconds(
            lambda: (
                measure(model, sized, params.evaluate),
                onnx_columns(model, sized["test"], params.evaluate, Path(scratch) / "m.onnx"),
            )
        )


def evaluate_cpu_s(model: nn.Module, params: Params, splits: Splits, share: int = 8) -> tuple[float, float]:
    """CPU seconds of evaluate's measurement of ``model`` (predictions on val, gate and test, the
    latency timers, the ONNX export and its parity check), fixed and per image: measured on
    64-image splits and on ``1 / share`` of the setup's images, the line through the two."""
    sizes = {"val": splits.val, "gate": splits.gate, "test": splits.test}
    tiny = _evaluate_cpu(model, params, dict.fromkeys(sizes, 64))
    part = _evaluate_cpu(model, params, {k: max(v // share, 64) for k, v in sizes.items()})
    per_image = max(part - tiny, 0.0) / max(sum(sizes.values()) / share - 3 * 64, 1)
    return max(tiny - 3 * 64 * per_image, 0.0), per_image


def cpu_seconds(work: Callable[[], object]) -> float:
    start = time.process_time()
    work()
    return time.process_time() - start


def baseline_of(params: Params) -> nn.Module:
    spec = {"in_channels": 3, "image_size": 32, "num_classes": 10, **params.model.arch_options()}
    with seeded(params.seed):
        return build_model(spec)


def allocated_shape(base: nn.Module, calibration) -> nn.Module:
    """A budget candidate's representative shape (see the module's docstring)."""
    if type(base).__name__ != "BaseNet":
        return base
    return apply_strategy(
        "prune_l1",
        copy.deepcopy(base),
        calibration,
        widths={"features.0": 64, "features.3": 128, "classifier.1": 100},
    )


def candidate_shape(params: Params, name: str, base: nn.Module, calibration) -> nn.Module | None:
    """The network candidate ``name`` trains (None: it does not train)."""
    cand = params.shrink.candidates[name]
    if cand.strategy == "int8":
        return None
    if getattr(cand, "budget", None) is not None:
        return allocated_shape(base, calibration)
    options = {k: v for k, v in cand.options().items() if k in ("ratio", "ranks", "energy") and v is not None}
    return apply_strategy(cand.strategy, copy.deepcopy(base), calibration, **options)


@dataclass(frozen=True)
class Factors:
    """Quiet wall seconds per one-thread CPU second, from 2026-12-01 (see the module docstring)."""

    two_threads: float
    worker: float
    evaluate: float


@dataclass
class Shapes:
    """The shapes of one network measured so far (by their spec and whether they are distilled:
    a shape is measured once, under the first name it was asked for), and what measuring needs."""

    params: Params
    splits: Splits
    n: int
    base: nn.Module
    rates: dict[str, Rate]  # by the first name a shape was asked for
    names: dict[str, str]  # shape key -> that name

    @classmethod
    def of(cls, params: Params, n: int) -> Shapes:
        return cls(params, Splits.of(params), n, baseline_of(params), {}, {})

    @property
    def calibration(self) -> tuple[torch.Tensor, torch.Tensor]:
        return random_images(256)

    def rate(self, name: str, model: nn.Module, distilled: bool) -> Rate:
        key = json.dumps([model_spec(model), distilled], sort_keys=True)
        if key not in self.names:
            self.names[key] = name
            self.rates[name] = measure_rate(
                model, self.base if distilled else None, self.params, self.n, self.splits
            )
        return self.rates[self.names[key]]

    def epoch_cpu_s(self, name: str, model: nn.Module, distilled: bool) -> float:
        """One-thread CPU seconds of one epoch over the setup's training images."""
        return self.splits.train / self.rate(name, model, distilled).cpu_1t


def calibrate(n: int) -> tuple[Factors, Shapes]:
    """The factors, from 2026-12-01's recorded times and its models measured here."""
    raw = json.loads(PREVIOUS_CIFAR.read_text())
    _, params = setup_params("cifar10")
    shapes = Shapes.of(params, n)
    base_epochs, tune_epochs = raw["config"]["base_epochs"], raw["config"]["tune_epochs"]
    baseline_cpu = base_epochs * shapes.epoch_cpu_s("baseline", shapes.base, False)
    everything = shapes.splits.val + shapes.splits.gate + shapes.splits.test
    jobs, evaluated = [], [shapes.rates["baseline"].evaluate_s(everything)]
    for row in raw["candidates"]:
        if row["name"] == "baseline" or row["strategy"] == "int8":
            continue
        how = {"widths": row["widths"]} if row["widths"] else {"ratio": row["ratio"]}
        model = apply_strategy(row["strategy"], copy.deepcopy(shapes.base), shapes.calibration, **how)
        distilled = "distill" in row["composition"]
        jobs.append(tune_epochs * shapes.epoch_cpu_s(row["name"], model, distilled))
        evaluated.append(shapes.rate(row["name"], model, distilled).evaluate_s(everything))
    work = raw["efficiency"]["overhead"]["work_s"]
    # int8 is not measured here: the other models' mean stands in for it
    evaluate_cpu = sum(evaluated) * len(raw["candidates"]) / len(evaluated)
    factors = Factors(
        two_threads=work["baseline_train"] / baseline_cpu,
        worker=work["shrink_train"] / makespan(jobs, 2),
        evaluate=work["evaluate"] / evaluate_cpu,
    )
    return factors, shapes


def sensitivity_cpu_s(shapes: Shapes, strategy: str, ratios: tuple[float, ...]) -> float:
    """CPU seconds of ``strategy``'s sensitivity table of the baseline (the stage's own work)."""
    val = random_images(shapes.splits.val)
    return cpu_seconds(
        lambda: sensitivity_table(shapes.base, strategy, shapes.calibration, val, tuple(ratios))
    )


Phase = tuple[str, float, str]  # what, quiet wall seconds, the arithmetic


def candidate_phases(
    setup: Setup, params: Params, shapes: Shapes, f: Factors
) -> tuple[list[Phase], list[Rate]]:
    """Baseline, sensitivity, shrink and evaluate; and the rates of the models evaluated."""
    epochs, base_epochs = params.shrink.epochs, params.train.epochs
    base_s = base_epochs * shapes.epoch_cpu_s("baseline", shapes.base, False) * f.two_threads
    jobs, evaluated = {}, [shapes.rate("baseline", shapes.base, False)]
    for name, cand in params.shrink.candidates.items():
        model = candidate_shape(params, name, shapes.base, shapes.calibration)
        if model is None:
            continue
        distilled = cand.distill is not None
        jobs[name] = (cand.epochs or epochs) * shapes.epoch_cpu_s(name, model, distilled) * f.worker
        evaluated.append(shapes.rate(name, model, distilled))
    splits = shapes.splits
    evaluate = sum(r.evaluate_s(splits.val + splits.gate + splits.test) for r in evaluated) * f.evaluate
    tables = params.shrink.sensitivity_tables()
    sensitivity = sum(sensitivity_cpu_s(shapes, s, ratios) for s, ratios in tables.items()) * f.worker
    shrink = makespan(list(jobs.values()), params.shrink.workers)
    return [
        ("baseline", base_s, f"{base_epochs} epochs x {shapes.splits.train:,} images, 2 threads"),
        ("sensitivity", sensitivity, f"tables: {', '.join(sorted(tables)) or 'none'}, one thread"),
        (
            "shrink",
            shrink,
            f"{len(jobs)} candidates x {epochs} epochs on 2 workers: "
            + ", ".join(f"{n} {s:.0f} s" for n, s in jobs.items()),
        ),
        ("evaluate", evaluate, f"{len(evaluated)} models on val, gate and test"),
    ], evaluated


def contender_phases(
    setup: Setup, params: Params, shapes: Shapes, f: Factors, evaluated: list[Rate]
) -> list[Phase]:
    """The peers (their ratio bisection and fine-tuning side by side) and every contender measured."""
    peer = apply_strategy("prune_l1", copy.deepcopy(shapes.base), shapes.calibration, ratio=0.5)
    epoch = shapes.epoch_cpu_s("peer (50% uniform, plain)", peer, False)
    example = shapes.calibration[0][:1]
    prune = cpu_seconds(lambda: torch_pruning_peer(shapes.base, example, 10, 0.5, True))
    peers = len(setup.peers)
    tuned = makespan([params.shrink.epochs * epoch * f.worker] * peers, params.shrink.workers)
    rows = 1 + sum(r is not None for r in (setup.roles.adjusted, setup.roles.reference)) + peers
    rows += len(setup.objectives)
    one = sum(r.evaluate_s(shapes.splits.test) for r in evaluated) / len(evaluated) * f.evaluate
    return [
        ("peers: ratio bisection", peers * SEARCH_STEPS * prune, f"{peers} peers x {SEARCH_STEPS} prunes"),
        (
            "peers: fine-tuning",
            tuned + POOL_START_S,
            f"{peers} peers x {params.shrink.epochs} epochs on 2 single-thread workers",
        ),
        ("contenders measured", rows * one, f"{rows} models on test, at the pipeline models' mean"),
    ]


def efficiency_phases(
    setup: Setup, params: Params, shapes: Shapes, f: Factors, done: list[Phase]
) -> list[Phase]:
    """The efficiency figures the setup measures."""
    eff, seconds = setup.efficiency, {name: s for name, s, _ in done}
    out: list[Phase] = []
    if eff.overhead:
        again = PREPARE_S + seconds["sensitivity"] + seconds["evaluate"]
        out.append(("overhead: prepare, sensitivity, evaluate again", again, "as the flow ran them"))
    if eff.speedup_runners:
        epoch = [
            eff.speedup_epochs
            * shapes.epoch_cpu_s(n, candidate_shape(params, n, shapes.base, shapes.calibration), True)
            * f.worker
            for n in eff.speedup_candidates
        ]
        per_runner = POOL_START_S + REPEATS * (sum(epoch) + makespan(epoch, 2))
        how = f"{', '.join(eff.speedup_runners)}: {REPEATS} x (1, then 2 workers)"
        out.append(("fan-out scaling", len(eff.speedup_runners) * per_runner, how))
    if eff.throughput_epochs:
        epoch = THROUGHPUT_IMAGES / shapes.rates["baseline"].cpu_1t * f.two_threads
        out.append(("training throughput", 3 * REPEATS * eff.throughput_epochs * epoch, "3 loops, best of 2"))
    if eff.dvc:
        out.append(("dvc repro twice", DVC_S, "2026-12-01's"))
    return out


def estimate(name: str, f: Factors, shapes: Shapes) -> list[Phase]:
    """Setup ``name``'s phases at its default budget, in quiet wall seconds (``shapes``: its
    network's shapes, with what is measured already)."""
    setup, params = setup_params(name)
    shapes.params, shapes.splits = params, Splits.of(params)
    phases: list[Phase] = [("unpack, prepare", UNPACK_S + PREPARE_S, "2026-12-01's prepare")]
    trained, evaluated = candidate_phases(setup, params, shapes, f)
    phases += trained
    work = sum(s for _, s, _ in phases)
    orchestration = FLOW_FIXED_S + FLOW_SHARE * work
    phases.append(("flow orchestration", orchestration, f"{FLOW_FIXED_S:g} s + {FLOW_SHARE:.0%} of the work"))
    phases += contender_phases(setup, params, shapes, f, evaluated)
    phases += efficiency_phases(setup, params, shapes, f, phases)
    return phases


def rates_table(shapes: Shapes) -> str:
    lines = [
        "| shape | images/CPU-s, 1 thread | images/s wall, 1 thread | images/s wall, 2 threads "
        "| evaluate CPU s: fixed, per 1,000 images |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {r.cpu_1t:,.0f} | {r.wall_1t:,.0f} | {r.wall_2t:,.0f} "
        f"| {r.evaluate_fixed_s:.1f}, {1000 * r.evaluate_image_s:.2f} |"
        for name, r in shapes.rates.items()
    ]
    return "\n".join(lines)


def plan_table(name: str, phases: list[Phase], minutes: float) -> str:
    total = sum(s for _, s, _ in phases)
    lines = [f"| {name} phase | seconds | how |", "|---|---|---|"]
    lines += [f"| {what} | {s:,.0f} | {how} |" for what, s, how in phases]
    lines.append(f"| **total** | **{total:,.0f}** ({total / 60:.1f} min; target {minutes:g}) | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.estimate", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--setup", nargs="+", choices=sorted(SETUPS), default=sorted(SETUPS))
    parser.add_argument("--images", type=int, default=4096, help="random images per timed BaseNet epoch")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"Load average at the start: {os.getloadavg()[0]:.1f} ({os.cpu_count()} cores).\n")
    factors, basenet = calibrate(args.images)
    print(f"Quiet wall s per 1-thread CPU s: {factors}\n")
    by_arch = {basenet.params.model.arch: basenet}
    for name in args.setup:
        setup, params = setup_params(name)
        arch = params.model.arch
        # ResNet-56 trains ~3x slower per image: a quarter of the images times as long
        shapes = by_arch.setdefault(arch, Shapes.of(params, args.images // 4))
        print(plan_table(name, estimate(name, factors, shapes), setup.minutes) + "\n")
    for arch, shapes in by_arch.items():
        print(f"{arch}:\n\n{rates_table(shapes)}\n")
    print(f"Load average at the end: {os.getloadavg()[0]:.1f}.")


if __name__ == "__main__":
    main()
