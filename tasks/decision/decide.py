"""The promotion decision as a value: measured tables in, a frozen verdict out.

Nothing here reads a file or talks to MLflow; :mod:`shrinkflow.tasks.promotion.promote` gathers the inputs
(``candidates.csv``, ``predictions.csv``, the registry's champion) and carries the verdict out.
Every rule that chooses the winner or the verdict's :class:`Kind` is here:

- **Costs** (``promote.objective``, then size in bytes, then latency): only a model strictly
  smaller than the baseline by the objective can win; when none is certified the baseline stands
  and the verdict says nothing smaller was certified. A tie on the objective goes to the next
  cost, and int8 kernels slower than their float twin count as dearer than any model at the same
  objective that is not.
- **The family** (``promote.multiplicity``): the gate certifies the *decision*, not each candidate.
  ``fixed_sequence`` (default) orders the candidates by cost before looking at the gate, dearest
  first, one recipe per cost level and none that a cheaper recipe matches on validation, tests
  them one after another at the full level and stops at the first failure; the last one that
  passed wins. It controls the family-wise error at ``1 - confidence`` with no adjustment
  (Maurer, Hothorn & Lehmacher 1995; Hsu & Berger 1999). ``holm`` tests the same family with
  Holm's step-down adjustment, so a failure does not stop the smaller ones. ``none`` is the
  per-candidate rule: every candidate at the full level, the smallest that passed wins, no
  family-wise guarantee.
- **veto** on test: when the winner's whole test interval against the baseline lies beyond the
  tolerance, test disagrees with the gate and nothing is registered (unless forced).
- **against the champion** on the current test images: the winner takes the alias when it is
  smaller and non-inferior by ``champion_tolerance``, or better at comparable size (lower bound
  above zero); otherwise it becomes the challenger.
- **compare-and-set**: when ``@champion`` moved while this run was promoting, the caller decides
  again against the new one (:class:`Race`); after :data:`COMPARE_ATTEMPTS` moves the winner
  settles for challenger, so no champion is ever replaced by a model it was not compared with.

``promotion.json`` is the verdict as plain JSON (:func:`verdict_json`, :func:`verdict_from_json`);
everywhere else it is typed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from enum import StrEnum
from typing import Any

import numpy as np
import pandas as pd

from shrinkflow.tasks.config import PromoteConfig
from shrinkflow.tasks.decision.gate import certifiable, class_accuracies, versus_baseline
from shrinkflow.tasks.decision.stats import Comparison, compare
from shrinkflow.tasks.errors import ShrinkflowError

log = logging.getLogger(__name__)


class PromotionError(ShrinkflowError, RuntimeError):
    """The winner could not be chosen, registered or validated; no alias was moved."""


class Kind(StrEnum):
    """What the registry does with the winner."""

    CHAMPION = "champion"
    CHALLENGER = "challenger"
    UNCHANGED = "unchanged"  # identical to the champion: nothing new registered
    VETOED = "vetoed"  # test disagrees with the gate: nothing registered


class Outcome(StrEnum):
    """What became of one candidate in the decision."""

    CERTIFIED = "certified"  # passed the gate within the procedure
    FAILED = "failed"  # tested, did not pass
    UNTESTED = "untested"  # after the sequence stopped
    DOMINATED = "dominated"  # a recipe no dearer did at least as well on validation
    NOT_SMALLER = "not smaller"  # not smaller than the baseline
    SLOWER_INT8 = "slower int8"  # latency objective: int8 kernels slower than its float twin here
    NOT_MEASURED = "not measured"  # it did not train


@dataclass(frozen=True)
class Candidate:
    """One candidate and what the procedure made of it."""

    name: str
    size: float | None  # by promote.objective
    outcome: Outcome
    gate: Comparison | None = None  # against the baseline on gate; None: not compared
    note: str = ""  # e.g. the class the per-class guard refused it for

    def as_json(self) -> dict:
        gate = asdict(self.gate) if self.gate else {}
        return {
            "name": self.name,
            "size": self.size,
            "outcome": str(self.outcome),
            "gate": gate,
            "note": self.note,
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Candidate:
        gate = Comparison(**raw["gate"]) if raw.get("gate") else None
        return cls(raw["name"], raw["size"], Outcome(raw["outcome"]), gate, raw.get("note", ""))


@dataclass(frozen=True)
class ClassAccuracy:
    """The winner's and the baseline's test accuracy within one class, in percent."""

    name: str  # the class ("class" in promotion.json)
    baseline: float
    model: float
    difference: float  # model - baseline, points

    def as_json(self) -> dict:
        return {
            "class": self.name,
            "baseline": self.baseline,
            "model": self.model,
            "difference": self.difference,
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> ClassAccuracy:
        return cls(raw["class"], raw["baseline"], raw["model"], raw["difference"])


@dataclass(frozen=True)
class ChampionSeen:
    """The champion a verdict was compared with, as the verdict records it."""

    version: str
    loads: bool  # False: its files are gone or refused, or it is for another task
    size: float
    sha256: str
    error: str


@dataclass(frozen=True)
class Champion:
    """The registry's current champion, as the decision needs it."""

    version: str
    predictions: np.ndarray | None  # on the current test images; None: its files are gone or refused
    size: float
    sha256: str
    tags: dict[str, str]
    error: str = ""
    other_task: bool = False  # its task tags differ (only --force gets past it)

    def seen(self) -> ChampionSeen:
        return ChampionSeen(self.version, self.predictions is not None, self.size, self.sha256, self.error)

    @property
    def loads(self) -> bool:
        return self.predictions is not None


