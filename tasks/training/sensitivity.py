"""The sensitivity stage: the measured tables budget candidates allocate from, between baseline
and shrink.

For each strategy a budget candidate prunes with, each prunable group of the baseline is pruned
alone at each ``sensitivity_ratios`` ratio by that strategy (its importance picks the channels)
and, where a candidate of that strategy allocates ranks too (``lowrank: {allocate: true}``), each
factorisable layer is factorised alone by the lowrank strategy at each of its rank levels
(:data:`~shrinkflow.models.allocation.RANK_SHARES` of its maximum rank); BatchNorm statistics
are re-estimated on the calibration images, and validation loss and accuracy, params, FLOPs and
batch-1 single-thread latency (``evaluate``'s timer) are measured. Each table is written to
``<paths.sensitivity>/sensitivity-<strategy>.json`` with its key (the baseline checkpoint's
sha256, the prepared data's fingerprint, the strategy, the ratios, the calibration size and the
rank shares where ranks are measured), a plot of every group's and layer's curve beside it, and
``tables.json`` lists them (and is written, empty, when no candidate needs a table). A table
whose key still holds is kept, not measured again; a candidate refuses a table that is missing or
whose key no longer holds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from shrinkflow.models import apply_strategy
from shrinkflow.models.allocation import (
    RANK_SHARES,
    Sensitivity,
    has_batch_norm,
    interleaved_ms,
    loss_and_accuracy,
    measure_sensitivity,
    reestimate_batch_norm,
)
from shrinkflow.models.checkpoint import load_checkpoint
from shrinkflow.models.probe import refuse_without_graph
from shrinkflow.models.timing import median_latency_ms
from shrinkflow.tasks.config import Params
from shrinkflow.tasks.data.prepare import load_split
from shrinkflow.tasks.errors import ShrinkflowError
from shrinkflow.tasks.io import atomic_path, read_json, write_json
from shrinkflow.tasks.layout import Layout
from shrinkflow.tasks.records import load_manifest, load_record

log = logging.getLogger(__name__)

# The lookup table times the unpruned model and a group's pruned copies in turn, ROUNDS times
# (each time the median of REPEATS passes, evaluate's timer), and keeps each one's fastest round
# as a ratio to the unpruned model's: a machine under load (13 ms for a 1.85 ms baseline was
# seen) slows every model of a round alike, so the ratios hold where the milliseconds do not.
WARMUP, REPEATS, ROUNDS = 1, 3, 20
BN_BATCH = 64

Batch = tuple[Tensor, Tensor]


def latency_ms(model: nn.Module, example: Tensor, warmup: int = WARMUP, repeats: int = REPEATS) -> float:
    """Median single-thread CPU latency of one forward pass, timed as ``evaluate`` times models."""
    return median_latency_ms(model, example, warmup, repeats)


def timed_together(
    example: Tensor, rounds: int = ROUNDS, warmup: int = WARMUP, repeats: int = REPEATS
) -> Callable[[list[nn.Module]], list[float]]:
    """``models -> ms``: each model's fastest of ``rounds`` interleaved rounds (the first model
    is the reference the others are compared with)."""
    return lambda models: interleaved_ms(
        [m.eval() for m in models], lambda m: latency_ms(m, example, warmup, repeats), rounds
    )


def scorer(calibration: Batch, val: Batch) -> Callable[[nn.Module], tuple[float, float]]:
    """Validation loss and accuracy after BatchNorm re-estimation on the calibration images."""
    batches = [calibration[0][i : i + BN_BATCH].float() for i in range(0, len(calibration[0]), BN_BATCH)]

    def score(model: nn.Module) -> tuple[float, float]:
        if has_batch_norm(model):
            reestimate_batch_norm(model, batches)
        return loss_and_accuracy(model, val[0], val[1])

    return score


class TableMissing(ShrinkflowError, FileNotFoundError):
    """A budget candidate's sensitivity table is not there, or was measured for something else."""


def calibration_and_val(params: Params, layout: Layout) -> tuple[Batch, Batch]:
    """The images a table is measured on: the first ``shrink.calibration_size`` training images
    (BatchNorm re-estimation; the candidates' calibration batch) and the validation split."""
    x, y = load_split(layout, "train")
    n = params.shrink.calibration_size
    return (x[:n], y[:n]), load_split(layout, "val")


def table_key(params: Params, layout: Layout, strategy: str, calibration: Batch) -> dict[str, Any]:
    """What a table is a function of: the baseline, the data, the strategy, its ratios, the
    calibration images and, where ranks are measured, the shares of each layer's maximum rank."""
    key = {
        "baseline_sha256": load_record(layout, "baseline").sha256,
        "data": load_manifest(layout).fingerprint,
        "strategy": strategy,
        "ratios": list(params.shrink.sensitivity_tables()[strategy]),
        "calibration_size": len(calibration[0]),
    }
    return key | ({"rank_shares": list(RANK_SHARES)} if strategy in params.shrink.ranked_tables() else {})


