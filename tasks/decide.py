"""The promotion decision as a value: measured table and paired predictions in, a frozen verdict out.

Nothing here reads a file or talks to MLflow; :mod:`shrinkflow.tasks.promote` gathers the inputs
(``candidates.csv``, ``predictions.csv``, the registry's champion) and carries the verdict out.

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
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum

import numpy as np
import pandas as pd

from shrinkflow.tasks.config import PromoteConfig
from shrinkflow.tasks.errors import ShrinkflowError
from shrinkflow.tasks.gate import certifiable, class_accuracies, versus_baseline
from shrinkflow.tasks.stats import Comparison, compare


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
    name: str
    size: float | None  # by promote.objective
    outcome: Outcome
    gate: dict = field(default_factory=dict)  # Comparison against the baseline on gate; {}: none
    note: str = ""  # e.g. the class the per-class guard refused it for


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

    def describe(self) -> dict:
        return {
            "version": self.version,
            "loads": self.predictions is not None,
            "size": self.size,
            "sha256": self.sha256,
            "error": self.error,
        }


@dataclass(frozen=True)
class Verdict:
    """The whole decision. Its keys are what ``promotion.json`` holds."""

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
    tolerance: float
    tolerance_mode: str
    confidence: float | None
    eligible: list[str]  # certified candidates and the baseline
    reason: str
    multiplicity: str = "none"
    family_level: float | None = None  # the family-wise error the procedure controls; None: none
    certified_by: str = ""  # "fixed-sequence test of 7 candidates, family-wise 5%"
    order: list[str] = field(default_factory=list)  # the family, in the order it was tested
    stopped_at: str | None = None  # fixed_sequence: the first candidate that failed
    candidates: list[dict] = field(default_factory=list)  # every candidate (Candidate)
    gate: dict = field(default_factory=dict)  # the winner against the baseline on gate (Comparison)
    test: dict = field(default_factory=dict)  # ... and on test: the veto's evidence
    summary: str = ""  # "l1-75: -0.4 points (95% bound -1.3 > -2.0) on 540 gate images"
    warning: str = ""
    vetoed: bool = False  # test disagrees with the gate (a forced run registers anyway)
    verdict: Kind | None = None  # None only before against_champion judged it
    verdict_reason: str = ""
    forced: bool = False
    champion_before: dict = field(default_factory=dict)
    champion_comparison: dict = field(default_factory=dict)
    per_class: list[dict] = field(default_factory=list)  # test accuracy per class: winner, baseline
    registry: dict[str, str] = field(default_factory=dict)
    composition: str = ""  # the winner's steps, e.g. prune_l1+distill+int8 (candidates.csv)


def decide(
    table: pd.DataFrame,
    predictions: Mapping[str, pd.DataFrame],
    cfg: PromoteConfig,
    champion: Champion | None = None,
    checkpoints: Mapping[str, str] | None = None,
    classes: list[str] | None = None,
    force: bool = False,
) -> Verdict:
    """The run's winner and what the registry should do with it.

    ``table`` is ``candidates.csv``; ``predictions`` is ``predictions.csv`` by split (``label``
    and a column per model); ``champion`` the registry's current one (None: there is none);
    ``checkpoints`` each model's checkpoint sha256 (a winner identical to the champion changes
    nothing); ``classes`` names the classes of the per-class table."""
    base = table[table["name"] == "baseline"].iloc[0]
    if base["status"] != "ok":
        raise PromotionError("the baseline has no measurements; nothing can be promoted")
    gate, test = predictions["gate"], predictions["test"]
    family = tested(table, gate, cfg)
    won = winner(table, family, cfg)
    row = table[table["name"] == won].iloc[0]
    on_gate, on_test = _versus_baseline(gate, won, cfg), _versus_baseline(test, won, cfg)
    order = [c.name for c in family if c.outcome in (Outcome.CERTIFIED, Outcome.FAILED, Outcome.UNTESTED)]
    stopped = next((c.name for c in family if c.outcome == Outcome.FAILED), None)
    verdict = Verdict(
        winner=won,
        strategy=str(row["strategy"]),
        composition=row["composition"] if isinstance(row.get("composition"), str) else "",
        ratio=float(row["ratio"]),
        objective=cfg.objective,
        objective_value=float(row[cfg.objective]),
        **{f"{split}_acc": float(row[f"{split}_acc"]) for split in ("val", "gate", "test")},
        **{f"baseline_{split}_acc": float(base[f"{split}_acc"]) for split in ("val", "gate", "test")},
        tolerance=cfg.tolerance,
        tolerance_mode=cfg.tolerance_mode,
        confidence=cfg.confidence,
        eligible=sorted(["baseline", *(c.name for c in family if c.outcome == Outcome.CERTIFIED)]),
        reason=reason(won, row, family, cfg),
        multiplicity=cfg.multiplicity,
        family_level=family_level(cfg),
        certified_by=certified_by(cfg, len(order)),
        order=order,
        stopped_at=stopped if cfg.multiplicity == "fixed_sequence" else None,
        candidates=[vars(c) | {"outcome": str(c.outcome)} for c in family],
        gate=on_gate.as_dict(),
        test=on_test.as_dict(),
        summary=on_gate.line(won),
        warning=certifiable(cfg, on_gate.n) or "",
        vetoed=vetoed_by_test(on_test),
        per_class=per_class(test, won, classes) if classes else [],
    )
    return against_champion(verdict, test, cfg, champion, (checkpoints or {}).get(won, ""), force)


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
        family.append(Candidate(str(row["name"]), float(row[cfg.objective]), outcome, c.as_dict(), g))
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


def against_champion(
    verdict: Verdict,
    test: pd.DataFrame,
    cfg: PromoteConfig,
    champion: Champion | None,
    sha256: str,
    force: bool,
) -> Verdict:
    """The verdict's kind: the winner against the registry's ``champion`` on the test images,
    then the veto; ``force`` makes it champion whatever the rules say."""
    versus = None
    if champion is not None and champion.predictions is not None:
        correct = test[verdict.winner].to_numpy() == test["label"].to_numpy()
        versus = compare(
            correct, champion.predictions == test["label"].to_numpy(), cfg.champion_tolerance, cfg.confidence
        )
    verdict = replace(
        verdict,
        champion_before=champion.describe() if champion else {},
        champion_comparison=versus.as_dict() if versus else {},
    )
    on_test = Comparison(**verdict.test)
    if verdict.vetoed and not force:
        why = (
            f"test disagrees: {on_test.line(verdict.winner, 'test')}, and even its upper bound "
            f"{on_test.upper:+.2f} lies beyond the tolerance; nothing registered, no alias moved"
        )
        return replace(verdict, verdict=Kind.VETOED, verdict_reason=why)
    if champion and champion.predictions is not None and champion.sha256 == sha256 and not force:
        return replace(
            verdict, verdict=Kind.UNCHANGED, verdict_reason=f"identical to {cfg.alias} v{champion.version}"
        )
    alias, why = judge(verdict, champion, versus, cfg)
    if verdict.winner == "baseline":
        why = f"{NOTHING_SMALLER}; {why}"
    if verdict.vetoed:
        why = f"{why}; test disagrees ({on_test.line(verdict.winner, 'test')})"
    forced = force and (
        alias != cfg.alias or verdict.vetoed or (champion is not None and champion.other_task)
    )
    if forced:
        alias, why = cfg.alias, f"forced by the operator (rules said: {why})"
    kind = Kind.CHAMPION if alias == cfg.alias else Kind.CHALLENGER
    return replace(verdict, verdict=kind, verdict_reason=why, forced=forced)


def judge(
    verdict: Verdict, champion: Champion | None, versus: Comparison | None, cfg: PromoteConfig
) -> tuple[str, str]:
    """Which alias the run's winner deserves against the current champion, and why; ``versus``
    is the winner against the champion on the current test images."""
    if champion is None:
        return cfg.alias, f"there is no {cfg.alias} yet"
    if versus is None:
        return cfg.alias, f"the current {cfg.alias} v{champion.version} {champion.error}"
    ours, theirs = verdict.objective_value, champion.size
    vs = f"{cfg.alias} v{champion.version} ({theirs:g} {cfg.objective}; ours {ours:g})"
    evidence = versus.line(verdict.winner, "test")
    if ours < theirs and versus.passed:
        return cfg.alias, f"smaller than {vs} and not worse by {cfg.champion_tolerance:g} points: {evidence}"
    if versus.lower > 0 and ours <= theirs * (1 + cfg.comparable_size):
        return cfg.alias, f"more accurate than {vs} at comparable size: {evidence}"
    return cfg.challenger_alias, f"not better than {vs}: {evidence}"


def per_class(frame: pd.DataFrame, name: str, classes: list[str]) -> list[dict]:
    """Model ``name``'s and the baseline's accuracy within each class of one split."""
    labels = frame["label"].to_numpy()
    ours, base = (class_accuracies(frame[m].to_numpy(), labels, len(classes)) for m in (name, "baseline"))
    return [
        {"class": c, "baseline": float(b), "model": float(o), "difference": round(float(o - b), 4)}
        for c, o, b in zip(classes, ours, base, strict=True)
    ]


def _versus_baseline(frame: pd.DataFrame, name: str, cfg: PromoteConfig) -> Comparison:
    """Model ``name`` against the baseline on one split of ``predictions.csv``."""
    return versus_baseline(
        frame[name].to_numpy(), frame["baseline"].to_numpy(), frame["label"].to_numpy(), cfg
    )