@dataclass(frozen=True)
class Race:
    """``@champion`` moved while this promotion was carrying out its verdict: how many times so
    far, and from which version the last time (``v3``, or ``none``)."""

    rounds: int
    moved_from: str


@dataclass(frozen=True)
class Standing:
    """The registry as the decision meets it: its champion (None: there is none), whether the
    operator forces the winner in, and the race, when this is a decision taken again."""

    champion: Champion | None = None
    force: bool = False
    race: Race | None = None


@dataclass(frozen=True)
class RunFacts:
    """What the decision knows of the run beyond its two tables."""

    checkpoints: Mapping[str, str] = field(default_factory=dict)  # sha256 of each measured model
    classes: tuple[str, ...] = ()  # the class names, for the per-class table; (): none
    fingerprint: str = ""  # of the prepared data (a champion certified on the same is re-checked)


@dataclass(frozen=True)
class Registered:
    """Where carrying the verdict out left the winner: a version, and the alias it took (None:
    none moved, e.g. the champion is the same checkpoint)."""

    model_name: str
    version: str
    alias: str | None = None
    run_id: str | None = None

    def as_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Verdict:
    """The whole decision: the run's winner, how it was certified, and what the registry does
    with it (:attr:`kind`). Only :attr:`registry` is filled later, by the step that carries the
    verdict out."""

    # The winner and its figures, from candidates.csv.
    winner: str
    strategy: str
    ratio: float
    objective: str
    objective_value: float
    val_acc: float
    gate_acc: float
    test_acc: float
    baseline_val_acc: float
    baseline_gate_acc: float
    baseline_test_acc: float
    # The rule and the procedure that certified it.
    tolerance: float
    tolerance_mode: str
    confidence: float | None
    eligible: tuple[str, ...]  # certified candidates and the baseline
    reason: str  # why this winner
    kind: Kind
    kind_reason: str = ""  # why this kind ("verdict_reason" in promotion.json)
    multiplicity: str = "none"
    family_level: float | None = None  # the family-wise error the procedure controls; None: none
    certified_by: str = ""  # "fixed-sequence test of 7 candidates, family-wise 5%"
    order: tuple[str, ...] = ()  # the family, in the order it was tested
    stopped_at: str | None = None  # fixed_sequence: the first candidate that failed
    candidates: tuple[Candidate, ...] = ()  # every candidate
    gate: Comparison | None = None  # the winner against the baseline on gate
    test: Comparison | None = None  # ... and on test: the veto's evidence
    summary: str = ""  # "l1-75: -0.4 points (95% bound -1.3 > -2.0) on 540 gate images"
    warning: str = ""
    vetoed: bool = False  # test disagrees with the gate (a forced run registers anyway)
    forced: bool = False
    champion_before: ChampionSeen | None = None
    champion_comparison: Comparison | None = None  # the winner against it on the test images
    per_class: tuple[ClassAccuracy, ...] = ()  # test accuracy per class: winner, baseline
    registry: Registered | None = None
    composition: str = ""  # the winner's steps, e.g. prune_l1+distill+int8 (candidates.csv)


