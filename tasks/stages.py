"""Each stage as one call: do the work, then log its result to MLflow in one place.

The Prefect flow wraps these functions as tasks; ``shrinkflow stage <name>`` (what ``dvc.yaml``
runs) calls them directly. Both paths therefore execute exactly the same code.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from tasks.config import Params, load_params
from tasks.evaluate import evaluate_models
from tasks.layout import Layout
from tasks.prepare import Manifest, load_split, prepare
from tasks.promote import Decision, promote
from tasks.tracking import Tracker
from tasks.train import ModelRecord, shrink_candidate, threads_per_worker, train_baseline

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
        params = load_params(params_file, overrides)
        return cls(
            params, Layout.from_params(params, root), Tracker.for_project(root, params.tracking.experiment)
        )


@dataclass(frozen=True)
class Tracked:
    """A model stage's record plus the MLflow run it was logged to."""

    record: ModelRecord
    run_id: str


def run_prepare(ctx: Context) -> Manifest:
    run = ctx.tracker.start_run("prepare", ctx.parent_run, tags={"shrinkflow.stage": "prepare"})
    manifest = prepare(ctx.params, ctx.layout)
    ctx.tracker.log(run, params=ctx.params.data.model_dump(), tags={"data_fingerprint": manifest.fingerprint})
    ctx.tracker.log_dataset(run, manifest, load_split(ctx.layout, "train")[0].numpy(), ctx.layout.prepared)
    ctx.tracker.log_artifact(run, ctx.layout.manifest)
    ctx.tracker.end_run(run)
    return manifest


def run_baseline(ctx: Context) -> Tracked:
    torch.set_num_threads(os.cpu_count() or 1)
    return _model_stage(ctx, "baseline", lambda: train_baseline(ctx.params, ctx.layout))


def run_candidate(ctx: Context, name: str) -> Tracked:
    # The same thread count under Prefect's runners and under `dvc repro`, so both compute the
    # same floats; and N concurrent candidates never oversubscribe the cores.
    torch.set_num_threads(threads_per_worker(ctx.params.shrink.workers))
    return _model_stage(ctx, name, lambda: shrink_candidate(ctx.params, ctx.layout, name))


def _model_stage(ctx: Context, name: str, train) -> Tracked:
    stage = "baseline" if name == "baseline" else "shrink"
    run = ctx.tracker.start_run(
        name, ctx.parent_run, tags={"shrinkflow.stage": stage, "shrinkflow.candidate": name}
    )
    try:
        record = train()
    except Exception as exc:
        ctx.tracker.log(
            run, tags={"shrinkflow.status": "failed", "shrinkflow.error": f"{type(exc).__name__}: {exc}"}
        )
        ctx.tracker.end_run(run, "FAILED")
        raise
    ctx.tracker.log_record(run, record)
    ctx.tracker.log_artifact(run, ctx.layout.checkpoint(name))
    ctx.tracker.end_run(run)
    return Tracked(record, run)


def run_evaluate(ctx: Context, runs: dict[str, str] | None = None) -> pd.DataFrame:
    """Measure every model; its figures also go to the model's own run when ``runs`` names it."""
    run = ctx.tracker.start_run("evaluate", ctx.parent_run, tags={"shrinkflow.stage": "evaluate"})
    table = evaluate_models(ctx.params, ctx.layout)
    for row in table.to_dict("records"):
        if row["status"] == "ok" and (model_run := (runs or {}).get(row["name"])):
            ctx.tracker.log(model_run, metrics={k: row[k] for k in _MEASURED})
    ctx.tracker.log_artifact(run, ctx.layout.candidates_csv)
    ctx.tracker.log_artifact(run, ctx.layout.metrics_json)
    ctx.tracker.end_run(run)
    return table


_MEASURED = ("val_acc", "test_acc", "macro_f1", "params", "flops", "size_bytes", "latency_ms")


def run_promote(ctx: Context, extra_tags: dict[str, str] | None = None) -> Decision:
    run = ctx.tracker.start_run("promote", ctx.parent_run, tags={"shrinkflow.stage": "promote"})
    try:
        decision = promote(ctx.params, ctx.layout, ctx.tracker, run, extra_tags)
    except Exception as exc:
        ctx.tracker.log(run, tags={"shrinkflow.error": f"{type(exc).__name__}: {exc}"})
        ctx.tracker.end_run(run, "FAILED")
        raise
    ctx.tracker.log(run, params={"winner": decision.winner, **ctx.params.promote.model_dump()},
                    metrics={"val_acc": decision.val_acc, "test_acc": decision.test_acc})  # fmt: skip
    ctx.tracker.log_artifact(run, ctx.layout.promotion_json)
    ctx.tracker.end_run(run)
    return decision
