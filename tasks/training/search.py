"""Search a strategy's ratio for the largest reduction that passes the promotion gate on the
validation split, under a budget of trials (the seed's "iterate the adjustment"), and schedule
searches' trials beside the plain candidates on the workers.

A search runs in rounds. :func:`next_round` decides, from the trials so far, which ratios to try
next: up to ``width`` of them (the fan-out's workers), all independent of each other, so a round's
trials run at the same time on separate workers. The width is ``shrink.workers``, never the workers
that happen to be free, so the trials, and the ratio kept, are the same under Prefect, under
``dvc repro`` (which runs a round's trials one after another) and in every run.

Accuracy is not monotonic in the ratio once noise is involved (a larger ratio can pass where a
smaller one failed), so the search never trusts a bracket: it keeps the largest ratio that
passed among all the trials it ran.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from shrinkflow.tasks.config import SearchConfig
from shrinkflow.tasks.decision.stats import Comparison
from shrinkflow.tasks.errors import ShrinkflowError


@dataclass(frozen=True)
class Trial:
    index: int
    ratio: float
    val_acc: float | None
    delta: float | None  # val accuracy minus the baseline's, points
    lower: float | None  # the gate's one-sided lower confidence bound of delta
    p_value: float | None
    passed: bool  # lower > -tolerance: the trial passes the same gate promotion applies
    seconds: float = 0.0  # its fine-tuning time (the record's train_seconds)
    sha256: str | None = None  # of its checkpoint (``Layout.trial_checkpoint``)
    error: str | None = None  # a trial that failed: why (it counts as not passed, and is never kept)


def judged(index: int, ratio: float, val_acc: float, gate: Comparison, **extra: Any) -> Trial:
    """A trial that ran, as the validation gate judged it."""
    return Trial(index, ratio, val_acc, gate.delta, gate.lower, gate.p_value, gate.passed, **extra)


def failed(index: int, ratio: float, exc: BaseException) -> Trial:
    """A trial that raised: recorded, and the search goes on without it."""
    return Trial(index, ratio, None, None, None, None, False, error=f"{type(exc).__name__}: {exc}")


def next_round(cfg: SearchConfig, trials: Sequence[Trial], width: int) -> tuple[float, ...]:
    """The ratios to try next, at most ``width`` and never past ``cfg.trials`` in all; empty when
    the search is over. With ``width`` 1 this is the serial search:

    - ``step`` walks ``low, low + step, ...`` up to ``high``, a round being the next ``width``
      points, and stops after the round where a trial first fails;
    - ``bisect`` first tries ``width`` points evenly spaced from ``low`` to ``high`` (``low``
      alone when serial; ``low`` and ``high`` for two), then ``high`` if it is still untried, then
      cuts the gap between the largest pass and the smallest failure above it into ``width + 1``
      equal parts (halves when serial). It stops when ``low`` fails or nothing failed above the
      largest pass."""
    left = cfg.trials - len(trials)
    if left <= 0:
        return ()
    k = min(width, left)
    if cfg.mode == "step":
        return _step_round(cfg, trials, k)
    if not trials:
        return _spaced(cfg.low, cfg.high, k, ends=True)
    by_ratio = {t.ratio: t for t in trials}
    if not by_ratio[min(by_ratio)].passed:
        return ()  # the smallest reduction already fails: nothing larger is searched for
    good = max(t.ratio for t in trials if t.passed)
    if cfg.high not in by_ratio:
        return _fresh(_spaced(good, cfg.high, k, ends=False), by_ratio)
    above = [t.ratio for t in trials if not t.passed and t.ratio > good]
    if not above:
        return ()
    return _fresh(_spaced(good, min(above), k + 1, ends=False)[:-1], by_ratio)


def _step_round(cfg: SearchConfig, trials: Sequence[Trial], k: int) -> tuple[float, ...]:
    if any(not t.passed for t in trials):
        return ()
    points = (round(cfg.low + i * cfg.step, 6) for i in range(len(trials), len(trials) + k))
    return tuple(p for p in points if p <= cfg.high + 1e-9)


def _spaced(start: float, end: float, k: int, ends: bool) -> tuple[float, ...]:
    """``k`` points from ``start`` to ``end``: both included (``ends``), or ``start`` left out and
    ``end`` the last. One point with ``ends`` is ``start``."""
    if ends:
        return (start,) if k == 1 else tuple(round(start + (end - start) * i / (k - 1), 6) for i in range(k))
    return tuple(round(start + (end - start) * i / k, 6) for i in range(1, k + 1))


def _fresh(ratios: tuple[float, ...], tried: dict[float, Trial]) -> tuple[float, ...]:
    """Never the same ratio twice (a gap narrower than the rounding has nothing left to try)."""
    return tuple(dict.fromkeys(r for r in ratios if r not in tried))


def rounds_left(cfg: SearchConfig, tried: int, width: int) -> int:
    """At most how many rounds the search still takes, this one included, after ``tried`` trials."""
    most = cfg.trials
    if cfg.mode == "step":  # the walk ends at high
        most = min(most, math.floor((cfg.high - cfg.low) / cfg.step + 1e-9) + 1)
    return max(1, math.ceil((most - tried) / width))


def run_search(
    cfg: SearchConfig,
    width: int,
    run: Callable[[int, float], Trial],
    on_trial: Callable[[Trial], None] | None = None,
) -> list[Trial]:
    """The search one trial after another: every round of :func:`next_round`, each trial by
    ``run(index, ratio)`` (which returns a failure as a trial rather than raising). Returns the
    trials in the order planned."""
    trials: list[Trial] = []
    while ratios := next_round(cfg, trials, width):
        for ratio in ratios:
            trials.append(run(len(trials), ratio))
            if on_trial is not None:
                on_trial(trials[-1])
    return trials


def search_ratio(
    cfg: SearchConfig,
    judge: Callable[[float], tuple[float, Comparison]],
    on_trial: Callable[[Trial], None] | None = None,
    width: int = 1,
) -> list[Trial]:
    """:func:`run_search` with ``judge(ratio)``, which shrinks, fine-tunes and returns the
    trial's val accuracy and its gate comparison with the baseline."""
    return run_search(cfg, width, lambda index, ratio: judged(index, ratio, *judge(ratio)), on_trial)