def decide(
    table: pd.DataFrame,
    predictions: Mapping[str, pd.DataFrame],
    cfg: PromoteConfig,
    standing: Standing = Standing(),
    facts: RunFacts = RunFacts(),
) -> Verdict:
    """The run's winner and what the registry should do with it.

    ``table`` is ``candidates.csv``; ``predictions`` is ``predictions.csv`` by split (``label``
    and a column per model); ``standing`` the registry's champion, the operator's ``--force`` and
    the race when the champion moved under an earlier decision; ``facts`` each model's checkpoint
    sha256 (a winner identical to the champion changes nothing), the class names and the data's
    fingerprint."""
    base = table[table["name"] == "baseline"].iloc[0]
    if base["status"] != "ok":
        raise PromotionError("the baseline has no measurements; nothing can be promoted")
    gate, test = predictions["gate"], predictions["test"]
    family = tested(table, gate, cfg)
    won = winner(table, family, cfg)
    row = table[table["name"] == won].iloc[0]
    on_gate, labels = _versus_baseline(gate, won, cfg), test["label"].to_numpy()
    ours = Contender(
        won, float(row[cfg.objective]), _versus_baseline(test, won, cfg), test[won].to_numpy() == labels
    )
    ruling = rule(ours, standing, facts.checkpoints.get(won, ""), labels, cfg)
    notes = [certifiable(cfg, on_gate.n), record_note(standing.champion, labels, facts, cfg)]
    return Verdict(
        **_figures(row, base, cfg),
        **_procedure(family, cfg),
        reason=reason(won, row, family, cfg),
        gate=on_gate,
        test=ours.test,
        summary=on_gate.line(won),
        warning="; ".join(filter(None, notes)),
        vetoed=ours.vetoed,
        per_class=per_class(test, won, facts.classes) if facts.classes else (),
        kind=ruling.kind,
        kind_reason=ruling.reason,
        forced=ruling.forced,
        champion_before=standing.champion.seen() if standing.champion else None,
        champion_comparison=ruling.versus,
    )


def _figures(row: pd.Series, base: pd.Series, cfg: PromoteConfig) -> dict[str, Any]:
    """The verdict's fields that are the winner's row of candidates.csv, and the baseline's."""
    return {
        "winner": str(row["name"]),
        "strategy": str(row["strategy"]),
        "composition": row["composition"] if isinstance(row.get("composition"), str) else "",
        "ratio": float(row["ratio"]),
        "objective": cfg.objective,
        "objective_value": float(row[cfg.objective]),
        **{f"{split}_acc": float(row[f"{split}_acc"]) for split in ("val", "gate", "test")},
        **{f"baseline_{split}_acc": float(base[f"{split}_acc"]) for split in ("val", "gate", "test")},
        "tolerance": cfg.tolerance,
        "tolerance_mode": cfg.tolerance_mode,
        "confidence": cfg.confidence,
    }


def _procedure(family: list[Candidate], cfg: PromoteConfig) -> dict[str, Any]:
    """The verdict's fields that say how the procedure went: what it tested, in which order,
    where it stopped, and what it made of every candidate."""
    order = tuple(
        c.name for c in family if c.outcome in (Outcome.CERTIFIED, Outcome.FAILED, Outcome.UNTESTED)
    )
    stopped = next((c.name for c in family if c.outcome == Outcome.FAILED), None)
    return {
        "eligible": tuple(sorted(["baseline", *(c.name for c in family if c.outcome == Outcome.CERTIFIED)])),
        "multiplicity": cfg.multiplicity,
        "family_level": family_level(cfg),
        "certified_by": certified_by(cfg, len(order)),
        "order": order,
        "stopped_at": stopped if cfg.multiplicity == "fixed_sequence" else None,
        "candidates": tuple(family),
    }


