"""The shrinkflow Prefect flow: prepare -> baseline -> shrink (fan-out) -> evaluate -> promote.

Wiring only: every task is a function from ``shrinkflow.tasks.stages``; this module adds Prefect's
orchestration (task runs, parallelism, logging) and nothing else.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from shrinkflow.tasks import cache, stages
from shrinkflow.tasks.config import ShrinkConfig, load_params
from shrinkflow.tasks.decide import Verdict


def _baseline_key(_, args: dict) -> str:
    ctx: stages.Context = args["ctx"]
    return cache.baseline_key(ctx.params, ctx.layout, ctx.tracker.identity())


def _candidate_key(_, args: dict) -> str:
    ctx: stages.Context = args["ctx"]
    return cache.candidate_key(ctx.params, ctx.layout, args["name"], ctx.tracker.identity())


prepare = task(stages.run_prepare, name="prepare", cache_policy=NO_CACHE)
# Cached on what its weights depend on (data, config, code, tracking store); see
# reuse_or_train_baseline.
baseline = task(stages.run_baseline, name="baseline", cache_key_fn=_baseline_key)
shrink = task(stages.run_candidate, name="shrink", task_run_name="shrink-{name}", cache_key_fn=_candidate_key)
evaluate = task(stages.run_evaluate, name="evaluate", cache_policy=NO_CACHE)
promote = task(stages.run_promote, name="promote", cache_policy=NO_CACHE)


@flow(name="shrinkflow")
def pipeline(
    params_file: str = "params.yaml", overrides: list[str] | None = None, root: str = ".", force: bool = False
) -> dict:
    """Train a baseline, shrink it every declared way, and register the smallest model within
    tolerance (``force``: make it champion even if the registry rules say challenger).
    Returns the promotion decision as a dict."""
    logger = get_run_logger()
    ctx = stages.Context.load(params_file, tuple(overrides or ()), root)
    with stages.pipeline_run(ctx, flow_run_id=str(flow_run.id)) as ctx:
        prepare(ctx)
        base = reuse_or_train_baseline(ctx)
        together, alone = stages.fan_out(ctx.params)
        futures = {name: shrink.submit(ctx, name) for name in together}
        shrunk = {name: settle(ctx, name, future) for name, future in futures.items()}
        for name in alone:  # steps that patch torch process-wide run with the process to themselves
            shrunk[name] = settle(ctx, name, shrink.submit(ctx, name))
        for name, failure in shrunk.items():
            if isinstance(failure, BaseException):
                logger.warning("candidate %s failed: %s", name, failure)
        runs = stages.run_ids({"baseline": base, **shrunk})
        table = evaluate(ctx, runs)
        decision: Verdict = promote(ctx, {"prefect_flow_run_id": str(flow_run.id)}, force)
        stages.summarise(ctx, runs)
        publish(ctx.layout.report_md.read_text(), table)
    logger.info("%s -> %s: %s", decision.winner, decision.verdict, decision.verdict_reason)
    return asdict(decision)


def reuse_or_train_baseline(ctx: stages.Context) -> stages.Tracked:
    """The baseline from Prefect's cache when its data, config and code are unchanged and its
    checkpoint is still on disk as recorded; otherwise (or if it is not) a freshly trained one."""
    state = baseline(ctx, return_state=True)
    if _reusable(ctx, "baseline", state):
        return state.result()
    return baseline.with_options(refresh_cache=True)(ctx)


def settle(ctx: stages.Context, name: str, future) -> stages.Tracked | BaseException:
    """A candidate's result (or its failure); a cached one whose checkpoint changed is redone."""
    result = future.result(raise_on_failure=False)
    if isinstance(result, BaseException) or _reusable(ctx, name, future.state):
        return result
    return shrink.with_options(refresh_cache=True).submit(ctx, name).result(raise_on_failure=False)


def _reusable(ctx: stages.Context, name: str, state) -> bool:
    """Whether ``state`` is fresh work, or a cached result whose checkpoint is still intact."""
    if state.name != "Cached":
        return True
    tracked: stages.Tracked = state.result()
    if cache.intact(ctx.layout, name, tracked.record):
        get_run_logger().info(
            "%s reused from cache: its inputs, config and code are unchanged (checkpoint %s, MLflow run %s)",
            name,
            tracked.record.sha256[:12],
            tracked.run_id,
        )
        return True
    get_run_logger().info("cached %s's checkpoint is missing or changed on disk; retraining it", name)
    return False


def publish(report: str, table) -> None:
    """The run's report and candidates table as Prefect artefacts on the flow run."""
    create_markdown_artifact(key="shrink-report", markdown=report, description="decision and candidates")
    rows = table.astype(object).where(table.notna(), None).to_dict("records")
    create_table_artifact(key="candidates", table=rows, description="every candidate, measured")


def task_runner(cfg: ShrinkConfig) -> TaskRunner:
    """The runner the shrink fan-out uses, as ``shrink.runner`` names it."""
    if cfg.runner == "process":
        return ProcessPoolTaskRunner(max_workers=cfg.workers)
    if cfg.runner == "dask":
        from prefect_dask import DaskTaskRunner  # imported only when asked for

        if cfg.dask_address:
            return DaskTaskRunner(address=cfg.dask_address)
        # One single-threaded worker process per concurrent candidate: torch's own threads
        # (cores // workers, set by the task) do the parallel maths inside each.
        return DaskTaskRunner(
            cluster_kwargs={
                "n_workers": cfg.workers,
                "threads_per_worker": 1,
                "processes": True,
                "dashboard_address": None,
            }
        )
    return ThreadPoolTaskRunner(max_workers=cfg.workers)


def configured(params_file: str | Path = "params.yaml", overrides: tuple[str, ...] = ()):
    """The flow with the task runner ``params.shrink`` asks for (validates the config first)."""
    params = load_params(params_file, overrides)
    return pipeline.with_options(task_runner=task_runner(params.shrink))


def run(
    params_file: str | Path = "params.yaml",
    overrides: tuple[str, ...] = (),
    root: str | Path = ".",
    force: bool = False,
) -> dict:
    """Run the whole flow once, in this process."""
    return configured(params_file, overrides)(str(params_file), list(overrides), str(root), force)
