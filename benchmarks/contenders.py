"""The comparison table's models: the baseline, the seed's AdjustedNet, the reference recipe and
the promoted models, all from the pipeline's own run, and torch-pruning peers pruned from the same
baseline to the promoted models' own size (parameter count or FLOPs), fine-tuned with the same
recipe and budget, every model measured by ``shrinkflow.tasks.measurement.evaluate``'s functions.

The peers are fine-tuned side by side, one per single-thread worker process (as the pipeline runs
its candidates with ``shrink.runner: process``): on two cores that is about 1.6x faster than one
after another on two threads (the fan-out figure of 2026-12-01)."""

from __future__ import annotations

import copy
import logging
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from benchmarks.figures import Contender, Gap, peer_name, promoted_name, wilson
from shrinkflow.models.checkpoint import load_checkpoint
from shrinkflow.models.quantize import dense_twin
from shrinkflow.tasks.config import Params, load_params
from shrinkflow.tasks.data.prepare import load_split
from shrinkflow.tasks.decision.stats import compare
from shrinkflow.tasks.layout import Layout
from shrinkflow.tasks.measurement.evaluate import count_flops, latency_ms, serialized_size
from shrinkflow.tasks.training.engine import Split, accuracy, fit, predict
from shrinkflow.tasks.training.train import candidate_train_config

THROUGHPUT_BATCH = 64
GLOBAL_STEPS = 5  # torch-pruning's progressive global recipe: re-score the survivors this often
log = logging.getLogger("benchmarks.compress")


@dataclass(frozen=True)
class PeerSpec:
    """A torch-pruning peer: pruned to the ``measure`` (``params`` or ``FLOPs``) of the model
    promoted by ``objective``, uniformly or (``global_pruning``) ranked across layers."""

    measure: str
    objective: str
    global_pruning: bool = False

    @property
    def kind(self) -> str:
        return "global" if self.global_pruning else "uniform"


@dataclass(frozen=True)
class Roles:
    """Which pipeline candidates the table shows beside the promoted models: the seed's manual
    adjustment and the reference recipe (each optional)."""

    adjusted: str | None = "width-50"
    reference: str | None = None


def torch_pruning_peer(
    baseline: nn.Module, example: torch.Tensor, num_classes: int, ratio: float, global_pruning: bool = False
) -> nn.Module:
    """torch-pruning used as its README shows: group L1 magnitude pruning of every prunable layer
    but the final classifier, at ``ratio``: one-shot and uniform, or (``global_pruning``) ranked
    across layers in its progressive recipe, ``GLOBAL_STEPS`` steps re-scoring the survivors."""
    import torch_pruning as tp

    model = copy.deepcopy(baseline)
    ignored = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    steps = GLOBAL_STEPS if global_pruning else 1
    pruner = tp.pruner.MetaPruner(
        model,
        example,
        importance=tp.importance.GroupMagnitudeImportance(p=1),
        pruning_ratio=ratio,
        ignored_layers=ignored,
        global_pruning=global_pruning,
        iterative_steps=steps,
    )
    for _ in range(steps):
        pruner.step()
    return model


def ratio_for(
    baseline: nn.Module,
    example: torch.Tensor,
    num_classes: int,
    target: int,
    count: Callable[[nn.Module], int],
    global_pruning: bool = False,
) -> float:
    """The torch-pruning ratio whose pruned network has (to within 1%) ``count(model) == target``
    (FLOPs or params, both falling monotonically with the ratio), by bisection."""
    low, high = 0.0, 0.99
    for _ in range(30):
        mid = (low + high) / 2
        counted = count(torch_pruning_peer(baseline, example, num_classes, mid, global_pruning))
        if abs(counted - target) <= 0.01 * target:
            return mid
        low, high = (mid, high) if counted > target else (low, mid)
    return (low + high) / 2


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def counter(measure: str, example: torch.Tensor) -> Callable[[nn.Module], int]:
    """``model -> its params`` or ``-> its FLOPs`` (of its float twin, for an int8 model)."""
    if measure == "params":
        return lambda m: n_params(dense_twin(m))
    return lambda m: count_flops(dense_twin(m), example)


def measured(
    name: str, how: str, model: nn.Module, params: Params, test: Split
) -> tuple[Contender, np.ndarray]:
    """One model measured with ``shrinkflow.tasks.measurement.evaluate``'s functions: test accuracy (with
    its 95% Wilson interval), params and FLOPs (of its float twin), size, batch-1 latency, and the
    same latency function on a batch of 64 for throughput; and its test predictions (for paired
    gaps). Only the test split: the pipeline's own measurements of val and gate are its table's."""
    model.eval()
    x, y = test
    predicted, dense, example = predict(model, x), dense_twin(model), x[:1]
    acc = accuracy(predicted, y)
    low, high = wilson(acc, len(y))
    batch_ms = latency_ms(model, x[:THROUGHPUT_BATCH], params.evaluate)
    row = Contender(
        name,
        how,
        acc,
        low,
        high,
        n_params(dense),
        count_flops(dense, example),
        serialized_size(model),
        latency_ms(model, example, params.evaluate),
        THROUGHPUT_BATCH * 1000 / batch_ms,
    )
    return row, predicted.numpy()


# --- fine-tuning the peers side by side ----------------------------------------------------