def tested(table: pd.DataFrame, gate: pd.DataFrame, cfg: PromoteConfig) -> list[Candidate]:
    """Every candidate and what the procedure made of it, the tested family first, in order."""
    size = cfg.objective
    candidates = table[table["name"] != "baseline"]
    ok = candidates[candidates["status"] == "ok"]
    left = [
        Candidate(str(n), None, Outcome.NOT_MEASURED) for n in candidates["name"] if n not in set(ok["name"])
    ]
    ok, slower = _faster_int8(ok, cfg)
    left += _set_aside(slower, size, Outcome.SLOWER_INT8)
    # Only a model strictly smaller than the baseline can win, whatever the procedure: a same-size
    # one (magnitude pruning counted dense, int8 of the baseline) would shrink nothing.
    smaller = ok[size] < table.loc[table["name"] == "baseline", size].iloc[0]
    left += _set_aside(ok[~smaller], size, Outcome.NOT_SMALLER)
    ok = ok[smaller]
    if cfg.multiplicity != "none":  # the order, from costs and validation only
        ranked = by_cost(ok, cfg, dearest_first=True)
        front = validation_front(ranked, cost_keys(ok, cfg))
        left += _set_aside(ranked[~ranked.index.isin(front.index)], size, Outcome.DOMINATED)
        ok = front
    comparisons = [_versus_baseline(gate, name, cfg) for name in ok["name"]]
    guard = [_class_guard(row, cfg) for _, row in ok.iterrows()]
    passed = np.array([c.passed and not g for c, g in zip(comparisons, guard, strict=True)], bool)
    p_values = np.array([c.p_value if c.p_value is not None else np.nan for c in comparisons])
    done = certify(passed, p_values, cfg.multiplicity, 1 - (cfg.confidence or 0.95))
    first_fail = int(np.argmin(passed)) if not passed.all() else len(passed)
    family = []
    for i, ((_, row), c, g) in enumerate(zip(ok.iterrows(), comparisons, guard, strict=True)):
        outcome = Outcome.CERTIFIED if done[i] else Outcome.FAILED
        if cfg.multiplicity == "fixed_sequence" and i > first_fail:
            outcome = Outcome.UNTESTED
        family.append(Candidate(str(row["name"]), float(row[cfg.objective]), outcome, c, g))
    return family + left


def validation_front(ranked: pd.DataFrame, costs: list[str]) -> pd.DataFrame:
    """The sequence, dearest first (``ranked`` by :func:`by_cost`): one recipe per cost level
    (the best on validation; ties: the name), and no model that validation says is at most as
    accurate as a cheaper one (it could only stop the sequence early, and could not win). Chosen
    on costs and validation alone, so the gate's level holds."""
    best = ranked.drop_duplicates(costs)
    # The best validation accuracy among strictly cheaper models, for each row (dearest first).
    cheaper_best = best["val_acc"][::-1].cummax()[::-1].shift(-1, fill_value=-np.inf)
    return best[best["val_acc"] > cheaper_best]


# What breaks a tie on the objective, in order (issue #25: l1-50-int8 won a params tie with l1-50
# while 6.5x slower): int8 kernels no faster than their float twin count as dearer than any model
# that is not, then the bytes, then latency. Latency is a measurement, so two models tie on it
# unless one is more than LATENCY_NOISE slower than the fastest that ties with it on the rest.
LATENCY_NOISE = 0.25
SLOWER_INT8, SLOWER = "_slower_int8", "_slower"


def by_cost(frame: pd.DataFrame, cfg: PromoteConfig, dearest_first: bool = False) -> pd.DataFrame:
    """``frame`` cheapest first (``dearest_first``: the reverse), then the best on validation,
    then by name; with the columns of :func:`cost_keys` that it adds."""
    keys = cost_keys(frame, cfg)
    return with_costs(frame, cfg).sort_values(
        [*keys, "val_acc", "name"], ascending=[not dearest_first] * len(keys) + [False, True]
    )


def cost_keys(frame: pd.DataFrame, cfg: PromoteConfig) -> list[str]:
    """The columns that order models by cost (see :func:`with_costs`)."""
    keys = [cfg.objective, SLOWER_INT8]
    if cfg.objective != "size_bytes" and "size_bytes" in frame:
        keys.append("size_bytes")
    if cfg.objective != "latency_ms":
        keys.append(SLOWER)
    return keys


