"""Stage 5: pick the smallest model within tolerance of the baseline and register it.

Selection uses validation accuracy (the test set stays untouched by every choice); test
accuracy is what gets reported. The registered version is loaded back from the registry and
re-checked before the alias moves, so an alias only ever points at a validated version.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import pandas as pd
import torch

from tasks.config import Params, PromoteConfig
from tasks.engine import accuracy
from tasks.io import read_json, write_json
from tasks.layout import Layout
from tasks.prepare import load_manifest, load_split
from tasks.tracking import Tracker
from tasks.train import load_record

log = logging.getLogger(__name__)


class PromotionError(RuntimeError):
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
    registry: dict[str, str] = field(default_factory=dict)


def min_val_accuracy(baseline_val_acc: float, cfg: PromoteConfig) -> float:
    """The lowest validation accuracy still within tolerance of the baseline."""
    if cfg.tolerance_mode == "relative":
        return baseline_val_acc * (1 - cfg.tolerance / 100)
    return baseline_val_acc - cfg.tolerance


def select_winner(table: pd.DataFrame, cfg: PromoteConfig) -> Decision:
    """Among healthy models within tolerance (the baseline always is), the smallest by
    ``cfg.objective``; ties go to the higher validation accuracy, then the name."""
    base = table[table["name"] == "baseline"].iloc[0]
    floor = min_val_accuracy(float(base["val_acc"]), cfg)
    ok = table[table["status"] == "ok"]
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


def version_tags(
    decision: Decision, row: pd.Series, fingerprint: str, extra: dict[str, str]
) -> dict[str, str]:
    tags = {
        "strategy": decision.strategy,
        "ratio": decision.ratio,
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
        **extra,
    }
    return {k: str(v) for k, v in tags.items()}


def promote(
    params: Params, layout: Layout, tracker: Tracker, run_id: str, extra_tags: dict[str, str] | None = None
) -> Decision:
    """Register the winner under ``params.promote.model_name``, validate it, then move the alias."""
    cfg = params.promote
    table = pd.read_csv(layout.candidates_csv)
    decision = select_winner(table, cfg)
    record = load_record(layout, decision.winner)
    row = table[table["name"] == decision.winner].iloc[0]
    fingerprint = load_manifest(layout).fingerprint
    test = load_split(layout, "test")
    version = tracker.register_model(
        run_id,
        layout.root / record.checkpoint,
        cfg.model_name,
        example=test[0][:2],
        tags=version_tags(decision, row, fingerprint, extra_tags or {}),
        description=f"**Promoted to `{cfg.alias}`.** {decision.reason}.",
    )
    _validate(tracker, cfg.model_name, version, test, decision.test_acc)
    tracker.set_alias(cfg.model_name, cfg.alias, version)
    decision.registry = {
        "model_name": cfg.model_name,
        "version": str(version),
        "alias": cfg.alias,
        "run_id": run_id,
    }
    write_json(layout.promotion_json, asdict(decision))
    log.info("promoted %s as %s v%s@%s", decision.winner, cfg.model_name, version, cfg.alias)
    return decision


def _validate(tracker: Tracker, name: str, version: str, test, expected_acc: float) -> None:
    """Load the version back from the registry and check it reproduces its test accuracy."""
    try:
        loaded = tracker.load_version(name, version)
        probs = loaded.predict(test[0].numpy())
    except Exception as exc:
        raise PromotionError(f"registered {name} v{version} failed to load back: {exc}") from exc
    measured = accuracy(torch.from_numpy(probs.argmax(1)), test[1])
    if measured != expected_acc:
        raise PromotionError(
            f"registered {name} v{version} scores {measured:.4f} on the test set, "
            f"expected {expected_acc:.4f}; no alias moved"
        )


def load_decision(layout: Layout) -> Decision:
    return Decision(**read_json(layout.promotion_json))
