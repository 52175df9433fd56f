"""The reviewer's side of the registry: compare the versions, approve one as champion, roll back.

``@champion`` moves here only after the version is re-validated on the current data (it loads
from the registry with its recorded checkpoint sha256, it is for this project's task, it scores
what it recorded), under the same registry lock as a promotion, and with who, when, why and the
champion it replaced recorded as tags and in its description. :func:`revalidate` checks and
:func:`move_champion` moves, so the CLI can say what was checked before it waits for the lock.
"""

from __future__ import annotations

import datetime as dt
import getpass
import logging
import os
from dataclasses import dataclass

import mlflow
import numpy as np
import pandas as pd

from shrinkflow.models.checkpoint import CheckpointError
from shrinkflow.tasks.config import PromoteConfig
from shrinkflow.tasks.errors import ShrinkflowError, first_line
from shrinkflow.tasks.escape import markdown_text
from shrinkflow.tasks.lock import registry_lock
from shrinkflow.tasks.promote import PREVIOUS_TAG, ServedTest, task_difference, task_identity
from shrinkflow.tasks.registry import load_version, set_alias, version_by_alias, version_record
from shrinkflow.tasks.stats import Comparison, compare, margin_points
from shrinkflow.tasks.tracking import Tracker, this_process

log = logging.getLogger(__name__)

REASON_CHARS = 500  # a reason is a sentence or two, not a document


class ReviewError(ShrinkflowError, RuntimeError):
    """An approval or rollback refused, in one line; nothing moved."""


@dataclass(frozen=True)
class Checked:
    """A version re-validated on the current data: what it scored, and the line that says so."""

    version: str
    test_acc: float
    line: str
    predictions: np.ndarray


@dataclass(frozen=True)
class Moved:
    """``@champion`` moved to ``version`` from ``previous`` (None: there was none)."""

    version: str
    previous: str | None
    cleared_challenger: bool
    line: str


def registered(tracker: Tracker, name: str) -> dict[str, str]:
    """The registered model's aliases (alias -> version), or one line when there is no such model."""
    try:
        model = tracker.client.get_registered_model(name)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise ReviewError(f"there is no registered model {name!r} in {tracker.uri}") from None
        raise
    return {alias: str(version) for alias, version in model.aliases.items()}


def record_of(tracker: Tracker, name: str, version: str) -> dict[str, str]:
    """A version's tags and record, or one line naming the versions there are."""
    if not str(version).isdigit():
        raise ReviewError(f"version {version!r} of {name} is not a number")
    try:
        return version_record(tracker.client, name, str(version))
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    there = sorted(int(v.version) for v in tracker.client.search_model_versions(f"name='{name}'"))
    raise ReviewError(f"{name} has no version {version} (it has {', '.join(map(str, there)) or 'none'})")


def revalidate(tracker: Tracker, name: str, version: str, cfg: PromoteConfig, test: ServedTest) -> Checked:
    """Load ``version`` from the registry as a user would (its checkpoint must hash to the
    recorded sha256), check it is for this project's task, and measure it on today's test images:
    on the images it was certified on it must score exactly its record; on other data, no more
    than ``promote.tolerance`` below it."""
    record, label = record_of(tracker, name, version), f"{name} v{version}"
    if difference := task_difference(task_identity(test.manifest), record, str(version)):
        raise ReviewError(f"{label} is for another task than this project's ({difference}); nothing moved")
    sha = record.get("checkpoint_sha256")
    if not sha:
        raise ReviewError(
            f"{label} records no checkpoint_sha256, so its files cannot be verified; nothing moved"
        )
    try:
        predictions = test.predict(load_version(tracker, name, str(version), sha256=sha))
    except (CheckpointError, OSError, mlflow.exceptions.MlflowException) as exc:
        first = first_line(exc, 300)
        raise ReviewError(f"{label} does not load from the registry ({first}); nothing moved") from None
    measured = round(test.accuracy(predictions), 4)
    try:
        recorded = float(record["test_acc"])
    except (KeyError, ValueError):
        raise ReviewError(f"{label} records no test_acc to reproduce; nothing moved") from None
    n = len(test.labels)
    if record.get("data_fingerprint") == test.manifest.fingerprint:
        if abs(measured - recorded) > 1e-3:
            raise ReviewError(
                f"{label} scores {measured:.2f} on the {n} test images it was certified on, but its "
                f"record says {recorded:.2f}; nothing moved"
            )
        how = f"{measured:.2f} on the {n} test images it was certified on, as recorded"
    else:
        margin = margin_points(recorded, cfg.tolerance, cfg.tolerance_mode)
        if measured < recorded - margin:
            raise ReviewError(
                f"{label} scores {measured:.2f} on today's {n} test images, more than the {margin:g}-point "
                f"tolerance below the {recorded:.2f} it recorded on other data; nothing moved"
            )
        how = f"{measured:.2f} on today's {n} test images (recorded {recorded:.2f} on other data)"
    line = f"{label} re-validated: loads from the registry, sha256 {sha[:12]}... matches, same task, {how}"
    return Checked(str(version), measured, line, predictions)