class NoTrialRan(ShrinkflowError):
    """Every trial of a search failed: there is nothing to keep."""


def best_trial(trials: Sequence[Trial]) -> Trial:
    """The largest ratio that passed; if none did, the smallest that ran (the closest to passing).
    A failed trial is never kept."""
    ran = [t for t in trials if t.error is None]
    if not ran:
        reasons = "; ".join(f"ratio {t.ratio:g}: {t.error}" for t in trials)
        raise NoTrialRan(f"all {len(trials)} trials failed ({reasons})"[:2000])
    passed = [t for t in ran if t.passed]
    if passed:
        return max(passed, key=lambda t: t.ratio)
    return min(ran, key=lambda t: t.ratio)


# --- filling the workers ----------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One unit of shrink work a worker runs: a plain candidate's whole ``shrink``, one ``trial``
    of a search, or the ``pick`` that makes a search's best trial the candidate."""

    kind: Literal["shrink", "trial", "pick"]
    name: str
    index: int = 0
    ratio: float = 0.0
    trials: tuple[Trial, ...] = ()  # a pick's: every trial of the search, in plan order
    work: float = 0.0  # a trial's: epochs along the longest chain it starts (its priority)

    def arguments(self) -> tuple:
        """What the job's stage function takes after the context."""
        if self.kind == "trial":
            return self.name, self.index, self.ratio
        return (self.name, list(self.trials)) if self.kind == "pick" else (self.name,)