def with_costs(frame: pd.DataFrame, cfg: PromoteConfig) -> pd.DataFrame:
    """``frame`` with the derived costs: whether it runs int8 kernels slower than its float twin,
    and whether it is slower beyond noise than the fastest model it otherwise ties with."""
    frame = frame.assign(**{SLOWER_INT8: slower_int8(frame)})
    tied_on = [k for k in cost_keys(frame, cfg) if k != SLOWER]
    fastest = frame.groupby(tied_on, dropna=False)["latency_ms"].transform("min")
    return frame.assign(**{SLOWER: frame["latency_ms"] > fastest * (1 + LATENCY_NOISE)})


def slower_int8(frame: pd.DataFrame) -> pd.Series:
    """Which models run int8 kernels that are no faster here than their float twin's."""
    if "float_latency_ms" not in frame:
        return pd.Series(False, index=frame.index)
    twin = pd.to_numeric(frame["float_latency_ms"], errors="coerce")
    return twin.notna() & (frame["latency_ms"] >= twin)


def _set_aside(rows: pd.DataFrame, size: str, outcome: Outcome) -> list[Candidate]:
    return [Candidate(str(r["name"]), float(r[size]), outcome) for _, r in rows.iterrows()]


def certify(passed: np.ndarray, p_values: np.ndarray, multiplicity: str, alpha: float) -> np.ndarray:
    """Which candidates the procedure certifies, given each one's own test (``passed``, and its
    ``p_values``) in the order tested (the last axis, largest model first; leading axes are
    independent families, as in the simulation of tests/test_decide.py)."""
    if multiplicity == "fixed_sequence":
        return np.logical_and.accumulate(passed, axis=-1)
    if multiplicity == "holm":
        return holm(p_values, alpha) & passed
    return passed


def holm(p_values: np.ndarray, alpha: float) -> np.ndarray:
    """Holm's step-down rejections (Holm 1979) along the last axis: the i-th smallest p-value of k
    is rejected when it and every smaller one lie below ``alpha / (k - i)``. Vectorised over
    families; tests/test_decide.py checks it against statsmodels' ``multipletests(method="holm")``,
    which cannot run a simulation's thousands of families (it calls ``gc.collect()`` each time)."""
    k = p_values.shape[-1]
    order = np.argsort(p_values, axis=-1, kind="stable")
    below = np.take_along_axis(p_values, order, -1) <= alpha / (k - np.arange(k))
    rejected = np.empty_like(below)
    np.put_along_axis(rejected, order, np.logical_and.accumulate(below, axis=-1), -1)
    return rejected


def winner(table: pd.DataFrame, family: list[Candidate], cfg: PromoteConfig) -> str:
    """The cheapest certified candidate strictly smaller than the baseline by the objective
    (ties: the next costs, see :func:`by_cost`, then the higher gate accuracy, then the name); the
    baseline when none is."""
    certified = {c.name for c in family if c.outcome == Outcome.CERTIFIED}
    base = table.loc[table["name"] == "baseline", cfg.objective].iloc[0]
    pool = table[table["name"].isin(certified) & (table[cfg.objective] < base)]
    if pool.empty:
        return "baseline"
    keys = cost_keys(pool, cfg)
    ranked = with_costs(pool, cfg).sort_values(
        [*keys, "gate_acc", "name"], ascending=[True] * len(keys) + [False, True]
    )
    return str(ranked.iloc[0]["name"])


def family_level(cfg: PromoteConfig) -> float | None:
    if cfg.confidence is None or cfg.multiplicity == "none":
        return None
    return round(1 - cfg.confidence, 6)


def certified_by(cfg: PromoteConfig, k: int) -> str:
    """Which procedure certified the winner, and at what level, in words."""
    if cfg.confidence is None:
        return f"the point rule on {k} candidates ({cfg.multiplicity}), no confidence bound"
    alpha = f"{1 - cfg.confidence:.0%}"
    return {
        "fixed_sequence": f"fixed-sequence test of {k} candidates (largest first), family-wise {alpha}",
        "holm": f"Holm's procedure over {k} candidates, family-wise {alpha}",
        "none": f"each of {k} candidates at {alpha} on its own, no family-wise guarantee",
    }[cfg.multiplicity]


