"""A ratio search's trials as separate jobs: the planner of rounds and the fan-out's order on plain
tables, then a search under the Prefect flow against the same search run serially (the DVC stage)."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from shrinkflow.tasks.config import SearchConfig, parse_params
from shrinkflow.tasks.training.search import (
    FanOut,
    NoTrialRan,
    Trial,
    best_trial,
    failed,
    next_round,
    run_search,
    simulate,
)
from tests.conftest import copy_project, small_raw, write_params

# --- the planner, on plain tables ------------------------------------------------------------


def _ran(index: int, ratio: float, passed: bool) -> Trial:
    return Trial(index, ratio, 90.0, 0.0, -1.0 if passed else -9.0, 0.5, passed)


def _search(cfg: SearchConfig, width: int, passes, fails=()) -> list[list[float]]:
    """The rounds a search plans when ``passes(ratio)`` says which ratios pass; a ratio in
    ``fails`` raises instead (a failed trial)."""
    trials: list[Trial] = []
    rounds = []
    while ratios := next_round(cfg, trials, width):
        rounds.append(list(ratios))
        for ratio in ratios:
            index = len(trials)
            trials.append(
                failed(index, ratio, RuntimeError("boom"))
                if ratio in fails
                else _ran(index, ratio, passes(ratio))
            )
    assert len(trials) <= cfg.trials and len(set(t.ratio for t in trials)) == len(trials)
    return rounds


def _serial_bisect(cfg: SearchConfig, passes) -> list[float]:
    """The serial bisection this module replaced, written out: low, high, then halves."""
    tried = [cfg.low]
    if not passes(cfg.low) or cfg.trials == 1:
        return tried
    tried.append(cfg.high)
    if passes(cfg.high):
        return tried
    while len(tried) < cfg.trials:
        good = max(r for r in tried if passes(r))
        bad = min(r for r in tried if not passes(r) and r > good)
        tried.append(round((good + bad) / 2, 6))
    return tried


BELOW = {  # which ratios pass: a clean threshold, and a noisy curve (0.7 fails between passes)
    "clean 0.62": lambda r: r <= 0.62,
    "noisy": lambda r: r < 0.5 or r in (0.5, 0.6, 0.8),
    "nothing passes": lambda r: False,
    "everything passes": lambda r: True,
}


@pytest.mark.parametrize("curve", BELOW, ids=list(BELOW))
@pytest.mark.parametrize("trials", [1, 2, 3, 5])
def test_one_worker_plans_the_serial_bisection(curve, trials):
    cfg = SearchConfig(mode="bisect", low=0.4, high=0.9, trials=trials)
    rounds = _search(cfg, 1, BELOW[curve])
    assert all(len(r) == 1 for r in rounds)
    assert [r[0] for r in rounds] == _serial_bisect(cfg, BELOW[curve])


def test_two_workers_bisect_in_pairs_within_the_same_budget():
    cfg = SearchConfig(mode="bisect", low=0.75, high=0.95, trials=3)
    threshold = BELOW["clean 0.62"]
    # The CIFAR benchmark's search: the same three trials, in two rounds instead of three.
    assert _search(cfg, 2, lambda r: r <= 0.86) == [[0.75, 0.95], [0.85]]
    wide = SearchConfig(mode="bisect", low=0.3, high=0.9, trials=6)
    # low and high, then the gap between the largest pass and the smallest failure in thirds.
    assert _search(wide, 2, threshold) == [[0.3, 0.9], [0.5, 0.7], [0.566667, 0.633333]]
    assert _search(wide, 3, threshold) == [[0.3, 0.6, 0.9], [0.675, 0.75, 0.825]]
    assert _search(wide, 4, threshold) == [[0.3, 0.5, 0.7, 0.9], [0.566667, 0.633333]]


def test_a_bisection_stops_where_the_serial_one_would():
    cfg = SearchConfig(mode="bisect", low=0.4, high=0.9, trials=6)
    assert _search(cfg, 2, BELOW["nothing passes"]) == [[0.4, 0.9]], "low fails: nothing larger is tried"
    assert _search(cfg, 2, BELOW["everything passes"]) == [[0.4, 0.9]], "high passes: nothing above it"
    # A pass above a failure (noise) ends the search when nothing failed above the largest pass.
    assert _search(cfg, 4, lambda r: r != 0.566667) == [[0.4, 0.566667, 0.733333, 0.9]]


@pytest.mark.parametrize("width", [1, 2, 3])
def test_a_step_walk_runs_its_next_points_together_and_stops_after_a_failure(width):
    cfg = SearchConfig(mode="step", low=0.5, high=0.9, step=0.1, trials=8)
    rounds = _search(cfg, width, lambda r: r <= 0.7)
    walked = [r for each in rounds for r in each]
    assert walked == [0.5, 0.6, 0.7, 0.8, 0.9][: len(walked)] and 0.8 in walked
    assert all(len(r) <= width for r in rounds) and len(rounds) == -(-4 // width)  # stops at 0.8
    assert _search(cfg, width, BELOW["everything passes"])[-1][-1] == 0.9, "never past high"
    budget = SearchConfig(mode="step", low=0.5, high=0.9, step=0.1, trials=3)
    assert sum(len(r) for r in _search(budget, width, BELOW["everything passes"])) == 3


def test_a_failed_trial_counts_as_not_passed_and_is_never_kept():
    cfg = SearchConfig(mode="bisect", low=0.4, high=0.9, trials=4)
    # high raises: bisected as if it had failed the gate.
    assert _search(cfg, 2, BELOW["everything passes"], fails={0.9}) == [[0.4, 0.9], [0.566667, 0.733333]]
    assert _search(cfg, 2, BELOW["everything passes"], fails={0.4}) == [[0.4, 0.9]], "low raised: stop"
    trials = [failed(0, 0.4, RuntimeError("x")), _ran(1, 0.9, True), failed(2, 0.95, ValueError("y"))]
    assert best_trial(trials).ratio == 0.9
    assert best_trial([_ran(0, 0.5, False), failed(1, 0.3, RuntimeError("x"))]).ratio == 0.5
    with pytest.raises(NoTrialRan, match=r"all 2 trials failed \(ratio 0.4: RuntimeError: x; ratio 0.9"):
        best_trial([failed(0, 0.4, RuntimeError("x")), failed(1, 0.9, RuntimeError("y"))])


def test_run_search_numbers_the_trials_in_plan_order():
    cfg = SearchConfig(mode="bisect", low=0.3, high=0.9, trials=4)
    heard = []
    trials = run_search(cfg, 2, lambda i, r: _ran(i, r, r <= 0.62), heard.append)
    assert [(t.index, t.ratio) for t in trials] == [(0, 0.3), (1, 0.9), (2, 0.5), (3, 0.7)]
    assert heard == trials and best_trial(trials).ratio == 0.5


# --- the fan-out's order, on plain tables ----------------------------------------------------


def _simulate(plan: FanOut, workers: int, seconds: dict[str, float], passes) -> tuple[float, list]:
    """Run ``plan`` on ``workers`` simulated workers, each job taking its candidate's ``seconds``
    (a pick none); returns when the last job ends and the (start, job) log."""
    ran = simulate(
        plan,
        workers,
        lambda job: 0.0 if job.kind == "pick" else seconds[job.name],
        lambda job: _ran(job.index, job.ratio, passes(job.ratio)),
    )
    return max(end for _, end, _ in ran), [(start, job) for start, _, job in ran]


def test_a_search_starts_first_and_its_later_rounds_never_queue_behind_plain_candidates():
    """The CIFAR benchmark's shape: five plain candidates and a search of three trials declared
    last, every job the same length. One task per candidate, in declaration order, ended at 5
    (the search's three trials one after another, from 2); as jobs, the search leads and the
    eight jobs fill both workers to the end, at 4."""
    epochs = {"a": 25, "b": 25, "c": 25, "d": 25, "e": 25, "search": 25}
    cfg = SearchConfig(mode="bisect", low=0.75, high=0.95, trials=3)
    plan = FanOut(epochs, {"search": cfg}, width=2)
    end, log = _simulate(plan, 2, {n: 1.0 for n in epochs}, lambda r: r <= 0.86)
    started = {(job.kind, job.name, job.ratio): start for start, job in log}
    assert started[("trial", "search", 0.75)] == started[("trial", "search", 0.95)] == 0.0
    assert started[("trial", "search", 0.85)] == 1.0, "round two as soon as round one is in"
    assert end == 4.0 and list(plan.results) == list(epochs) and plan.results["search"] == "search"
    pick = next(job for _, job in log if job.kind == "pick")
    assert [(t.index, t.ratio) for t in pick.trials] == [(0, 0.75), (1, 0.95), (2, 0.85)]
    assert started[("pick", "search", 0.0)] == 2.0, "picked the moment its last trial ended"


def test_the_fan_out_records_failures_and_picks_a_search_whose_trials_failed():
    plan = FanOut({"s": 2, "p": 1}, {"s": SearchConfig(mode="step", low=0.5, step=0.2, trials=2)}, 2)
    jobs = plan.take(5)
    assert [(j.kind, j.name) for j in jobs] == [("trial", "s"), ("trial", "s"), ("shrink", "p")]
    assert plan.take(1) == [] and not plan.finished
    plan.done(jobs[2], RuntimeError("p diverged"))
    plan.done(jobs[0], RuntimeError("out of memory"))
    assert plan.take(1) == [], "the round is not complete"
    plan.done(jobs[1], _ran(1, 0.7, True))
    (pick,) = plan.take(2)
    assert pick.kind == "pick" and pick.arguments() == ("s", list(pick.trials))
    assert pick.trials[0].error == "RuntimeError: out of memory" and pick.trials[1].passed
    plan.done(pick, "picked")
    assert plan.finished and list(plan.results) == ["s", "p"]
    assert isinstance(plan.results["p"], RuntimeError)


# --- under Prefect, against the serial search -------------------------------------------------

SEARCH = (
    "shrink.epochs=2",
    "shrink.candidates={w50: {strategy: width, ratio: 0.5},"
    " s: {strategy: prune_l1, lr: 0.01, search: {mode: bisect, low: 0.3, high: 0.95, trials: 3}}}",
    "promote.tolerance=5.0",
)


MACHINE = ("worker", "train_seconds", "images_per_second", "seconds")  # where and how fast it ran


def _deterministic(record) -> dict:
    """A model record without what depends on the machine (its trials' times included)."""
    kept = {k: v for k, v in asdict(record).items() if k not in MACHINE}
    kept["trials"] = [{k: v for k, v in t.items() if k not in MACHINE} for t in kept["trials"]]
    return kept


def _task_runs(flow_id: str) -> dict[str, list]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        found = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_id])))
    runs: dict[str, list] = {}
    for run in sorted(found, key=lambda r: r.start_time):
        runs.setdefault(run.name, []).append(run)
    return runs