@dataclass
class _Search:
    cfg: SearchConfig
    trials: dict[int, Trial] = field(default_factory=dict)
    waiting: int = 0  # trials of the current round still running


class FanOut:
    """The fan-out's bookkeeping, without the orchestrator: which jobs are ready, in what order,
    and what each candidate came to. The flow takes jobs as workers free up and hands back what
    each returned (a trial, a model stage's result, or the exception it raised).

    Order: picks first (a moment's work that finishes a candidate); then trials, the one at the
    head of the longest chain of epochs first (a trial counts every round its search may still
    need): a search's rounds depend on each other, so its trials are the fan-out's critical path,
    and a round that waited behind plain candidates would leave a worker idle at the end; then
    plain candidates, which depend on nothing, in declaration order (the order a user wrote, and
    the one an interrupted run resumes in)."""

    def __init__(self, epochs: dict[str, int], searches: dict[str, SearchConfig], width: int):
        self.width = width
        self._results: dict[str, Any] = {}
        self._order = list(epochs)
        self._epochs = epochs
        self._searches = {name: _Search(cfg) for name, cfg in searches.items()}
        self._ready: list[Job] = []
        self._running = 0
        for name in self._order:
            if name in self._searches:
                self._plan(name)
            else:
                self._ready.append(Job("shrink", name))

    @property
    def results(self) -> dict[str, Any]:
        """Each finished candidate's result or failure, in declaration order."""
        return {name: self._results[name] for name in self._order if name in self._results}

    @property
    def finished(self) -> bool:
        return not self._ready and not self._running

    def take(self, n: int) -> list[Job]:
        """Up to ``n`` ready jobs, the most urgent first."""
        self._ready.sort(key=self._urgency)
        taken, self._ready = self._ready[: max(n, 0)], self._ready[max(n, 0) :]
        self._running += len(taken)
        return taken

    def done(self, job: Job, outcome: Any) -> None:
        """What ``job`` returned or raised; a search's next round (or its pick) becomes ready
        once its round is complete."""
        self._running -= 1
        if job.kind != "trial":
            self._results[job.name] = outcome
            return
        search = self._searches[job.name]
        trial = outcome if isinstance(outcome, Trial) else failed(job.index, job.ratio, outcome)
        search.trials[job.index] = trial
        search.waiting -= 1
        if not search.waiting:
            self._plan(job.name)

    def _plan(self, name: str) -> None:
        search = self._searches[name]
        trials = [search.trials[i] for i in sorted(search.trials)]
        ratios = next_round(search.cfg, trials, self.width)
        if not ratios:
            self._ready.append(Job("pick", name, trials=tuple(trials)))
            return
        work = self._epochs[name] * rounds_left(search.cfg, len(trials), self.width)
        self._ready += [Job("trial", name, len(trials) + i, r, work=work) for i, r in enumerate(ratios)]
        search.waiting = len(ratios)

    def _urgency(self, job: Job) -> tuple:
        return (job.kind != "pick", job.kind != "trial", -job.work, self._order.index(job.name), job.index)


def simulate(
    plan: FanOut, workers: int, seconds: Callable[[Job], float], trial: Callable[[Job], Trial]
) -> list[tuple[float, float, Job]]:
    """``plan`` run on ``workers`` workers with nothing lost between jobs, each job taking
    ``seconds(job)`` and each trial coming out as ``trial(job)``: every job with when it would
    start and end. Its last end is the fan-out's own work, what the flow's wall time is held
    against."""
    clock, order, running, ran = 0.0, itertools.count(), [], []
    while not plan.finished:
        for job in plan.take(workers - len(running)):
            heapq.heappush(running, (clock + seconds(job), next(order), clock, job))
        clock, _, start, job = heapq.heappop(running)
        ran.append((start, clock, job))
        plan.done(job, trial(job) if job.kind == "trial" else job.name)
    return ran
