"""The shrinkflow Prefect flow: prepare -> baseline -> sensitivity -> shrink (fan-out) -> evaluate ->
promote.

Wiring only: every task is a function from ``shrinkflow.tasks.pipeline.stages``; this module adds Prefect's
orchestration (task runs, parallelism, logging) and nothing else.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from functools import partial
from pathlib import Path

from prefect import flow, get_client, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.settings import PREFECT_UI_URL
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from shrinkflow.tasks.config import Params, ShrinkConfig, load_params
from shrinkflow.tasks.decision.decide import Verdict, verdict_json
from shrinkflow.tasks.decision.report import links_section
from shrinkflow.tasks.pipeline import cache, stages
from shrinkflow.tasks.training import stop


def _baseline_key(_, args: dict) -> str:
    ctx: stages.Context = args["ctx"]
    return cache.baseline_key(ctx.params, ctx.layout, ctx.tracker.identity())


def _candidate_key(_, args: dict) -> str:
    ctx: stages.Context = args["ctx"]
    return cache.candidate_key(ctx.params, ctx.layout, args["name"], ctx.tracker.identity())


def _trial_key(_, args: dict) -> str:
    ctx: stages.Context = args["ctx"]
    return cache.trial_key(ctx.params, ctx.layout, args["name"], args["index"], args["ratio"])


def _pick_key(_, args: dict) -> str:
    ctx: stages.Context = args["ctx"]
    return cache.candidate_key(ctx.params, ctx.layout, args["name"], ctx.tracker.identity(), args["trials"])


prepare = task(stages.run_prepare, name="prepare", cache_policy=NO_CACHE)
# Cached on what its weights depend on (data, config, code, tracking store); see
# reuse_or_train_baseline.
baseline = task(stages.run_baseline, name="baseline", cache_key_fn=_baseline_key)
# Not cached by Prefect: a table whose key still holds is kept by the stage itself.
sensitivity = task(
    stages.run_sensitivity, name="sensitivity", task_run_name="sensitivity-{strategy}", cache_policy=NO_CACHE
)
shrink = task(stages.run_candidate, name="shrink", task_run_name="shrink-{name}", cache_key_fn=_candidate_key)
# A search's trials are tasks of their own, cached apart (a finished trial is not redone after an
# interruption); its pick, cached on the candidate and the trials it chose from, ends the search.
trial = task(stages.run_trial, name="trial", task_run_name="trial-{name}-{ratio}", cache_key_fn=_trial_key)
pick = task(stages.run_pick, name="pick", task_run_name="pick-{name}", cache_key_fn=_pick_key)
JOBS = {"shrink": shrink, "trial": trial, "pick": pick}  # the task that runs each kind of FanOut job
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
    stop.clear()
    ctx = stages.Context.load(params_file, tuple(overrides or ()), root)
    tag_flow_run(run_tags(ctx.params))
    with stages.pipeline_run(ctx, flow_run_id=str(flow_run.id)) as ctx:
        link_to_flow_run(ctx, [ctx.parent_run])
        prepare(ctx)
        base = reuse_or_train_baseline(ctx)
        measure_sensitivity(ctx)
        shrunk = shrink_all(ctx)
        for name, failure in shrunk.items():
            if isinstance(failure, BaseException):
                logger.warning("candidate %s failed: %s", name, failure)
        runs = stages.run_ids({"baseline": base, **shrunk})
        table = evaluate(ctx, runs)
        decision: Verdict = promote(ctx, {"prefect_flow_run_id": str(flow_run.id)}, force)
        stages.summarise(ctx, runs)
        link_to_flow_run(ctx, runs.values())
        publish(ctx, decision, table)
    tag_flow_run([f"outcome:{decision.kind}"])
    logger.info("%s -> %s: %s", decision.winner, decision.kind, decision.kind_reason)
    return verdict_json(decision)


def run_name(params: Params) -> str:
    """A flow run's name: what is shrunk, on which data, when (e.g.
    ``shrink-basenet-digits-20261130-2350``)."""
    return f"shrink-{params.model.arch}-{params.data.source}-{datetime.now():%Y%m%d-%H%M%S}"


def run_tags(params: Params) -> list[str]:
    """The tags a flow run is found by in Prefect's UI; ``outcome:<verdict>`` is added at the end."""
    return [
        "shrinkflow",
        f"data:{params.data.source}",
        f"arch:{params.model.arch}",
        f"model:{params.promote.model_name}",
    ]


def tag_flow_run(tags: Iterable[str]) -> None:
    """Add ``tags`` to this flow run (a run started by the CLI has no deployment to inherit any from)."""
    with get_client(sync_client=True) as client:
        now = client.read_flow_run(flow_run.id).tags  # the run context keeps the tags it started with
        client.update_flow_run(flow_run.id, tags=sorted({*now, *tags}))


def flow_run_links() -> dict[str, str]:
    """This flow run as MLflow tags: its id, name and, where Prefect knows its UI, its page."""
    links = {"prefect.flow_run_id": str(flow_run.id), "prefect.flow_run_name": str(flow_run.name)}
    if PREFECT_UI_URL.value():
        links["prefect.flow_run_url"] = str(flow_run.ui_url)
    return links


def link_to_flow_run(ctx: stages.Context, runs: Iterable[str]) -> None:
    """Tag the MLflow ``runs`` with this flow run, so each leads back to it."""
    links = flow_run_links()
    for run in runs:
        ctx.tracker.log(run, tags=links)