@pytest.mark.slow
def test_a_search_under_the_flow_runs_its_trials_as_tasks_and_keeps_what_the_serial_search_keeps(
    trained, tmp_path, prefect_server
):
    from prefect import flow
    from prefect.runtime import flow_run
    from prefect.task_runners import ThreadPoolTaskRunner

    from shrinkflow.flows.pipeline import shrink_all
    from shrinkflow.tasks.pipeline.stages import Context, fan_out_work, run_candidate
    from shrinkflow.tasks.store.tracking import Tracker

    def context(root, experiment):
        params, layout = copy_project(trained, root, *SEARCH)
        return Context(params, layout, Tracker.for_project(layout.root, experiment))

    @flow(task_runner=ThreadPoolTaskRunner(max_workers=2))
    def fan(root: str):
        return str(flow_run.id), shrink_all(Context.load(f"{root}/params.yaml", root=root))

    ctx = context(tmp_path / "flow", "shrinkflow")
    flow_id, shrunk = fan(str(ctx.layout.root))
    runs = {name: run for name, (run,) in _task_runs(flow_id).items()}
    assert sorted(runs) == ["pick-s", "shrink-w50", "trial-s-0.3", "trial-s-0.625", "trial-s-0.95"]
    low, high = runs["trial-s-0.3"], runs["trial-s-0.95"]
    assert low.start_time < high.end_time and high.start_time < low.end_time, "round one ran side by side"
    assert runs["trial-s-0.625"].start_time >= max(low.end_time, high.end_time), "round two after it"

    serial = run_candidate(context(tmp_path / "serial", "serial"), "s").record  # `shrinkflow stage shrink`
    record = shrunk["s"].record
    assert [t["ratio"] for t in record.trials] == [0.3, 0.95, 0.625]
    assert _deterministic(record) == _deterministic(serial), "the same trials, ratio kept and sha256"
    kept = next(t for t in record.trials if t["ratio"] == record.options["ratio"])
    assert json.loads(ctx.layout.record("s").read_text())["sha256"] == record.sha256 == kept["sha256"]
    children = ctx.tracker.search_runs(f"tags.mlflow.parentRunId = '{shrunk['s'].run_id}'")
    assert sorted(r.info.run_name for r in children) == ["s-trial0", "s-trial1", "s-trial2"]
    # The benchmark's yardstick: round one side by side, w50 beside whichever ends last, then 0.625.
    t0, t1, t2 = (t["seconds"] for t in record.trials)
    w50 = shrunk["w50"].record.train_seconds
    assert fan_out_work(ctx.params, ctx.layout) == pytest.approx(max(min(t0, t1) + w50, max(t0, t1) + t2))

    # Another candidate changed, and the run was cut short before the search's last trial and
    # its pick were saved: the two finished trials are reused, the rest redone, to the same bytes.
    write_params(ctx.layout.root, *SEARCH, "shrink.candidates.w50.ratio=0.25")
    ctx.layout.checkpoint("s").unlink()
    ctx.layout.trial_checkpoint("s", 0.625).unlink()
    flow_id, again = fan(str(ctx.layout.root))
    states = {name: [r.state.name for r in each] for name, each in _task_runs(flow_id).items()}
    assert states == {
        "shrink-w50": ["Completed"],
        "trial-s-0.3": ["Cached"],
        "trial-s-0.95": ["Cached"],
        "trial-s-0.625": ["Cached", "Completed"],
        "pick-s": ["Cached", "Completed"],
    }
    assert _deterministic(again["s"].record) == _deterministic(record)


