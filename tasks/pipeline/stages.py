"""Each stage as one call: do the work, then log its result to MLflow in one place.

The Prefect flow wraps these functions as tasks; ``shrinkflow stage <name>`` (what ``dvc.yaml``
runs) calls them directly. Both paths therefore execute exactly the same code.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from shrinkflow.models import STRATEGIES
from shrinkflow.tasks.config import Params, load_params
from shrinkflow.tasks.data.prepare import load_raw_split, prepare
from shrinkflow.tasks.decision.decide import PromotionError, Verdict, verdict_json
from shrinkflow.tasks.decision.report import markdown_report, pareto_plot
from shrinkflow.tasks.errors import named_first_line
from shrinkflow.tasks.io import sweep_temporaries, write_json, write_text
from shrinkflow.tasks.layout import Layout
from shrinkflow.tasks.measurement.evaluate import COLUMNS, evaluate_models, load_table
from shrinkflow.tasks.promotion.promote import promote
from shrinkflow.tasks.promotion.reproduce import provenance_tags
from shrinkflow.tasks.records import Manifest, ModelRecord, load_record
from shrinkflow.tasks.store.tracking import (
    Tracker,
    TrackingUnavailable,
    close_orphaned_runs,
    code_version,
    log_candidates,
    log_dataset,
    log_record,
)
from shrinkflow.tasks.training import progress, stop, tensorboard
from shrinkflow.tasks.training.given import user_code
from shrinkflow.tasks.training.search import FanOut, Job, Trial, simulate
from shrinkflow.tasks.training.sensitivity import measure_table, sensitivity_stage, write_index
from shrinkflow.tasks.training.train import (
    candidate_train_config,
    pick_trial,
    shrink_candidate,
    shrink_trial,
    threads_per_worker,
    train_baseline,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Context:
    """What every stage needs: the config, where files live, and where results are logged."""

    params: Params
    layout: Layout
    tracker: Tracker
    parent_run: str | None = None

    @classmethod
    def load(
        cls, params_file: str | Path, overrides: tuple[str, ...] = (), root: str | Path = "."
    ) -> Context:
        """Validate the config, reach the tracking server, and clear what a killed run left."""
        params = load_params(params_file, overrides)
        layout = Layout.from_params(params, root)
        tracker = Tracker.for_project(root, params.tracking.experiment)
        dirs = (layout.prepared, layout.baseline, layout.sensitivity, layout.candidates, layout.reports)
        for stale in sweep_temporaries(*dirs):
            log.warning("removed %s, left half-written by an interrupted run", stale)
        for run in close_orphaned_runs(tracker):
            log.warning("marked MLflow run %s KILLED: an interrupted run left it RUNNING", run)
        return cls(params, layout, tracker)


@dataclass(frozen=True)
class Tracked:
    """A model stage's record plus the MLflow run it was logged to."""

    record: ModelRecord
    run_id: str


@contextlib.contextmanager
def pipeline_run(ctx: Context, flow_run_id: str = "") -> Iterator[Context]:
    """One MLflow parent run around a whole pipeline run; stages nest under it."""
    ctx.tracker.check()
    parent = ctx.tracker.start_run(
        "pipeline", tags={"shrinkflow.stage": "pipeline", "prefect.flow_run_id": flow_run_id}
    )
    try:
        yield Context(ctx.params, ctx.layout, ctx.tracker, parent)
    except BaseException as exc:
        _close(ctx, parent, exc)
        raise
    ctx.tracker.end_run(parent)


def fan_out(params: Params) -> tuple[list[str], list[str]]:
    """Candidates that may train concurrently, and those that must then run one at a time: under
    the thread runner every candidate shares the process, and an exclusive step (torch.fx tracing
    for int8) would break the others' forward passes."""
    candidates = params.shrink.candidates
    if params.shrink.runner != "thread":
        return list(candidates), []
    alone = [name for name, cand in candidates.items() if cand.exclusive()]
    return [name for name in candidates if name not in alone], alone


def run_ids(results: dict[str, Tracked | BaseException]) -> dict[str, str]:
    """Each model's MLflow run, for the models whose stage succeeded."""
    return {name: r.run_id for name, r in results.items() if isinstance(r, Tracked)}


def summarise(ctx: Context, runs: dict[str, str]) -> None:
    """Give the parent run the whole story: config, table with links to each model's run, decision."""
    ctx.tracker.log(ctx.parent_run, params=_flat(ctx.params.model_dump(exclude={"shrink", "paths"})))
    log_candidates(ctx.tracker, ctx.parent_run, load_table(ctx.layout.candidates_csv), runs)
    for path in (
        ctx.layout.candidates_csv,
        ctx.layout.promotion_json,
        ctx.layout.pareto_png,
        ctx.layout.report_md,
    ):
        ctx.tracker.log_artifact(ctx.parent_run, path)