def reuse_or_train_baseline(ctx: stages.Context) -> stages.Tracked:
    """The baseline from Prefect's cache when its data, config and code are unchanged and its
    checkpoint is still on disk as recorded; otherwise (or if it is not) a freshly trained one."""
    state = baseline(ctx, return_state=True)
    if _reusable(ctx, "baseline", state):
        return state.result()
    return baseline.with_options(refresh_cache=True)(ctx)


def measure_sensitivity(ctx: stages.Context) -> None:
    """The sensitivity tables the budget candidates need, one task per strategy, side by side;
    one that fails is logged, and the candidates that need it fail alone, saying so."""
    futures = {s: sensitivity.submit(ctx, s) for s in stages.sensitivity_strategies(ctx.params)}
    for strategy, future in futures.items():
        failure = _waited(future).result(raise_on_failure=False)
        if isinstance(failure, BaseException):
            get_run_logger().warning("sensitivity table for %s failed: %s", strategy, failure)
    stages.index_sensitivity(ctx)


def shrink_all(ctx: stages.Context) -> dict[str, stages.Tracked | BaseException]:
    """Every candidate's result (or failure): those that may train together filling the workers,
    a search's trials as tasks of their own; then the rest one at a time. Interrupted (Ctrl-C,
    SIGTERM), the work still running stops at its next batch and ends its MLflow run KILLED."""
    together, alone = stages.fan_out(ctx.params)
    try:
        shrunk = fill_workers(ctx, together, ctx.params.shrink.workers)
        for name in alone:  # steps that patch torch process-wide run with the process to themselves
            shrunk |= fill_workers(ctx, [name], 1)
    except BaseException as exc:
        if not isinstance(exc, Exception):
            stop.request(f"the run was interrupted ({type(exc).__name__})")
        raise
    return {name: shrunk[name] for name in ctx.params.shrink.candidates}


def fill_workers(
    ctx: stages.Context, names: list[str], workers: int
) -> dict[str, stages.Tracked | BaseException]:
    """Run candidates ``names`` with never more than ``workers`` jobs submitted at once, taking
    the next job (in :class:`~shrinkflow.tasks.training.search.FanOut`'s order) as each one finishes, so a
    worker is never idle while a trial or a candidate could run."""
    plan = stages.fan_out_plan(ctx.params, names)
    running = {}
    while not plan.finished:
        for job in plan.take(workers - len(running)):
            running[JOBS[job.kind].submit(ctx, *job.arguments())] = job
        future = _next_done(running)
        job = running.pop(future)
        outcome = future.result(raise_on_failure=False)
        if isinstance(outcome, BaseException) and not isinstance(outcome, Exception):
            raise outcome  # interrupted
        if not isinstance(outcome, BaseException) and not _reusable(ctx, job.name, future.state):
            running[JOBS[job.kind].with_options(refresh_cache=True).submit(ctx, *job.arguments())] = job
            continue
        plan.done(job, outcome)
    return plan.results


def _next_done(running: dict):
    """The first of the ``running`` futures to finish, looked for in half-second steps: a signal
    is handled by the main thread, which a single blocking wait would keep asleep until the
    work's last epoch."""
    while True:
        for future in running:
            if future.wrapped_future.done():
                return future
        next(iter(running)).wait(timeout=0.5)


def _waited(future):
    """``future`` once done, waited for in half-second steps (see :func:`_next_done`)."""
    while not future.wrapped_future.done():
        future.wait(timeout=0.5)
    return future


def _reusable(ctx: stages.Context, name: str, state) -> bool:
    """Whether ``state`` is fresh work, or a cached result (a model stage's or a trial's) whose
    checkpoint is still intact."""
    if state.name != "Cached":
        return True
    result = state.result()
    if isinstance(result, stages.Tracked):
        what, intact = name, cache.intact(ctx.layout, name, result.record)
        where = f"checkpoint {result.record.sha256[:12]}, MLflow run {result.run_id}"
    else:
        what = f"{name}'s trial at ratio {result.ratio:g}"
        intact = cache.trial_intact(ctx.layout, name, result)
        where = f"checkpoint {(result.sha256 or '')[:12]}"
    if intact:
        get_run_logger().info(
            "%s reused from cache: its inputs, config and code are unchanged (%s)", what, where
        )
        return True
    get_run_logger().info("cached %s's checkpoint is missing or changed on disk; retraining it", what)
    return False


def publish(ctx: stages.Context, decision: Verdict, table) -> None:
    """The run's report, headed by links to its MLflow runs and registered version, and the
    candidates table as Prefect artefacts on the flow run."""
    links = links_section(
        ctx.tracker.uri,
        ctx.tracker.experiment_id,
        ctx.parent_run,
        decision.registry,
        str(flow_run.name),
        flow_run_links().get("prefect.flow_run_url"),
    )
    title, report = ctx.layout.report_md.read_text().split("\n", 1)
    report = "\n".join([title, "", *links, report])
    create_markdown_artifact(
        key="shrink-report", markdown=report, description=f"{decision.winner}: {decision.kind}"
    )
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
    return pipeline.with_options(
        task_runner=task_runner(params.shrink), flow_run_name=partial(run_name, params)
    )


def run(
    params_file: str | Path = "params.yaml",
    overrides: tuple[str, ...] = (),
    root: str | Path = ".",
    force: bool = False,
) -> dict:
    """Run the whole flow once, in this process."""
    return configured(params_file, overrides)(str(params_file), list(overrides), str(root), force)