def who(by: str | None) -> str:
    """The reviewer: ``--by``, else the login of whoever runs the command."""
    if by and by.strip():
        return by.strip()
    for key in ("USER", "LOGNAME"):
        if os.environ.get(key):
            return os.environ[key]
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def move_champion(
    tracker: Tracker,
    name: str,
    checked: Checked,
    reason: str,
    by: str,
    cfg: PromoteConfig,
    action: str = "approve",
    expected: str | None = None,
) -> Moved:
    """Point ``@champion`` at the re-validated version under the registry lock, clear
    ``@challenger`` if it pointed there, and record the approval. ``expected``: refuse unless
    ``@champion`` is still that version (a rollback away from it)."""
    reason = " ".join(reason.split())[:REASON_CHARS]
    if not reason:
        raise ReviewError(f"--reason is empty: say why {name} v{checked.version} should be {cfg.alias}")
    version, client = checked.version, tracker.client
    with registry_lock(client, name, this_process()):
        before = version_by_alias(tracker, name, cfg.alias)
        previous = str(before.version) if before is not None else None
        if expected is not None and previous != expected:
            raise ReviewError(
                f"{name}@{cfg.alias} moved from v{expected} to v{previous} meanwhile; nothing moved, "
                "review again"
            )
        if previous == version:
            raise ReviewError(f"{name} v{version} is already {cfg.alias}; nothing moved")
        set_alias(tracker, name, cfg.alias, version)
        challenger = version_by_alias(tracker, name, cfg.challenger_alias)
        cleared = challenger is not None and str(challenger.version) == version
        if cleared:
            client.delete_registered_model_alias(name, cfg.challenger_alias)
        when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        record_approval(tracker, name, checked, action, by, when, reason, previous)
    verb = "approved" if action == "approve" else "rolled back to"
    line = (
        f"{verb} {name} v{version} as @{cfg.alias} (was {f'v{previous}' if previous else 'none'}), "
        f"by {by}: {reason}" + (f"; @{cfg.challenger_alias} cleared" if cleared else "")
    )
    log.info(line)
    return Moved(version, previous, cleared, line)


