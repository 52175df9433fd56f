"""The shrinkflow Prefect flow: prepare -> baseline -> shrink (fan-out) -> evaluate -> promote.

Wiring only: every task is a function from ``tasks.stages``; this module adds Prefect's
orchestration (task runs, parallelism, logging) and nothing else.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from tasks import stages
from tasks.config import load_params
from tasks.promote import Decision
from tasks.report import format_table

prepare = task(stages.run_prepare, name="prepare", cache_policy=NO_CACHE)
baseline = task(stages.run_baseline, name="baseline", cache_policy=NO_CACHE)
shrink = task(stages.run_candidate, name="shrink", cache_policy=NO_CACHE, task_run_name="shrink-{name}")
evaluate = task(stages.run_evaluate, name="evaluate", cache_policy=NO_CACHE)
promote = task(stages.run_promote, name="promote", cache_policy=NO_CACHE)


@flow(name="shrinkflow")
def pipeline(params_file: str = "params.yaml", overrides: list[str] | None = None, root: str = ".") -> dict:
    """Train a baseline, shrink it every declared way, and register the smallest model within
    tolerance. Returns the promotion decision as a dict."""
    logger = get_run_logger()
    ctx = stages.Context.load(params_file, tuple(overrides or ()), root)
    parent = ctx.tracker.start_run(
        "pipeline", tags={"shrinkflow.stage": "pipeline", "prefect.flow_run_id": str(flow_run.id)}
    )
    ctx = stages.Context(ctx.params, ctx.layout, ctx.tracker, parent)
    ctx.tracker.log(parent, params={"params_file": params_file, "overrides": " ".join(overrides or ())})
    try:
        prepare(ctx)
        base = baseline(ctx)
        futures = {name: shrink.submit(ctx, name) for name in ctx.params.shrink.candidates}
        results = {name: f.result(raise_on_failure=False) for name, f in futures.items()}
        for name, result in results.items():
            if isinstance(result, BaseException):
                logger.warning("candidate %s failed: %s", name, result)
        runs = {"baseline": base.run_id} | {
            n: r.run_id for n, r in results.items() if isinstance(r, stages.Tracked)
        }
        table = evaluate(ctx, runs)
        decision: Decision = promote(ctx, {"prefect_flow_run_id": str(flow_run.id)})
    except BaseException:
        ctx.tracker.end_run(parent, "FAILED")
        raise
    ctx.tracker.log_artifact(parent, ctx.layout.candidates_csv)
    ctx.tracker.log_artifact(parent, ctx.layout.promotion_json)
    ctx.tracker.end_run(parent)
    logger.info("candidates:\n%s", format_table(table, decision.winner))
    logger.info("promoted %s: %s", decision.winner, decision.reason)
    return decision.__dict__


def run(
    params_file: str | Path = "params.yaml", overrides: tuple[str, ...] = (), root: str | Path = "."
) -> dict:
    """Validate the config, then run the flow with a task runner sized by ``shrink.workers``."""
    params = load_params(params_file, overrides)
    runner = ThreadPoolTaskRunner(max_workers=params.shrink.workers)
    return pipeline.with_options(task_runner=runner)(str(params_file), list(overrides), str(root))


if __name__ == "__main__":
    from flows.cli import app

    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "tasks,models")
    app(["run", *__import__("sys").argv[1:]])