def _fine_tune(params_file: Path, root: Path, recipe: str, model: nn.Module) -> nn.Module:
    """One peer fine-tuned in a worker process on one thread, with candidate ``recipe``'s
    training config (the params are read in the worker: they do not pickle)."""
    torch.set_num_threads(1)
    params = load_params(params_file)
    layout = Layout.from_params(params, root)
    train, val = load_split(layout, "train"), load_split(layout, "val")
    fit(model, train, val, candidate_train_config(params, recipe), params.seed, params.data.augment)
    return model


def fine_tune_all(
    models: dict[str, nn.Module], params_file: Path, root: Path, recipe: str, workers: int
) -> dict[str, nn.Module]:
    """Every model fine-tuned, ``workers`` at a time, each in a spawned single-thread process (a
    model given under two names is fine-tuned once)."""
    unique = {id(model): model for model in models.values()}
    if not unique:
        return {}
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(unique)), mp_context=context) as pool:
        futures = {
            key: pool.submit(_fine_tune, params_file, root, recipe, model) for key, model in unique.items()
        }
        tuned = {key: future.result() for key, future in futures.items()}
    return {name: tuned[id(model)] for name, model in models.items()}


# --- the table -----------------------------------------------------------------------------


@dataclass
class _Peer:
    name: str
    spec: PeerSpec
    ratio: float
    model: nn.Module


def plan_peers(
    baseline: nn.Module,
    example: torch.Tensor,
    classes: int,
    promoted: dict[str, tuple[str, nn.Module]],
    specs: tuple[PeerSpec, ...],
) -> list[_Peer]:
    """Each peer of ``specs`` pruned (not yet fine-tuned) to its winner's size; a peer of a model
    promoted by two objectives is made once, and none for a winner that is the baseline."""
    peers: dict[str, _Peer] = {}
    for spec in specs:
        winner, model = promoted[spec.objective]
        name = peer_name(spec.kind, spec.measure, winner)
        if winner == "baseline" or name in peers:
            continue
        count = counter(spec.measure.lower(), example)
        ratio = ratio_for(baseline, example, classes, count(model), count, spec.global_pruning)
        twin = next((p for p in peers.values() if (p.spec.kind, p.ratio) == (spec.kind, ratio)), None)
        pruned = (
            twin.model if twin else torch_pruning_peer(baseline, example, classes, ratio, spec.global_pruning)
        )
        peers[name] = _Peer(name, spec, ratio, pruned)
        log.info("%s: ratio %.3f%s", name, ratio, f" (the model of {twin.name})" if twin else "")
    return list(peers.values())


def _peer_how(peer: _Peer, epochs: int) -> str:
    if peer.spec.global_pruning:
        return f"MetaPruner L1 global {peer.ratio:.3f} in {GLOBAL_STEPS} steps, {epochs} epochs"
    return f"MetaPruner L1 {peer.ratio:.3f} one-shot, {epochs} epochs"


def contenders(
    params: Params,
    layout: Layout,
    params_file: Path,
    winners: dict[str, str],
    specs: tuple[PeerSpec, ...],
    roles: Roles,
) -> tuple[list[Contender], list[Gap]]:
    """Baseline, the seed's manual adjustment, the reference recipe, the torch-pruning peers of
    ``specs`` and shrinkflow's promoted model under each objective in ``winners``; and each
    promoted model's paired gap in test points to every peer at its size."""
    test = load_split(layout, "test")
    example, classes = test[0][:1], len(test[1].unique())
    torch.set_num_threads(os.cpu_count() or 1)  # the shrink stage left each thread with its share
    load = lambda name: load_checkpoint(layout.checkpoint(name))[0]  # noqa: E731
    baseline = load("baseline")
    promoted = {objective: (name, load(name)) for objective, name in winners.items()}
    peers = plan_peers(baseline, example, classes, promoted, specs)
    recipe = roles.reference or next(iter(params.shrink.candidates))
    tuned = fine_tune_all(
        {p.name: p.model for p in peers}, params_file, layout.root, recipe, params.shrink.workers
    )
    epochs = params.shrink.epochs
    models = [("baseline", f"{params.model.arch}, {params.train.epochs} epochs", baseline)]
    if roles.adjusted:
        how = f"width x0.5, fresh init, {epochs} epochs"
        models.append(("seed: AdjustedNet", how, load(roles.adjusted)))
    if roles.reference:
        how = f"the best pruning-only recipe of 2026-12-01, {epochs} epochs"
        models.append((f"reference: {roles.reference}", how, load(roles.reference)))
    models += [(p.name, _peer_how(p, epochs), tuned[p.name]) for p in peers]
    models += [(promoted_name(o, name), f"promoted by {o}", model) for o, (name, model) in promoted.items()]
    rows, predicted = [], {}
    for name, how, model in models:
        row, predicted[name] = measured(name, how, model, params, test)
        rows.append(row)
    gaps = [
        paired_gap(o, name, p.name, predicted[promoted_name(o, name)], predicted[p.name], test[1])
        for o, (name, _) in promoted.items()
        for p in peers
        if p.name.endswith(f" of {name}")
    ]
    return rows, gaps


def paired_gap(
    objective: str, winner: str, peer: str, ours: np.ndarray, theirs: np.ndarray, labels: torch.Tensor
) -> Gap:
    """The promoted model's test accuracy minus the peer's, paired on the same images, with its
    two-sided 95% interval (Tango's score interval, as the gate's: each side at 97.5%)."""
    truth = labels.numpy()
    c = compare(ours == truth, theirs == truth, margin=0.0, confidence=0.975)
    return Gap(objective, winner, peer, c.delta, c.lower, c.upper)