def measure_table(params: Params, layout: Layout, strategy: str) -> Path:
    """``strategy``'s table, measured and written with its plot, unless the one there already
    has its key."""
    path, calibration_val = layout.sensitivity_table(strategy), calibration_and_val(params, layout)
    key = table_key(params, layout, strategy, calibration_val[0])
    if path.exists() and read_json(path).get("key") == key:
        log.info("%s: measured before for this baseline, data and settings; kept", path.name)
        return path
    started = time.perf_counter()
    baseline = load_record(layout, "baseline")
    refuse_without_graph(strategy, baseline.pruning)  # a brought network's graph may never end
    model, _ = load_checkpoint(layout.root / baseline.checkpoint, sha256=baseline.sha256)
    table = measure(
        model, strategy, *calibration_val, tuple(key["ratios"]), tuple(key.get("rank_shares", ()))
    )
    plot_sensitivity(table, path.with_suffix(".png"))
    write_json(path, {"key": key, "table": asdict(table)})  # last: a table with its key is whole
    log.info(
        "%s: %d groups and %d factorisable layers measured in %.1f s",
        path.name,
        len(table.groups),
        len(table.layers),
        time.perf_counter() - started,
    )
    return path


def measure(
    model: nn.Module,
    strategy: str,
    calibration: Batch,
    val: Batch,
    ratios: tuple[float, ...],
    rank_shares: tuple[float, ...] = (),
) -> Sensitivity:
    """Each prunable group of ``model`` pruned alone by ``strategy`` at each ratio and (with
    ``rank_shares``) each factorisable layer factorised alone by ``lowrank``, measured."""
    example = calibration[0][:1].float()
    return measure_sensitivity(
        model,
        example,
        lambda m, widths: apply_strategy(strategy, m, calibration, widths=widths),
        scorer(calibration, val),
        timed_together(example),
        ratios,
        factorised(calibration) if rank_shares else None,
        rank_shares,
    )


def factorised(calibration: Batch) -> Callable[[nn.Module, dict[str, tuple[int, ...]]], nn.Module]:
    """``(model, ranks) -> model`` factorised in place at ``ranks`` by the lowrank strategy."""
    return lambda m, ranks: apply_strategy(
        "lowrank", m, calibration, ranks={n: list(r) for n, r in ranks.items()}
    )


def write_index(params: Params, layout: Layout) -> Path:
    """``tables.json``: each table the budget candidates need, with its key; a table no candidate
    needs any more is removed, so the stage's output is exactly what it declares."""
    wanted = {layout.sensitivity_table(s): s for s in params.shrink.sensitivity_tables()}
    layout.sensitivity.mkdir(parents=True, exist_ok=True)
    for stale in sorted(layout.sensitivity.glob("sensitivity-*.*")):
        if stale.with_suffix(".json") not in wanted:
            stale.unlink()
            log.info("removed %s: no budget candidate allocates from it", stale)
    tables = {s: {"file": p.name, "key": read_json(p)["key"]} for p, s in wanted.items() if p.is_file()}
    write_json(layout.sensitivity_index, {"tables": tables})
    return layout.sensitivity_index


def sensitivity_stage(params: Params, layout: Layout) -> list[Path]:
    """Every table the budget candidates need (none: only the empty index), one after another."""
    paths = [measure_table(params, layout, strategy) for strategy in params.shrink.sensitivity_tables()]
    write_index(params, layout)
    return paths


def load_table(params: Params, layout: Layout, strategy: str, calibration: Batch) -> Sensitivity:
    """The table a budget candidate of ``strategy`` allocates from, refused in one line when it is
    missing or was measured for another baseline, data or settings."""
    path = layout.sensitivity_table(strategy)
    rerun = "run `shrinkflow stage sensitivity` (dvc repro runs it before shrink)"
    if not path.is_file():
        raise TableMissing(f"the sensitivity table {path.relative_to(layout.root)} is missing; {rerun}")
    stored = read_json(path)
    if stored.get("key") != table_key(params, layout, strategy, calibration):
        raise TableMissing(
            f"the sensitivity table {path.relative_to(layout.root)} was measured for another baseline, "
            f"data or settings; {rerun}"
        )
    return Sensitivity(**stored["table"])


def plot_sensitivity(table: Sensitivity, path: Path) -> Path:
    """Every group's (and factorisable layer's) validation accuracy and batch-1 latency against
    the share of its channels (of its maximum rank) it keeps."""
    from matplotlib.figure import Figure  # a second to import: only when a plot is drawn

    fig = Figure(figsize=(10, 4), layout="constrained")  # not pyplot: candidates run in threads
    acc_ax, lat_ax = fig.subplots(1, 2)
    for group, row in table.groups.items():
        shares = [1.0, *(k / row["width"][0] for k in row["kept"])]
        acc_ax.plot(
            shares, [table.base["acc"], *row["acc"]], marker="o", label=f"{group} ({row['width'][0]})"
        )
        lat_ax.plot(shares, [table.base["latency_ms"], *row["latency_ms"]], marker="o", label=group)
    for layer, row in table.layers.items():  # a rank as its share of the layer's maximum rank
        shares = [1.0, *(sum(r) / sum(row["max_ranks"]) for r in row["ranks"])]
        label = f"{layer} (rank)"
        acc_ax.plot(shares, [table.base["acc"], *row["acc"]], marker="s", linestyle="--", label=label)
        lat_ax.plot(
            shares, [table.base["latency_ms"], *row["latency_ms"]], marker="s", linestyle="--", label=label
        )
    kept = "share kept (channels; dashed: rank)"
    acc_ax.set(xlabel=kept, ylabel="val accuracy % (BN re-estimated)")
    lat_ax.set(xlabel=kept, ylabel="batch-1 latency, ms (1 thread)")
    acc_ax.invert_xaxis()
    lat_ax.invert_xaxis()
    acc_ax.legend(fontsize=7)
    fig.suptitle(
        "Each prunable group pruned alone" + (", each layer factorised alone" if table.layers else "")
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path