def record_approval(
    tracker: Tracker,
    name: str,
    checked: Checked,
    action: str,
    by: str,
    when: str,
    reason: str,
    previous: str | None,
) -> None:
    """The approval as tags (what a reviewer filters on) and at the top of the description."""
    version, client = checked.version, tracker.client
    tags = {
        "approval": action,
        "approved_by": by,
        "approved_at": when,
        "approval_reason": reason,
        PREVIOUS_TAG: previous or "none",
        "validated_test_acc": f"{checked.test_acc:.4f}",
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    what = "Approved as `champion`" if action == "approve" else "Rolled back to as `champion`"
    block = (
        f"**{what}** by {markdown_text(by)} on {when}: {markdown_text(reason)}. Previous champion: "
        f"{f'v{previous}' if previous else 'none'}. Re-validated: {markdown_text(checked.line)}.\n\n"
    )
    description = client.get_model_version(name, version).description or ""
    client.update_model_version(name, version, description=block + description)


def rollback_target(tracker: Tracker, name: str, cfg: PromoteConfig, to: str | None) -> tuple[str, str]:
    """``(target, current)``: the version to roll back to (``to``, else the one the current
    champion recorded as its predecessor) and the current champion."""
    current = registered(tracker, name).get(cfg.alias)
    if current is None:
        raise ReviewError(f"{name} has no @{cfg.alias} to roll back from; use `shrinkflow approve`")
    if to is not None:
        return str(to), current
    previous = record_of(tracker, name, current).get(PREVIOUS_TAG, "none")
    if previous in ("", "none"):
        raise ReviewError(
            f"{name}@{cfg.alias} v{current} records no previous champion (it was the first); "
            "pass --to VERSION"
        )
    return previous, current


# review --------------------------------------------------------------------------------------


def versions_table(tracker: Tracker, name: str) -> pd.DataFrame:
    """Every version, newest first: aliases, verdict and the figures a reviewer compares."""
    aliases = registered(tracker, name)
    by_version: dict[str, list[str]] = {}
    for alias, version in aliases.items():
        by_version.setdefault(version, []).append(alias)
    rows = []
    for v in tracker.client.search_model_versions(f"name='{name}'"):
        tags = v.tags
        approved = tags.get("approved_by")
        rows.append(
            {
                "version": int(v.version),
                "aliases": ",".join(sorted(by_version.get(str(v.version), []))) or "-",
                "verdict": tags.get("verdict", "?"),
                "candidate": tags.get("candidate", "?"),
                "composition": tags.get("composition", tags.get("strategy", "?")),
                "params": tags.get("params", "?"),
                "size_bytes": tags.get("size_bytes", "?"),
                "test_acc": tags.get("test_acc", "?"),
                "vs_baseline_pts": tags.get("test_acc_change_pts", "?"),
                "approved": f"{tags.get('approval')} by {approved} {tags.get('approved_at', '')[:10]}"
                if approved
                else "-",
            }
        )
    return pd.DataFrame(rows).sort_values("version", ascending=False) if rows else pd.DataFrame(rows)


def side_by_side(
    tracker: Tracker, name: str, versions: dict[str, str], test: ServedTest, cfg: PromoteConfig
) -> list[str]:
    """``versions`` (label -> version, champion first) figure by figure, then the second against
    the first, paired on today's test images, with the promotion's statistics."""
    records = {label: record_of(tracker, name, v) for label, v in versions.items()}
    predicted, problems = {}, []
    for label, v in versions.items():
        try:
            sha = records[label].get("checkpoint_sha256")
            predicted[label] = test.predict(load_version(tracker, name, v, sha256=sha))
        except Exception as exc:  # a review shows what it can; approve refuses such a version
            first = first_line(exc)
            problems.append(f"{label} v{v} does not load: {first}")
    keys = ["candidate", "composition", "params", "size_bytes", "flops", "latency_ms", "gate_acc", "test_acc"]
    frame = pd.DataFrame(
        {f"{label} v{v}": [records[label].get(k, "-") for k in keys] for label, v in versions.items()},
        index=[*keys[:-1], "test_acc (recorded)"],
    )
    frame.loc["test_acc today"] = [
        f"{test.accuracy(predicted[label]):.2f}" if label in predicted else "-" for label in versions
    ]
    lines = [frame.to_string(), *problems]
    (first, a), (second, b) = list(versions.items())[:2]
    if first in predicted and second in predicted:
        versus = paired(predicted[second], predicted[first], test.labels, cfg)
        lines.append(
            f"{second} v{b} minus {first} v{a} on today's {versus.n} test images: "
            f"{versus.delta:+.2f} points, {versus.confidence:.0%} bounds "
            f"[{versus.lower:+.2f}, {versus.upper:+.2f}] ({versus.gain} right only by v{b}, "
            f"{versus.loss} only by v{a}); not worse by {cfg.champion_tolerance:g} points: "
            f"{'yes' if versus.passed else 'no'}"
        )
    return lines


def paired(ours: np.ndarray, theirs: np.ndarray, labels: np.ndarray, cfg: PromoteConfig) -> Comparison:
    """``ours`` against ``theirs`` on the same images, as a promotion compares with the champion."""
    return compare(ours == labels, theirs == labels, cfg.champion_tolerance, cfg.confidence or 0.95)