def _flat(tree: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@contextlib.contextmanager
def ends_failed(ctx: Context, run: str) -> Iterator[None]:
    """End ``run`` FAILED (KILLED when interrupted), with the error as a tag, if the block raises:
    a stage that stops never leaves its MLflow run RUNNING."""
    try:
        yield
    except BaseException as exc:
        _close(ctx, run, exc)
        raise


def _close(ctx: Context, run: str, exc: BaseException, tags: dict[str, str] | None = None) -> None:
    """End ``run`` FAILED, or KILLED when interrupted (Ctrl-C, SIGTERM, Prefect's termination
    signal: anything that is not an ``Exception``), with the error as a tag; not when the tracking
    store is what failed (each call would only wait out MLflow's retries)."""
    if isinstance(exc, TrackingUnavailable):
        return
    status = "FAILED" if isinstance(exc, Exception) else "KILLED"
    with contextlib.suppress(Exception):  # the store may have failed in a way we did not see
        ctx.tracker.log(run, tags={**(tags or {}), "shrinkflow.error": f"{type(exc).__name__}: {exc}"[:5000]})
        ctx.tracker.end_run(run, status)


def run_prepare(ctx: Context) -> Manifest:
    run = ctx.tracker.start_run("prepare", ctx.parent_run, tags={"shrinkflow.stage": "prepare"})
    with ends_failed(ctx, run):
        manifest = prepare(ctx.params, ctx.layout)
        tags = {"data_fingerprint": manifest.fingerprint}
        ctx.tracker.log(run, params=ctx.params.data.model_dump(), tags=tags)
        train_x = load_raw_split(ctx.layout, "train")[0].numpy()  # the memory map, as stored
        log_dataset(ctx.tracker, run, manifest, train_x, ctx.layout.prepared)
        ctx.tracker.log_artifact(run, ctx.layout.manifest)
    ctx.tracker.end_run(run)
    return manifest


def _all_cores() -> None:
    """Stages that run alone use every core (a fan-out before them may have set fewer)."""
    torch.set_num_threads(os.cpu_count() or 1)


def run_baseline(ctx: Context) -> Tracked:
    _all_cores()
    return _model_stage(ctx, "baseline", lambda run: train_baseline(ctx.params, ctx.layout))


def sensitivity_strategies(params: Params) -> list[str]:
    """The strategies whose sensitivity tables the budget candidates need (each measured apart)."""
    return list(params.shrink.sensitivity_tables())


def run_sensitivity(ctx: Context, strategy: str | None = None) -> list[Path]:
    """The sensitivity tables budget candidates allocate from: ``strategy``'s, or (``None``)
    every one and the index. With the shrink stage's thread count, so that DVC and Prefect
    measure the same floats."""
    stop.check()
    torch.set_num_threads(threads_per_worker(ctx.params.shrink.workers))
    with user_code(ctx.params, ctx.layout):  # the baseline is rebuilt from its spec
        if strategy is not None:
            return [measure_table(ctx.params, ctx.layout, strategy)]
        return sensitivity_stage(ctx.params, ctx.layout)


def index_sensitivity(ctx: Context) -> Path:
    """After the tables were measured apart: the index of them, stale ones removed."""
    return write_index(ctx.params, ctx.layout)


def run_candidate(ctx: Context, name: str) -> Tracked:
    """Candidate ``name`` whole, in this process (what ``shrinkflow stage shrink`` runs): a
    search's trials one after another inside the candidate's MLflow run, each a nested run."""
    _worker_threads(ctx)
    return _model_stage(
        ctx, name, lambda run: shrink_candidate(ctx.params, ctx.layout, name, _trial_logger(ctx, name, run))
    )


def _worker_threads(ctx: Context) -> None:
    # The same thread count under Prefect's runners and under `dvc repro`, so both compute the
    # same floats; and N concurrent candidates never oversubscribe the cores.
    torch.set_num_threads(threads_per_worker(ctx.params.shrink.workers))


def run_trial(ctx: Context, name: str, index: int, ratio: float) -> Trial:
    """One trial of candidate ``name``'s search, as its own task: shrunk, fine-tuned and judged,
    its checkpoint and record written under ``Layout.trial_dir``. Its MLflow run is made by
    :func:`run_pick`, under the candidate's run, once the search is over."""
    stop.check()  # queued behind an interrupted run's work
    _worker_threads(ctx)
    with progress.showing(f"{name} @ {ratio:g}"), user_code(ctx.params, ctx.layout):
        return shrink_trial(ctx.params, ctx.layout, name, index, ratio)


def run_pick(ctx: Context, name: str, trials: list[Trial]) -> Tracked:
    """The end of candidate ``name``'s search: its MLflow run, every trial a nested run under it,
    and the best trial made the candidate (:func:`shrinkflow.tasks.training.train.pick_trial`)."""

    def pick(run: str) -> ModelRecord:
        log_trial = _trial_logger(ctx, name, run)
        for trial in trials:
            log_trial(trial)
        return pick_trial(ctx.params, ctx.layout, name, trials)

    return _model_stage(ctx, name, pick)


def planned_work(params: Params, name: str) -> int:
    """Candidate ``name``'s epochs of training (each trial's, for a search): the fan-out's
    measure of how long a search's chain of rounds is."""
    cand = params.shrink.candidates[name]
    if not STRATEGIES[cand.strategy].trains:
        return 0
    phase = cand.sparsity_phase()
    return candidate_train_config(params, name).epochs + (phase[0] if phase else 0)


def fan_out_plan(params: Params, names: list[str]) -> FanOut:
    """The jobs of candidates ``names``: each search's trials as jobs of their own, planned
    ``shrink.workers`` to a round however many run at once, so the trials are the same whoever
    runs them."""
    candidates = params.shrink.candidates
    searches = {n: candidates[n].search for n in names if candidates[n].search is not None}
    return FanOut({n: planned_work(params, n) for n in names}, searches, params.shrink.workers)


def fan_out_work(params: Params, layout: Layout) -> float:
    """Seconds of the shrink stage's own work along its critical path: every job of the fan-out
    (each trial of a search apart) at its recorded training time, in the order the flow takes
    them, on ``shrink.workers`` workers with nothing lost between jobs; then the candidates that
    run alone, one at a time."""
    records = {name: load_record(layout, name) for name in params.shrink.candidates}

    def seconds(job: Job) -> float:
        if job.kind == "trial":
            return records[job.name].trials[job.index]["seconds"]
        return 0.0 if job.kind == "pick" else records[job.name].train_seconds

    def trial(job: Job) -> Trial:
        return Trial(**records[job.name].trials[job.index])

    together, alone = fan_out(params)
    groups = [(together, params.shrink.workers), *(([name], 1) for name in alone)]
    ends = [simulate(fan_out_plan(params, names), n, seconds, trial) for names, n in groups]
    return sum(max((end for _, end, _ in ran), default=0.0) for ran in ends)


def _trial_logger(ctx: Context, name: str, candidate_run: str):
    """Log each trial of a ratio search as a nested run under the candidate's run (FAILED, with
    its error, for a trial that failed)."""

    def log_trial(trial: Trial) -> None:
        run = ctx.tracker.start_run(
            f"{name}-trial{trial.index}",
            candidate_run,
            tags={"shrinkflow.stage": "search-trial", "shrinkflow.candidate": name},
        )
        figures = {
            "val_acc": trial.val_acc,
            "val_delta": trial.delta,
            "val_lower": trial.lower,
            "p_value": trial.p_value,
            "passed": float(trial.passed),
            "train_seconds": trial.seconds,
        }
        ctx.tracker.log(
            run,
            params={"trial": trial.index, "ratio": trial.ratio},
            metrics={k: v for k, v in figures.items() if v is not None},
            tags={"shrinkflow.error": trial.error[:5000]} if trial.error else None,
        )
        ctx.tracker.end_run(run, "FAILED" if trial.error else "FINISHED")

    return log_trial


def _model_stage(ctx: Context, name: str, train) -> Tracked:
    stop.check()  # queued behind an interrupted run's candidates: no run to open and close
    stage = "baseline" if name == "baseline" else "shrink"
    run = ctx.tracker.start_run(
        name, ctx.parent_run, tags={"shrinkflow.stage": stage, "shrinkflow.candidate": name}
    )
    try:
        with progress.showing(name), user_code(ctx.params, ctx.layout):
            record = train(run)
    except BaseException as exc:  # interrupted (Ctrl-C, SIGTERM under the CLI): KILLED, not RUNNING
        _close(ctx, run, exc, {"shrinkflow.status": "failed"})
        raise
    log_record(ctx.tracker, run, record)
    ctx.tracker.log_artifact(run, ctx.layout.checkpoint(name))
    if table := (record.options.get("sensitivity") or {}).get("file"):  # the table a budget allocated from
        for path in (ctx.layout.root / table, (ctx.layout.root / table).with_suffix(".png")):
            ctx.tracker.log_artifact(run, path, "sensitivity")
    ctx.tracker.end_run(run)
    return Tracked(record, run)


def run_evaluate(ctx: Context, runs: dict[str, str] | None = None) -> pd.DataFrame:
    """Measure every model; its figures also go to the model's own run when ``runs`` names it."""
    _all_cores()
    run = ctx.tracker.start_run("evaluate", ctx.parent_run, tags={"shrinkflow.stage": "evaluate"})
    with ends_failed(ctx, run), user_code(ctx.params, ctx.layout):
        table = evaluate_models(ctx.params, ctx.layout)
        if ctx.params.tracking.tensorboard:
            records = [load_record(ctx.layout, n) for n in table["name"] if ctx.layout.record(n).is_file()]
            tensorboard.write_runs(ctx.layout.runs, records, table)
        for row in table.to_dict("records"):
            if row["status"] == "ok" and (model_run := (runs or {}).get(row["name"])):
                ctx.tracker.log(model_run, metrics={k: row[k] for k in _MEASURED})
        ctx.tracker.log_artifact(run, ctx.layout.candidates_csv)
        ctx.tracker.log_artifact(run, ctx.layout.metrics_json)
    ctx.tracker.end_run(run)
    return table


# Every measured figure of a model's row (not its labels, status or ratios to the baseline).
_MEASURED = tuple(
    c
    for c in COLUMNS
    if c.endswith(("_acc", "_f1", "_ms", "_delta", "_lower", "_upper", "_p"))
    or c in ("params", "flops", "size_bytes", "sparsity", "compressed_bytes")
)


def discard_decision(layout: Layout) -> None:
    """Remove a previous run's decision files (the promote stage's own outputs), so a failed or
    interrupted promotion never leaves an older winner beside a newer table."""
    for path in (layout.promotion_json, layout.report_md, layout.pareto_png):
        if path.is_file() and not path.is_symlink():
            path.unlink()
            log.info("removed %s: it described an earlier promotion", path)


def publish_decision(layout: Layout, decision: Verdict) -> None:
    """Write what reviewers read; called by ``promote`` before it counts an alias move as done."""
    table = load_table(layout.candidates_csv)
    write_json(layout.promotion_json, verdict_json(decision))
    pareto_plot(table, decision, layout.pareto_png)
    write_text(layout.report_md, markdown_report(table, decision))


def run_promote(ctx: Context, extra_tags: dict[str, str] | None = None, force: bool = False) -> Verdict:
    """Register the winner under the registry rules, then draw and write what reviewers read.

    The earlier decision goes first, so whatever stops this stage (an error, Ctrl-C, SIGTERM, a
    full disk) leaves either this run's decision, consistent with the registry, or none."""
    run = ctx.tracker.start_run("promote", ctx.parent_run, tags={"shrinkflow.stage": "promote"})
    try:
        discard_decision(ctx.layout)
        tags = {
            "code_version": code_version(),
            **provenance_tags(ctx.params, ctx.layout),
            **(extra_tags or {}),
        }
        with user_code(ctx.params, ctx.layout):  # a factory model's package travels with its version
            decision = promote(
                ctx.params,
                ctx.layout,
                ctx.tracker,
                run,
                tags,
                force,
                publish=lambda d: publish_decision(ctx.layout, d),
            )
    except BaseException as exc:
        with contextlib.suppress(OSError):  # a read-only project cannot even delete them
            discard_decision(ctx.layout)
        _close(ctx, run, exc)
        if isinstance(exc, OSError):
            raise PromotionError(
                f"promotion stopped: {_os_error(exc)}; no alias moved and no decision written "
                "(a version it registered stays tagged registration=pending; the next run completes it)"
            ) from exc
        raise
    try:
        ctx.tracker.log(
            run,
            params={"winner": decision.winner, **ctx.params.promote.model_dump()},
            metrics={
                "val_acc": decision.val_acc,
                "gate_acc": decision.gate_acc,
                "test_acc": decision.test_acc,
                **{
                    f"gate_{k}": getattr(decision.gate, k)
                    for k in ("delta", "lower", "upper", "p_value", "n")
                },
                **{f"test_{k}": getattr(decision.test, k) for k in ("delta", "lower", "upper")},
            },
            tags={
                "verdict": decision.kind,
                "gate_summary": decision.summary,
                "certified_by": decision.certified_by,
            },
        )
        for path in (ctx.layout.promotion_json, ctx.layout.pareto_png, ctx.layout.report_md):
            ctx.tracker.log_artifact(run, path)
    except Exception as exc:
        with contextlib.suppress(Exception):
            ctx.tracker.end_run(run, "FAILED")
        raise TrackingUnavailable(
            f"the decision is made and written ({decision.kind}, {_registered(decision)}), but "
            f"logging it to MLflow at {ctx.tracker.uri} failed: {named_first_line(exc)}"
        ) from exc
    ctx.tracker.end_run(run)
    return decision


def _registered(decision: Verdict) -> str:
    reg = decision.registry
    if not reg or not reg.version:
        return "nothing registered"
    alias = f" @{reg.alias}" if reg.alias else ""
    return f"{reg.model_name} v{reg.version}{alias}"


def _os_error(exc: OSError) -> str:
    where = f" ({exc.filename})" if exc.filename else ""
    return f"{exc.strerror or exc}{where}"