def reason(won: str, row: pd.Series, family: list[Candidate], cfg: PromoteConfig) -> str:
    """Why ``won``, in one sentence."""
    by = {outcome: [c.name for c in family if c.outcome == outcome] for outcome in Outcome}
    rule = (
        f"whose {cfg.confidence:.0%} lower bound of gate accuracy minus the baseline's is above "
        if cfg.confidence
        else "whose gate accuracy minus the baseline's (point rule, no confidence bound) is at least "
    )
    certified = len(by[Outcome.CERTIFIED]) + 1
    head = (
        f"{won} has the fewest {cfg.objective} ({row[cfg.objective]:g}) of the {certified} models "
        f"{rule}-{cfg.tolerance:g} ({cfg.tolerance_mode})"
    )
    if won == "baseline":
        head = f"{NOTHING_SMALLER}: the baseline ({row[cfg.objective]:g} {cfg.objective}) stands"
    by[Outcome.FAILED] = [
        c.name + (f" ({c.note})" if c.note else "") for c in family if c.outcome == Outcome.FAILED
    ]
    k = sum(len(by[o]) for o in (Outcome.CERTIFIED, Outcome.FAILED, Outcome.UNTESTED))
    parts = [head, f"certified by {certified_by(cfg, k)}"]
    for outcome, words in REASONS.items():
        if by[outcome]:
            parts.append(
                f"{words}: {', '.join(by[outcome] if outcome == Outcome.UNTESTED else sorted(by[outcome]))}"
            )
    return "; ".join(parts)


NOTHING_SMALLER = "nothing smaller than the baseline was certified"

REASONS = {
    Outcome.FAILED: "failed the gate",
    Outcome.UNTESTED: "not tested after the sequence stopped",
    Outcome.DOMINATED: "no more accurate on validation than a cheaper recipe",
    Outcome.NOT_SMALLER: "not smaller than the baseline",
    Outcome.SLOWER_INT8: "int8 slower than its float twin here",
    Outcome.NOT_MEASURED: "not measured",
}


