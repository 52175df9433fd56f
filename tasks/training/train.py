"""Stages 2 and 3: train the baseline, and shrink + train one candidate, with one shared path."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from torch import nn

from shrinkflow.models import STRATEGIES, apply_strategy, build_model
from shrinkflow.models.checkpoint import load_checkpoint, sha256_file
from shrinkflow.models.lowrank import low_rank_layers
from shrinkflow.models.probe import probe_model, refuse_without_graph
from shrinkflow.models.strategies.structured import step_ratios
from shrinkflow.tasks.config import CandidateConfig, Params, TrainConfig, comes_trained
from shrinkflow.tasks.data.prepare import load_split
from shrinkflow.tasks.decision.gate import versus_baseline
from shrinkflow.tasks.decision.stats import Comparison
from shrinkflow.tasks.errors import ShrinkflowError
from shrinkflow.tasks.io import atomic_path, read_json, save_checkpoint, write_json
from shrinkflow.tasks.layout import Layout
from shrinkflow.tasks.records import Manifest, ModelRecord, load_manifest, load_record
from shrinkflow.tasks.training.allocate import allocate_widths, factorised, summary
from shrinkflow.tasks.training.engine import (
    FitResult,
    Hooks,
    Split,
    accuracy,
    bn_l1_penalty,
    distillation_loss,
    evaluate,
    fit,
    keep_zeros,
    predict,
    small_bn_scales,
)
from shrinkflow.tasks.training.given import build_given, check_given, check_runs, is_given
from shrinkflow.tasks.training.search import Trial, best_trial, failed, judged, run_search
from shrinkflow.tasks.training.sensitivity import load_table

log = logging.getLogger(__name__)

# torch's default RNG is process-global: model construction in concurrent threads is serialised
# so each candidate's initial weights depend only on the seed. Training itself uses an explicit
# torch.Generator and no dropout, so it needs no lock.
_RNG_LOCK = threading.Lock()


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    with _RNG_LOCK:
        torch.manual_seed(seed)
        yield


def threads_per_worker(workers: int) -> int:
    """Each concurrent worker's share of the cores, so N workers never oversubscribe the CPU."""
    return max(1, (os.cpu_count() or 1) // workers)


def _train_and_save(
    name: str, model: nn.Module, record: ModelRecord, params: Params, layout: Layout, cfg: TrainConfig
) -> ModelRecord:
    train, val = load_split(layout, "train"), load_split(layout, "val")
    result = fit(model, train, val, cfg, seed=params.seed, augment=params.data.augment)
    return _save(name, model, record, layout, result, val)


def _save(
    name: str, model: nn.Module, record: ModelRecord, layout: Layout, result: FitResult | None, val: Split
) -> ModelRecord:
    """Fill ``record`` from training (if any) and write the checkpoint and record."""
    _store(name, model, record, layout, result, val, layout.checkpoint(name))
    write_json(layout.record(name), asdict(record))
    log.info("%s: best val_acc %.2f at epoch %d", name, record.best_val_acc, record.best_epoch)
    return record


def _store(
    name: str,
    model: nn.Module,
    record: ModelRecord,
    layout: Layout,
    result: FitResult | None,
    val: Split,
    path: Path,
) -> None:
    """Fill ``record`` from training (if any) and write the checkpoint to ``path``."""
    if result is not None:
        record.epochs = len(result.history)
        record.best_epoch = result.best_epoch
        record.train_seconds = result.seconds
        record.images_per_second = result.images_seen / max(result.seconds, 1e-9)
        record.history = result.history
        record.precision = result.precision
    # The final model's own accuracy: a step after training (int8) changes it.
    record.best_val_acc = evaluate(model, val)
    record.sha256 = save_checkpoint(model, path, meta={"name": name, "strategy": record.strategy})
    record.checkpoint = str(path.relative_to(layout.root))


def train_baseline(params: Params, layout: Layout) -> ModelRecord:
    """Build the configured architecture for the prepared data's shape and train it; a model
    brought with weights (or from the registry) is checked and taken as it is instead."""
    manifest = load_manifest(layout)
    if is_given(params) and comes_trained(params.model):
        return _take_baseline(params, layout, manifest)
    channels, size, _ = manifest.input_shape
    spec = {
        "in_channels": channels,
        "image_size": size,
        "num_classes": manifest.num_classes,
        **params.model.arch_options(),
    }
    with seeded(params.seed):
        model = build_model(spec)
    if is_given(params):  # a network of the user's, trained here from scratch
        check_runs(model, load_split(layout, "val")[0], manifest.num_classes)
    record = ModelRecord(name="baseline", strategy="baseline", options={})
    if is_given(params):  # a network nobody here checked, trained from scratch
        record.pruning = _probed(model)
    return _train_and_save("baseline", model, record, params, layout, params.train)


def _take_baseline(params: Params, layout: Layout, manifest: Manifest) -> ModelRecord:
    """The brought model: built, its outputs checked against the data, fine-tuned only if
    ``model.finetune`` asks, and saved as the baseline with its lineage."""
    with seeded(params.seed):
        model, origin = build_given(params, layout, manifest)
    (x, y), train_x = load_split(layout, "val"), load_split(layout, "train")[0]
    origin |= check_given(model, train_x, (x, y), manifest.classes, params.model.classes)
    record = ModelRecord(name="baseline", strategy="given", options={}, origin=origin)
    record.pruning = _probed(model)
    log.info("baseline: %s, val_acc %.2f as given", origin["source"], origin["val_acc_as_given"])
    if not params.model.finetune:
        return _save("baseline", model, record, layout, None, (x, y))
    cfg = params.train.model_copy(update={"epochs": params.model.finetune})
    return _train_and_save("baseline", model, record, params, layout, cfg)


def _probed(model: nn.Module) -> dict[str, Any]:
    """torch-pruning's graph of a brought network, looked at in a bounded child process (on
    Swin it never ends), logged in one line; candidates read the record it returns."""
    probe = probe_model(model)
    log.info("baseline: %s", probe.line())
    return probe.as_dict()


def candidate_train_config(params: Params, name: str) -> TrainConfig:
    """The baseline's training recipe with the shrink stage's (or the candidate's) budget."""
    cand, shrink = params.shrink.candidates[name], params.shrink
    return params.train.model_copy(
        update={
            "epochs": cand.epochs or shrink.epochs,
            "lr": cand.lr or shrink.lr or params.train.lr,
            "l1": params.train.l1 if cand.l1 is None else cand.l1,
        }
    )


@dataclass(frozen=True)
class _Inputs:
    """What every trial of a candidate starts from."""

    baseline: ModelRecord
    train: Split
    val: Split
    calibration: Split


def _load_inputs(params: Params, layout: Layout) -> _Inputs:
    x, y = load_split(layout, "train")
    n = params.shrink.calibration_size
    return _Inputs(load_record(layout, "baseline"), (x, y), load_split(layout, "val"), (x[:n], y[:n]))


def _baseline(layout: Layout, inputs: _Inputs) -> nn.Module:
    return load_checkpoint(layout.root / inputs.baseline.checkpoint, sha256=inputs.baseline.sha256)[0]


@dataclass
class _Built:
    """One candidate at one ratio: the model, how its training went (None: never trained), and
    what the pipeline did around the strategy (slim's sparsity phase, the pruning rounds, and in
    ``allocation`` what the record's options gain: a budget's allocation, the lowrank step's
    ranks)."""

    model: nn.Module
    result: FitResult | None
    sparsity_phase: dict[str, Any] | None = None
    rounds: list[dict[str, Any]] = field(default_factory=list)
    allocation: dict[str, Any] = field(default_factory=dict)


def _allocated(
    params: Params, layout: Layout, name: str, inputs: _Inputs, model: nn.Module, ratio: float | None
) -> dict[str, Any]:
    """A budget candidate's allocation, made before its strategy runs, as its record keeps it
    (``widths`` among it), from the table the sensitivity stage measured; ``ratio`` (a search's
    trial) becomes ``budget.keep = 1 - ratio``."""
    cand = params.shrink.candidates[name]
    request = cand.allocation_request(params.seed, None if ratio is None else 1 - ratio)
    request = replace(request, ranks=cand.allocates_ranks)
    table = load_table(params, layout, cand.strategy, inputs.calibration)
    chosen = allocate_widths(cand.strategy, request, model, table, inputs.calibration, inputs.val)
    path = layout.sensitivity_table(cand.strategy).relative_to(layout.root)
    ratio_of = (cand.searched or request.budgets[0]).objective  # the table's ratio column
    return summary(chosen, request, table, str(path)) | {"ratio": round(1 - chosen.cost[ratio_of], 6)}


def _sparsity_phase(
    model: nn.Module, inputs: _Inputs, cfg: TrainConfig, params: Params, epochs: int, strength: float
) -> dict[str, Any]:
    """Fine-tune ``model`` in place with the L1 penalty on BatchNorm scales; its last weights are
    what gets pruned (an earlier epoch would undo the phase), whatever ``train.keep`` says."""
    before = small_bn_scales(model)
    phase_cfg = cfg.model_copy(update={"epochs": epochs, "keep": "last"})
    hooks = Hooks(penalty=bn_l1_penalty(strength))
    result = fit(model, inputs.train, inputs.val, phase_cfg, params.seed, params.data.augment, hooks)
    return {
        "epochs": epochs,
        "strength": strength,
        "seconds": result.seconds,
        "small_bn_scales_before": before,
        "small_bn_scales_after": small_bn_scales(model),
        "val_acc_after": result.history[-1]["val_acc"],
        "history": result.history,
    }


def _lowrank_step(cand: CandidateConfig, model: nn.Module, calibration: Split, built: _Built) -> nn.Module:
    """The candidate's ``lowrank`` step, after its strategy: each layer factorised at the ranks the
    budget's allocation chose with the widths, or by the step's own ratio, energy or ranks. The
    ranks it has then go in the record (``ranks``: layer -> its ranks)."""
    step = cand.lowrank
    allocated = {n: tuple(r) for n, r in built.allocation.get("ranks", {}).items()}
    if step.allocate:
        model = factorised(model, allocated, calibration)
    else:
        model = apply_strategy("lowrank", model, calibration, **step.options())
    ranks = {n: m.ranks for n, m in low_rank_layers(model).items()}
    if step.allocate and ranks != allocated:  # the allocation offers only ranks the strategy takes
        raise ValueError(f"the lowrank step factorised {ranks}, not the allocated {allocated}")
    built.allocation |= {
        "lowrank": step.model_dump(exclude_none=True, exclude_defaults=True),
        "ranks": {n: list(r) for n, r in ranks.items()},
    }
    return model


def _split_epochs(epochs: int, rounds: int) -> list[int]:
    """``epochs`` shared by ``rounds`` as evenly as possible, the remainder to the last rounds."""
    return [epochs // rounds + (i >= rounds - epochs % rounds) for i in range(rounds)]


def _shrink_and_train(
    params: Params, layout: Layout, name: str, inputs: _Inputs, ratio: float | None
) -> _Built:
    """One candidate at one ratio: [sparsity fine-tune] -> strategy -> [lowrank] -> fine-tune
    (plain or distilled, zeros kept where the strategy needs it; with ``rounds``, strategy and
    fine-tune repeat, each round removing an equal share of the original width, and the lowrank
    step follows the last round's strategy) -> [int8]."""
    cand, cfg = params.shrink.candidates[name], candidate_train_config(params, name)
    info, model = STRATEGIES[cand.strategy], _baseline(layout, inputs)
    phase = cand.sparsity_phase()
    built = _Built(model, None)
    if phase:
        built.sparsity_phase = _sparsity_phase(model, inputs, cfg, params, *phase)
    options = cand.options() | ({"ratio": ratio} if ratio is not None else {})
    options = {k: v for k, v in options.items() if k not in info.options.ALLOCATION_KEYS}
    if getattr(cand, "budget", None) is not None:
        built.allocation = _allocated(params, layout, name, inputs, model, options.pop("ratio", None))
        options["widths"] = built.allocation["widths"]
    teacher = cand.distill and distillation_loss(_baseline(layout, inputs), **cand.distill.model_dump())
    if not info.warm_start:
        log.info("%s: %s starts from a fresh initialisation", name, cand.strategy)
    ratios = step_ratios(options["ratio"], cand.rounds) if cand.rounds > 1 else [options.get("ratio")]
    results = []
    for i, (step, epochs) in enumerate(zip(ratios, _split_epochs(cfg.epochs, len(ratios)), strict=True)):
        with seeded(params.seed):
            step_options = options | ({"ratio": step} if step is not None else {})
            model = apply_strategy(cand.strategy, model, inputs.calibration, **step_options)
            if cand.lowrank and i == len(ratios) - 1:
                model = _lowrank_step(cand, model, inputs.calibration, built)
        if info.trains:
            hooks = Hooks(loss=teacher or None, after_step=keep_zeros(model) if info.keeps_zeros else None)
            round_cfg = cfg.model_copy(update={"epochs": epochs})
            results.append(
                fit(model, inputs.train, inputs.val, round_cfg, params.seed, params.data.augment, hooks)
            )
        if len(ratios) > 1:
            built.rounds.append(
                {
                    "round": i + 1,
                    "ratio": step,
                    "epochs": epochs,
                    "val_acc": results[-1].history[-1]["val_acc"],
                }
            )
    built.result = _merged(results) if results else None
    if cand.quantize:
        model = apply_strategy(cand.quantize, model, inputs.calibration)
    built.model = model
    return built


def _plain(options: dict[str, Any]) -> dict[str, Any]:
    """Options as JSON: nested option models as dicts, tuples as lists."""
    return {k: _plain_value(v) for k, v in options.items()}


def _plain_value(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump()
    return [_plain_value(v) for v in value] if isinstance(value, tuple) else value


def _merged(results: list[FitResult]) -> FitResult:
    """Consecutive fits (pruning rounds) as one: epochs numbered on, times and images summed."""
    merged = FitResult(precision=results[0].precision)
    for result in results:
        offset = len(merged.history)
        merged.history += [row | {"epoch": row["epoch"] + offset} for row in result.history]
        merged.best_epoch, merged.best_val_acc = result.best_epoch + offset, result.best_val_acc
        merged.seconds += result.seconds
        merged.images_seen += result.images_seen
    return merged


def _judge(params: Params, layout: Layout, inputs: _Inputs, model: nn.Module) -> tuple[float, Comparison]:
    """A trial's val accuracy and the promotion gate against the baseline on the validation split
    (never on the gate split)."""
    x, y = inputs.val
    baseline_predictions = predict(_baseline(layout, inputs), x).numpy()
    predictions = predict(model, x)
    gate = versus_baseline(predictions.numpy(), baseline_predictions, y.numpy(), params.promote)
    return accuracy(predictions, y), gate


def _searched(budget: dict[str, Any] | list[dict[str, Any]]) -> dict[str, Any]:
    """The recorded budget whose ``keep`` a search set."""
    return next(b for b in budget if b["keep"] is None) if isinstance(budget, list) else budget


def _new_record(params: Params, name: str) -> ModelRecord:
    cand = params.shrink.candidates[name]
    return ModelRecord(name=name, strategy=cand.strategy, options=_plain(cand.options()), steps=cand.steps())


def _describe(record: ModelRecord, built: _Built, ratio: float | None) -> None:
    """What the pipeline did around the strategy, in ``record``: a searched ratio (and the budget
    keep it set), slim's sparsity phase, the pruning rounds, a budget's allocation."""
    if ratio is not None:
        record.options["ratio"] = ratio
        if record.options.get("budget"):  # the search varied the keep left out: 1 - ratio
            _searched(record.options["budget"])["keep"] = round(1 - ratio, 6)
    record.sparsity_phase, record.rounds = built.sparsity_phase, built.rounds
    record.options |= built.allocation


def shrink_trial(params: Params, layout: Layout, name: str, index: int, ratio: float) -> Trial:
    """Trial ``index`` of candidate ``name``'s search: shrink at ``ratio``, fine-tune, judge on
    validation against the baseline. Writes the trial's checkpoint and its record (the
    candidate's record, were this trial kept, listing this trial alone) under
    ``Layout.trial_dir``; a failure is recorded there, its checkpoint removed, before it is
    re-raised."""
    record = _new_record(params, name)
    path = layout.trial_checkpoint(name, ratio)
    try:
        inputs = _load_inputs(params, layout)
        refuse_without_graph(record.strategy, inputs.baseline.pruning)
        built = _shrink_and_train(params, layout, name, inputs, ratio)
        _describe(record, built, ratio)
        _store(name, built.model, record, layout, built.result, inputs.val, path)
        acc, gate = _judge(params, layout, inputs, built.model)
        trial = judged(index, ratio, acc, gate, seconds=record.train_seconds, sha256=record.sha256)
    except Exception as exc:
        record.status, record.error = "failed", f"{type(exc).__name__}: {exc}"
        record.trials = [asdict(failed(index, ratio, exc))]
        path.unlink(missing_ok=True)  # never leave an older trial to be kept
        write_json(layout.trial_record(name, ratio), asdict(record))
        raise
    record.trials = [asdict(trial)]
    write_json(layout.trial_record(name, ratio), asdict(record))
    log.info(
        "%s: trial %d at ratio %g: val_acc %.2f, %+.2f points (bound %+.2f): %s",
        name,
        index,
        ratio,
        acc,
        gate.delta,
        gate.lower,
        "passed" if gate.passed else "failed",
    )
    return trial


def try_trial(params: Params, layout: Layout, name: str, index: int, ratio: float) -> Trial:
    """:func:`shrink_trial`, a failure returned as a failed trial (the search goes on)."""
    try:
        return shrink_trial(params, layout, name, index, ratio)
    except Exception as exc:
        log.warning("%s: trial %d at ratio %g failed: %s: %s", name, index, ratio, type(exc).__name__, exc)
        return failed(index, ratio, exc)


class TrialChanged(ShrinkflowError):
    """The checkpoint of the trial a search keeps is not the one the trial wrote."""


def pick_trial(params: Params, layout: Layout, name: str, trials: Sequence[Trial]) -> ModelRecord:
    """Make the search's best trial (:func:`best_trial`) candidate ``name``: its checkpoint,
    byte for byte, and its record listing every trial, exactly what a serial search writes. Trial
    folders of ratios this search did not try (an earlier configuration's) are removed. A failure
    (every trial failed) is recorded before it is re-raised."""
    try:
        best = best_trial(trials)
        record = load_trial_record(layout, name, best.ratio)
        source = layout.trial_checkpoint(name, best.ratio)
        if record.sha256 != best.sha256 or not source.is_file() or sha256_file(source) != best.sha256:
            raise TrialChanged(
                f"{source} is not the checkpoint trial {best.index} wrote; run the search again"
            )
        with atomic_path(layout.checkpoint(name)) as tmp:
            shutil.copyfile(source, tmp)
    except Exception as exc:
        record = _new_record(params, name)
        record.status, record.error = "failed", f"{type(exc).__name__}: {exc}"
        record.trials = [asdict(t) for t in trials]
        layout.checkpoint(name).unlink(missing_ok=True)  # never leave an older model to be trusted
        write_json(layout.record(name), asdict(record))
        raise
    record.checkpoint = str(layout.checkpoint(name).relative_to(layout.root))
    record.trials = [asdict(t) for t in trials]
    write_json(layout.record(name), asdict(record))
    _drop_other_trials(layout, name, {t.ratio for t in trials})
    log.info(
        "%s: search kept ratio %.4f after %d trials (%s)",
        name,
        best.ratio,
        len(trials),
        "passed the gate" if best.passed else "none passed the gate",
    )
    return record


def load_trial_record(layout: Layout, name: str, ratio: float) -> ModelRecord:
    return ModelRecord(**read_json(layout.trial_record(name, ratio)))


def _drop_other_trials(layout: Layout, name: str, ratios: set[float]) -> None:
    keep = {layout.trial_dir(name, r) for r in ratios}
    for folder in sorted(layout.trials(name).glob("*")):
        if folder.is_dir() and folder not in keep:
            shutil.rmtree(folder)
            log.info("removed %s: a trial of an earlier search", folder)


def shrink_candidate(
    params: Params, layout: Layout, name: str, on_trial: Callable[[Trial], None] | None = None
) -> ModelRecord:
    """Apply candidate ``name``'s steps to the baseline, training with the same loop; with a
    ``search``, run its trials one after another, round by round as the fan-out would run them
    side by side (``on_trial`` hears each), then keep the best.

    A failure is recorded (status ``failed`` with the reason) before it is re-raised, so the
    evaluation table can show it."""
    cand = params.shrink.candidates[name]
    if cand.search is not None:
        trials = run_search(
            cand.search,
            params.shrink.workers,
            lambda index, ratio: try_trial(params, layout, name, index, ratio),
            on_trial,
        )
        return pick_trial(params, layout, name, trials)
    record = _new_record(params, name)
    try:
        inputs = _load_inputs(params, layout)
        refuse_without_graph(cand.strategy, inputs.baseline.pruning)
        built = _shrink_and_train(params, layout, name, inputs, None)
        _describe(record, built, None)
        return _save(name, built.model, record, layout, built.result, inputs.val)
    except Exception as exc:
        record.status, record.error = "failed", f"{type(exc).__name__}: {exc}"
        layout.checkpoint(name).unlink(missing_ok=True)  # never leave an older model to be trusted
        write_json(layout.record(name), asdict(record))
        raise