def _budget_search(low: float, step: float, high: float) -> str:
    """A params budget searched as ``keep = 1 - ratio``: a keep below what the network costs with
    every group at its floor fails its trial (the allocation is out of reach)."""
    return (
        "shrink.candidates={s: {strategy: prune_l1, epochs: 1, lr: 0.01, budget: {objective: params},"
        f" allocation: sensitivity, search: {{mode: step, low: {low}, step: {step}, high: {high},"
        " trials: 2}}}"
    )


@pytest.mark.slow
def test_a_failed_trial_is_recorded_and_the_search_goes_on(trained_layout):
    from shrinkflow.tasks.pipeline.stages import Context, run_candidate, run_sensitivity
    from shrinkflow.tasks.records import load_record
    from shrinkflow.tasks.store.tracking import Tracker
    from shrinkflow.tasks.training.train import load_trial_record

    def searched(*overrides):
        params = parse_params(small_raw(*overrides, "promote.tolerance=100"))
        ctx = Context(params, trained_layout, Tracker.for_project(trained_layout.root, "failed-trials"))
        run_sensitivity(ctx)
        return ctx

    ctx = searched(_budget_search(0.5, 0.49, 0.99))
    tracked = run_candidate(ctx, "s")
    ok, out_of_reach = tracked.record.trials
    assert ok["ratio"] == 0.5 and ok["passed"] and ok["error"] is None
    assert tracked.record.options["budget"]["keep"] == 0.5, "the search went on and kept the trial that ran"
    assert out_of_reach["ratio"] == 0.99 and not out_of_reach["passed"] and out_of_reach["val_acc"] is None
    assert (
        out_of_reach["error"].startswith("ValueError: budget keep 0.01")
        and "out of reach" in out_of_reach["error"]
    )
    assert load_trial_record(trained_layout, "s", 0.99).status == "failed"
    assert not trained_layout.trial_checkpoint("s", 0.99).exists()
    children = ctx.tracker.search_runs(f"tags.mlflow.parentRunId = '{tracked.run_id}'")
    status = {r.info.run_name: (r.info.status, r.data.tags.get("shrinkflow.error", "")) for r in children}
    assert status["s-trial0"] == ("FINISHED", "") and status["s-trial1"][0] == "FAILED"
    assert "out of reach" in status["s-trial1"][1]

    # Every trial failing fails the candidate, in one line naming each trial's error.
    ctx = searched(_budget_search(0.985, 0.005, 0.995))
    with pytest.raises(NoTrialRan, match=r"^all 2 trials failed \(ratio 0.985: ValueError: budget keep"):
        run_candidate(ctx, "s")
    record = load_record(trained_layout, "s")
    assert record.status == "failed" and len(record.trials) == 2
    assert not trained_layout.checkpoint("s").exists(), "no older model left to be trusted"