def _faster_int8(ok: pd.DataFrame, cfg: PromoteConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A latency objective never picks int8 kernels that are slower than the float ones here."""
    if cfg.objective != "latency_ms":
        return ok, ok.iloc[:0]
    slower = slower_int8(ok)
    return ok[~slower], ok[slower]


def _class_guard(row: pd.Series, cfg: PromoteConfig) -> str:
    """Why the per-class guard refuses the model ("": it does not)."""
    lost = row.get("worst_class_drop")
    if cfg.max_class_drop is not None and lost is not None and lost == lost and lost > cfg.max_class_drop:
        return f"loses {lost:.1f} points on class {row['worst_class']!r} > {cfg.max_class_drop:g}"
    return ""


def vetoed_by_test(test: Comparison) -> bool:
    """Test vetoes the gate's choice when even its upper bound lies beyond the tolerance."""
    return test.upper < -test.margin


# --- the winner against the registry ----------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Contender:
    """The run's winner as the registry rules see it."""

    winner: str
    objective_value: float  # its size by promote.objective
    test: Comparison  # against the baseline on test
    correct: np.ndarray  # whether it gets each test image right

    @property
    def vetoed(self) -> bool:
        return vetoed_by_test(self.test)


@dataclass(frozen=True)
class Ruling:
    """What the registry does with the winner, and why."""

    kind: Kind
    reason: str
    forced: bool = False
    versus: Comparison | None = None  # the winner against the champion on the test images


COMPARE_ATTEMPTS = 3  # champions that moved under one promotion before it settles for challenger


def rule(ours: Contender, standing: Standing, sha256: str, labels: np.ndarray, cfg: PromoteConfig) -> Ruling:
    """The verdict's kind: the veto first, then the winner against the registry's champion on
    the test images (``labels``); ``standing.force`` makes it champion whatever the rules say.
    ``sha256`` is the winner's checkpoint: the champion's own changes nothing."""
    champion, force = standing.champion, standing.force
    versus = None
    if champion is not None and champion.loads:
        versus = compare(ours.correct, champion.predictions == labels, cfg.champion_tolerance, cfg.confidence)
    disagrees = ours.test.line(ours.winner, "test")
    if ours.vetoed and not force:
        why = (
            f"test disagrees: {disagrees}, and even its upper bound {ours.test.upper:+.2f} lies beyond "
            "the tolerance; nothing registered, no alias moved"
        )
        return Ruling(Kind.VETOED, why, versus=versus)
    if champion is not None and champion.loads and champion.sha256 == sha256 and not force:
        return Ruling(Kind.UNCHANGED, f"identical to {cfg.alias} v{champion.version}", versus=versus)
    alias, why = judge(ours, champion, versus, cfg)
    if ours.winner == "baseline":
        why = f"{NOTHING_SMALLER}; {why}"
    if ours.vetoed:
        why = f"{why}; test disagrees ({disagrees})"
    forced = force and (alias != cfg.alias or ours.vetoed or (champion is not None and champion.other_task))
    if forced:
        alias, why = cfg.alias, f"forced by the operator (rules said: {why})"
    kind = Kind.CHAMPION if alias == cfg.alias else Kind.CHALLENGER
    return raced(Ruling(kind, why, forced, versus), standing.race, cfg)


def judge(
    ours: Contender, champion: Champion | None, versus: Comparison | None, cfg: PromoteConfig
) -> tuple[str, str]:
    """Which alias the run's winner (``ours``: its ``winner`` and ``objective_value``) deserves
    against the current champion, and why; ``versus`` is the winner against the champion on the
    current test images."""
    if champion is None:
        return cfg.alias, f"there is no {cfg.alias} yet"
    if versus is None:
        return cfg.alias, f"the current {cfg.alias} v{champion.version} {champion.error}"
    mine, theirs = ours.objective_value, champion.size
    vs = f"{cfg.alias} v{champion.version} ({theirs:g} {cfg.objective}; ours {mine:g})"
    evidence = versus.line(ours.winner, "test")
    if mine < theirs and versus.passed:
        return cfg.alias, f"smaller than {vs} and not worse by {cfg.champion_tolerance:g} points: {evidence}"
    if versus.lower > 0 and mine <= theirs * (1 + cfg.comparable_size):
        return cfg.alias, f"more accurate than {vs} at comparable size: {evidence}"
    return cfg.challenger_alias, f"not better than {vs}: {evidence}"


def raced(ruling: Ruling, race: Race | None, cfg: PromoteConfig) -> Ruling:
    """The compare-and-set policy: a ruling taken again because ``@champion`` moved says so, and
    once it has moved :data:`COMPARE_ATTEMPTS` times the winner settles for challenger (which
    moves without a comparison), so no champion is replaced by a model it was not compared with."""
    if race is None:
        return ruling
    why = f"{ruling.reason} (compared again: {cfg.alias} moved from {race.moved_from} during this run)"
    if race.rounds < COMPARE_ATTEMPTS:
        return replace(ruling, reason=why)
    why = (
        f"{cfg.alias} moved {COMPARE_ATTEMPTS} times while this run compared with it; registered as "
        f"{cfg.challenger_alias}: no champion replaced unseen (last: {why})"
    )
    return replace(ruling, kind=Kind.CHALLENGER, reason=why)


def alias_of(verdict: Verdict, cfg: PromoteConfig) -> str:
    """The alias a registered winner takes: ``promote.alias`` for a champion, else the challenger's."""
    return cfg.alias if verdict.kind == Kind.CHAMPION else cfg.challenger_alias


def needs_same_champion(verdict: Verdict, cfg: PromoteConfig, force: bool) -> bool:
    """Whether the verdict's alias may only move past the champion it was compared with: the
    champion's alias does, unless the operator forced it; the challenger's moves without one."""
    return alias_of(verdict, cfg) == cfg.alias and not force


def record_note(champion: Champion | None, labels: np.ndarray, facts: RunFacts, cfg: PromoteConfig) -> str:
    """A warning when the champion, measured on the very test images it was certified on (same
    data fingerprint), does not score what its record says ("": it does, or cannot be told)."""
    if champion is None or not champion.loads or champion.tags.get("data_fingerprint") != facts.fingerprint:
        return ""
    try:
        recorded = float(champion.tags["test_acc"])
    except (KeyError, ValueError):
        return ""
    measured = round(100.0 * int((champion.predictions == labels).sum()) / len(labels), 4)
    if abs(measured - recorded) <= 1e-3:
        return ""
    note = (
        f"{cfg.alias} v{champion.version} scores {measured:.2f} on the test images it was "
        f"certified on, but its record says {recorded:.2f}"
    )
    log.warning(note)
    return note


def per_class(frame: pd.DataFrame, name: str, classes: tuple[str, ...]) -> tuple[ClassAccuracy, ...]:
    """Model ``name``'s and the baseline's accuracy within each class of one split."""
    labels = frame["label"].to_numpy()
    ours, base = (class_accuracies(frame[m].to_numpy(), labels, len(classes)) for m in (name, "baseline"))
    return tuple(
        ClassAccuracy(c, float(b), float(o), round(float(o - b), 4))
        for c, o, b in zip(classes, ours, base, strict=True)
    )


def _versus_baseline(frame: pd.DataFrame, name: str, cfg: PromoteConfig) -> Comparison:
    """Model ``name`` against the baseline on one split of ``predictions.csv``."""
    return versus_baseline(
        frame[name].to_numpy(), frame["baseline"].to_numpy(), frame["label"].to_numpy(), cfg
    )


# --- promotion.json: the verdict as plain JSON, at the edge --------------------------------------

JSON_KEYS = {"kind": "verdict", "kind_reason": "verdict_reason"}  # renamed fields; others keep theirs


def _comparison(raw: Mapping[str, Any]) -> Comparison | None:
    return Comparison(**raw) if raw else None


# How each typed field comes back from JSON (a record absent from the file is {}).
_FROM_JSON: dict[str, Callable[[Any], Any]] = {
    "kind": Kind,
    "eligible": tuple,
    "order": tuple,
    "candidates": lambda rows: tuple(Candidate.from_json(row) for row in rows),
    "per_class": lambda rows: tuple(ClassAccuracy.from_json(row) for row in rows),
    "gate": _comparison,
    "test": _comparison,
    "champion_comparison": _comparison,
    "champion_before": lambda raw: ChampionSeen(**raw) if raw else None,
    "registry": lambda raw: Registered(**raw) if raw else None,
}


def verdict_json(verdict: Verdict) -> dict[str, Any]:
    """``verdict`` as ``promotion.json`` holds it: records as JSON objects ({}: none)."""
    plain = {f.name: getattr(verdict, f.name) for f in fields(Verdict)}
    plain |= {
        "kind": str(verdict.kind),
        "eligible": list(verdict.eligible),
        "order": list(verdict.order),
        "candidates": [c.as_json() for c in verdict.candidates],
        "per_class": [c.as_json() for c in verdict.per_class],
        **{
            k: asdict(plain[k]) if plain[k] else {}
            for k in ("gate", "test", "champion_comparison", "champion_before")
        },
        "registry": verdict.registry.as_json() if verdict.registry else {},
    }
    return {JSON_KEYS.get(name, name): value for name, value in plain.items()}


def verdict_keys() -> set[str]:
    """The keys ``promotion.json`` may hold."""
    return {JSON_KEYS.get(f.name, f.name) for f in fields(Verdict)}


def verdict_from_json(raw: Mapping[str, Any]) -> Verdict:
    """The typed verdict back from ``promotion.json``'s keys (others are ignored; a key an older
    file lacks takes its default). Raises ValueError, TypeError or KeyError on a file that is not
    a whole verdict."""
    keys = {f.name: JSON_KEYS.get(f.name, f.name) for f in fields(Verdict)}
    required = [keys[f.name] for f in fields(Verdict) if f.default is f.default_factory is MISSING]
    if missing := [key for key in required if key not in raw]:
        raise ValueError(f"no {', '.join(missing)}")
    return Verdict(
        **{name: _FROM_JSON.get(name, _same)(raw[key]) for name, key in keys.items() if key in raw}
    )


def _same(value: Any) -> Any:
    return value
