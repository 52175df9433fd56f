"""Stage 5: pick the smallest model within tolerance of the baseline, judge it against the
registry's current champion, register it, validate it, and only then move an alias.

Selection uses validation accuracy (the test set stays out of every choice within a run). The
run's winner then meets the current champion on the *current* test data: it takes the champion
alias only if it is smaller without being worse beyond ``champion_tolerance``, or more accurate
at comparable size; otherwise it becomes the challenger. Either way the new version is loaded
back from the registry and must reproduce its test accuracy before any alias moves.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import pandas as pd
import torch

from tasks.config import Params, PromoteConfig
from tasks.engine import Split, accuracy
from tasks.errors import ShrinkflowError
from tasks.evaluate import load_table
from tasks.io import read_json, write_json
from tasks.layout import Layout
from tasks.prepare import load_manifest, load_split
from tasks.tracking import Tracker
from tasks.train import load_record

log = logging.getLogger(__name__)


class PromotionError(ShrinkflowError, RuntimeError):
    """The winner could not be registered and validated; no alias was moved."""


@dataclass
class Decision:
    winner: str
    strategy: str
    ratio: float
    objective: str
    objective_value: float
    val_acc: float
    test_acc: float
    baseline_val_acc: float
    baseline_test_acc: float
    min_val_acc: float
    tolerance: float
    tolerance_mode: str
    eligible: list[str]
    reason: str
    verdict: str = ""  # champion | challenger | unchanged
    verdict_reason: str = ""
    forced: bool = False
    champion_before: dict = field(default_factory=dict)
    registry: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Champion:
    version: str
    test_acc: float | None  # None: it no longer loads
    size: float
    sha256: str
    error: str = ""


def within_tolerance_floor(baseline_acc: float, tolerance: float, mode: str) -> float:
    """The lowest accuracy still within ``tolerance`` (points, or percent when relative)."""
    if mode == "relative":
        return baseline_acc * (1 - tolerance / 100)
    return baseline_acc - tolerance


def select_winner(table: pd.DataFrame, cfg: PromoteConfig) -> Decision:
    """Among healthy models within tolerance (the baseline always is), the smallest by
    ``cfg.objective``; ties go to the higher validation accuracy, then the name."""
    base = table[table["name"] == "baseline"].iloc[0]
    if base["status"] != "ok":
        raise PromotionError("the baseline has no measurements; nothing can be promoted")
    floor = within_tolerance_floor(float(base["val_acc"]), cfg.tolerance, cfg.tolerance_mode)
    ok = table[table["status"] == "ok"]
    if len(ok) == 1:
        raise PromotionError(f"all {len(table) - 1} candidates failed; nothing promoted, no alias moved")
    eligible = ok[ok["val_acc"] >= floor - 1e-9]
    best = eligible.sort_values([cfg.objective, "val_acc", "name"], ascending=[True, False, True]).iloc[0]
    rejected = sorted(set(ok["name"]) - set(eligible["name"]))
    reason = (
        f"{best['name']} has the fewest {cfg.objective} ({best[cfg.objective]:g}) of the "
        f"{len(eligible)} models whose validation accuracy is at least {floor:.2f} "
        f"(baseline {base['val_acc']:.2f} - {cfg.tolerance} {cfg.tolerance_mode})"
        + (f"; outside tolerance: {', '.join(rejected)}" if rejected else "")
    )
    return Decision(
        winner=str(best["name"]),
        strategy=str(best["strategy"]),
        ratio=float(best["ratio"]),
        objective=cfg.objective,
        objective_value=float(best[cfg.objective]),
        val_acc=float(best["val_acc"]),
        test_acc=float(best["test_acc"]),
        baseline_val_acc=float(base["val_acc"]),
        baseline_test_acc=float(base["test_acc"]),
        min_val_acc=round(floor, 4),
        tolerance=cfg.tolerance,
        tolerance_mode=cfg.tolerance_mode,
        eligible=sorted(eligible["name"]),
        reason=reason,
    )


def judge(decision: Decision, champion: Champion | None, cfg: PromoteConfig) -> tuple[str, str]:
    """Which alias the run's winner deserves against the current champion, and why."""
    if champion is None:
        return cfg.alias, f"there is no {cfg.alias} yet"
    if champion.test_acc is None:
        return cfg.alias, f"the current {cfg.alias} v{champion.version} no longer loads ({champion.error})"
    ours, theirs = (decision.test_acc, decision.objective_value), (champion.test_acc, champion.size)
    vs = f"v{champion.version} ({theirs[0]:.2f}% test, {theirs[1]:g} {cfg.objective})"
    me = f"{ours[0]:.2f}% test, {ours[1]:g} {cfg.objective}"
    if ours[1] < theirs[1] and ours[0] >= theirs[0] - cfg.champion_tolerance:
        return cfg.alias, f"smaller than {cfg.alias} {vs} and within {cfg.champion_tolerance} points ({me})"
    if ours[0] > theirs[0] and ours[1] <= theirs[1] * (1 + cfg.comparable_size):
        return cfg.alias, f"more accurate than {cfg.alias} {vs} at comparable size ({me})"
    return cfg.challenger_alias, f"not better than {cfg.alias} {vs}: {me}"


def current_champion(tracker: Tracker, cfg: PromoteConfig, test: Split) -> Champion | None:
    """The registry's current champion, re-measured on today's test data."""
    version = tracker.version_by_alias(cfg.model_name, cfg.alias)
    if version is None:
        return None
    size = float(version.tags.get(cfg.objective, "inf"))
    sha = version.tags.get("checkpoint_sha256", "")
    try:
        probs = tracker.load_version(cfg.model_name, version.version).predict(test[0].numpy())
    except Exception as exc:  # a champion that cannot load is reported and replaced
        return Champion(str(version.version), None, size, sha, error=f"{type(exc).__name__}: {exc}"[:300])
    return Champion(str(version.version), accuracy(torch.from_numpy(probs.argmax(1)), test[1]), size, sha)


def promote(
    params: Params,
    layout: Layout,
    tracker: Tracker,
    run_id: str,
    extra_tags: dict[str, str] | None = None,
    force: bool = False,
) -> Decision:
    """Register this run's winner and move the alias the rules (or ``force``) give it."""
    cfg = params.promote
    table = load_table(layout.candidates_csv)
    decision = select_winner(table, cfg)
    record = load_record(layout, decision.winner)
    test = load_split(layout, "test")
    champion = current_champion(tracker, cfg, test)
    decision.champion_before = asdict(champion) if champion else {}
    if champion and champion.sha256 == record.sha256 and not force:
        decision.verdict, decision.verdict_reason = (
            "unchanged",
            f"identical to {cfg.alias} v{champion.version}",
        )
        decision.registry = {"model_name": cfg.model_name, "version": champion.version, "alias": cfg.alias}
        write_json(layout.promotion_json, asdict(decision))
        return decision
    alias, why = judge(decision, champion, cfg)
    if force and alias != cfg.alias:
        alias, why, decision.forced = cfg.alias, f"forced by the operator (rules said: {why})", True
    decision.verdict, decision.verdict_reason = ("champion" if alias == cfg.alias else "challenger"), why
    row = table[table["name"] == decision.winner].iloc[0]
    tags = version_tags(decision, row, load_manifest(layout).fingerprint, record.sha256, extra_tags or {})
    version = tracker.register_model(
        run_id, layout.root / record.checkpoint, cfg.model_name, example=test[0][:2], tags=tags,
        description=describe(decision, table, alias),
    )  # fmt: skip
    validate(tracker, cfg.model_name, version, test, decision.test_acc)
    tracker.set_alias(cfg.model_name, alias, version)
    decision.registry = {
        "model_name": cfg.model_name,
        "version": str(version),
        "alias": alias,
        "run_id": run_id,
    }
    write_json(layout.promotion_json, asdict(decision))
    log.info("registered %s as %s v%s @%s: %s", decision.winner, cfg.model_name, version, alias, why)
    return decision


def version_tags(
    decision: Decision, row: pd.Series, fingerprint: str, sha256: str, extra: dict[str, str]
) -> dict[str, str]:
    tags = {
        "strategy": decision.strategy,
        "ratio": decision.ratio,
        "candidate": decision.winner,
        "params": int(row["params"]),
        "flops": int(row["flops"]),
        "size_bytes": int(row["size_bytes"]),
        "latency_ms": round(float(row["latency_ms"]), 4),
        "val_acc": round(decision.val_acc, 4),
        "test_acc": round(decision.test_acc, 4),
        "baseline_val_acc": round(decision.baseline_val_acc, 4),
        "baseline_test_acc": round(decision.baseline_test_acc, 4),
        "acc_drop": round(decision.baseline_test_acc - decision.test_acc, 4),
        "tolerance": f"{decision.tolerance} {decision.tolerance_mode}",
        "data_fingerprint": fingerprint,
        "checkpoint_sha256": sha256,
        "verdict": decision.verdict,
        "forced": str(decision.forced).lower(),
        **extra,
    }
    return {k: str(v) for k, v in tags.items()}


def describe(decision: Decision, table: pd.DataFrame, alias: str) -> str:
    """The Markdown a reviewer reads on the version page."""
    row = table[table["name"] == decision.winner].iloc[0]
    base = table[table["name"] == "baseline"].iloc[0]
    before = decision.champion_before
    champ = f"v{before['version']} ({before['test_acc']}% test)" if before else "none"
    return "\n".join(
        [
            f"**Registered as `{alias}`**{' (forced)' * decision.forced}: {decision.verdict_reason}.",
            "",
            f"Selected in its run because {decision.reason}.",
            "",
            "| | this version | baseline |",
            "|---|---|---|",
            f"| test accuracy | {decision.test_acc:.2f} | {decision.baseline_test_acc:.2f} |",
            f"| val accuracy | {decision.val_acc:.2f} | {decision.baseline_val_acc:.2f} |",
            f"| params | {int(row['params'])} | {int(base['params'])} |",
            f"| FLOPs | {int(row['flops'])} | {int(base['flops'])} |",
            f"| size (bytes) | {int(row['size_bytes'])} | {int(base['size_bytes'])} |",
            f"| latency (ms, batch 1) | {float(row['latency_ms']):.3f} | {float(base['latency_ms']):.3f} |",
            "",
            f"Champion before this run: {champ}. "
            f"Strategy `{decision.strategy}`, candidate `{decision.winner}`.",
        ]
    )


def validate(tracker: Tracker, name: str, version: str, test: Split, expected_acc: float) -> None:
    """Load the version back from the registry and check it reproduces its test accuracy."""
    try:
        probs = tracker.load_version(name, version).predict(test[0].numpy())
    except Exception as exc:
        raise PromotionError(
            f"registered {name} v{version} failed to load back; no alias moved: {exc}"
        ) from exc
    measured = accuracy(torch.from_numpy(probs.argmax(1)), test[1])
    if measured != expected_acc:
        raise PromotionError(
            f"registered {name} v{version} scores {measured:.4f} on the test set, "
            f"expected {expected_acc:.4f}; no alias moved"
        )


def load_decision(layout: Layout) -> Decision:
    return Decision(**read_json(layout.promotion_json))
