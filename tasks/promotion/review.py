"""The reviewer's side of the registry: compare the versions, approve one as champion, roll back.

``@champion`` moves here only after the version is re-validated on exactly the split it was
certified on (the project's prepared data has the version's ``data_fingerprint``): it loads from
the registry with its recorded checkpoint sha256, it is for this project's task, and it scores
exactly the test accuracy it recorded, the reload check a promotion makes before it moves an
alias. A version a run registered but left ``registration=pending`` is completed by that same
check, or refused. The move happens under the registry lock promotions take; every approve and
rollback is kept as a numbered event (:class:`Event`) that nothing overwrites, and the
``verdict`` tag follows the alias. :func:`revalidate` checks and :func:`move_champion` moves, so
the CLI can say what was checked before it waits for the lock.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import logging
import os
import re
import shlex
import socket
import time
from dataclasses import asdict, dataclass

import mlflow
import numpy as np
import pandas as pd

from shrinkflow.models.checkpoint import CheckpointError
from shrinkflow.tasks.config import Params, PromoteConfig
from shrinkflow.tasks.decision.decide import Kind
from shrinkflow.tasks.decision.stats import Comparison, compare
from shrinkflow.tasks.errors import ShrinkflowError, first_line
from shrinkflow.tasks.escape import markdown_text, one_line
from shrinkflow.tasks.promotion.promote import (
    PREVIOUS_TAG,
    REGISTRATION_TAG,
    ServedTest,
    mark_registration,
    task_difference,
    task_identity,
    verdict_once_replaced,
)
from shrinkflow.tasks.records import Manifest
from shrinkflow.tasks.stage_specs import STAGES
from shrinkflow.tasks.store.lock import REGISTRY_LOCK_STALE_S, registry_lock
from shrinkflow.tasks.store.registry import (
    load_version,
    registered_model,
    registered_version,
    set_alias,
    version_by_alias,
    version_record,
)
from shrinkflow.tasks.store.tracking import PROCESS_TAG, Tracker, process_gone, this_process

log = logging.getLogger(__name__)

REASON_CHARS = 500  # a reason is a sentence or two, not a document
# Each event is its own tag, ``audit.0001`` and on: a new event never rewrites an older one, each
# tag stays a few hundred characters whatever the history's length (one JSON log tag would have to
# drop old events at the tag size limit), the MLflow UI lists them one per row in order (it sorts
# keys as text, hence the zero padding), and the JSON of each is read back by `shrinkflow review`.
AUDIT_PREFIX = "audit."
AUDIT_DIGITS = 4
SHOWN_OVERRIDES = 6  # the `-s` overrides a refusal spells out
WHO_CHARS, WHY_CHARS = 40, 160  # of an event's text from outside, on a terminal line


class ReviewError(ShrinkflowError, RuntimeError):
    """An approval or rollback refused, in one line; nothing moved."""


@dataclass(frozen=True)
class Checked:
    """A version re-validated on the split it was certified on: what it scored, and the line that
    says so. ``pending``: its run registered it but did not complete it; the move completes it."""

    version: str
    test_acc: float
    line: str
    predictions: np.ndarray
    pending: bool = False


@dataclass(frozen=True)
class Moved:
    """``@champion`` moved to ``version`` from ``previous`` (None: there was none)."""

    version: str
    previous: str | None
    cleared_challenger: bool
    line: str


@dataclass(frozen=True)
class Event:
    """One approve or rollback, as the registry keeps it: the tag :attr:`key` (JSON) on the
    registered model (the whole history, in order) and on each version it moved ``@champion``
    between. ``number`` is taken under the registry lock, so it is the true order of events."""

    number: int
    what: str  # approve | rollback
    champion: str  # "v1 -> v2"
    who: str
    when: str
    why: str
    validated: str = ""  # what the re-validation measured

    @property
    def key(self) -> str:
        return f"{AUDIT_PREFIX}{self.number:0{AUDIT_DIGITS}d}"

    def value(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if k != "number"}, ensure_ascii=False)

    @classmethod
    def read(cls, key: str, value: str) -> Event | None:
        """The event a tag holds (None: not an audit tag, or one this code cannot read)."""
        if (number := _event_number(key)) is None:
            return None
        try:
            raw = json.loads(value)
            told = {k: str(raw[k]) for k in ("what", "champion", "who", "when", "why")}
            return cls(number, **told, validated=str(raw.get("validated", "")))
        except (ValueError, TypeError, KeyError):
            return None

    def line(self) -> str:
        """One terminal line; who and why come from outside: one line each, shortened."""
        return (
            f"#{self.number} {self.when} {self.what} {self.champion} by {one_line(self.who, WHO_CHARS)}: "
            f"{one_line(self.why, WHY_CHARS)}"
        )


def _event_number(key: str) -> int | None:
    match = re.fullmatch(rf"{re.escape(AUDIT_PREFIX)}([0-9]+)", key)
    return int(match[1]) if match else None


def history(tags: dict[str, str]) -> list[Event]:
    """The events ``tags`` (a registered model's or a version's) hold, oldest first."""
    events = (Event.read(key, value) for key, value in tags.items())
    return sorted((e for e in events if e is not None), key=lambda e: e.number)


def registered(tracker: Tracker, name: str) -> dict[str, str]:
    """The registered model's aliases (alias -> version), or one line when there is no such model."""
    model = registered_model(tracker.registry, name, tracker.uri)
    return {alias: str(version) for alias, version in model.aliases.items()}


def record_of(tracker: Tracker, name: str, version: str) -> dict[str, str]:
    """A version's tags and record, or one line: no such model, not a number, no such version."""
    found = registered_version(tracker.registry, name, version, tracker.uri)
    return version_record(tracker.registry, name, str(found.version))


def revalidate(tracker: Tracker, name: str, version: str, test: ServedTest, params: Params) -> Checked:
    """Check ``version`` before ``@champion`` moves to it: for this project's task, certified on
    exactly the split prepared here (its data fingerprint; ``params`` say how to get it back when
    it is not), not being registered by a run still going, and the reload check: loaded from the
    registry as a user would (its checkpoint must hash to the recorded sha256), it scores exactly
    its recorded test accuracy on the test images it was certified on."""
    found = registered_version(tracker.registry, name, version, tracker.uri)
    version, label = str(found.version), f"{name} v{found.version}"
    record = version_record(tracker.registry, name, version)
    if difference := task_difference(task_identity(test.manifest), record, version):
        raise ReviewError(f"{label} is for another task than this project's ({difference}); nothing moved")
    certified_split(tracker, found, record, test.manifest, params)
    sha = record.get("checkpoint_sha256")
    if not sha:
        raise ReviewError(
            f"{label} records no checkpoint_sha256, so its files cannot be verified; nothing moved"
        )
    pending = pending_registration(found, record)
    try:
        measured, predictions = reproduces(tracker, found, record, test)
    except ReviewError as exc:
        if pending:
            raise ReviewError(
                f"{label} is registration=pending (its run registered it but stopped before completing "
                f"it) and fails the reload check now too: {exc}; it stays pending: find why it does not "
                "reproduce its record (dropout or BatchNorm left in train mode, randomness in forward, "
                "a damaged file) and run the pipeline again; nothing moved"
            ) from None
        raise ReviewError(f"{exc}; nothing moved") from None
    line = (
        f"{label} re-validated: loads from the registry, sha256 {sha[:12]}... matches, same task, "
        f"{measured:.2f} on the {len(test.labels)} test images it was certified on (data "
        f"{test.manifest.fingerprint[:12]}), as recorded"
        + ("; its pending registration is completed with the move" if pending else "")
    )
    return Checked(version, measured, line, predictions, pending)


def reproduces(tracker: Tracker, found, record: dict[str, str], test: ServedTest) -> tuple[float, np.ndarray]:
    """The reload check: the version loaded from the registry scores exactly its recorded
    ``test_acc`` on ``test`` (the split it was certified on); its score and predictions."""
    name, version, label = found.name, str(found.version), f"{found.name} v{found.version}"
    try:
        predictions = test.predict(load_version(tracker, name, version, sha256=record["checkpoint_sha256"]))
    except (CheckpointError, OSError, mlflow.exceptions.MlflowException) as exc:
        raise ReviewError(f"{label} does not load from the registry ({first_line(exc, 300)})") from None
    measured = round(test.accuracy(predictions), 4)
    try:
        recorded = float(record["test_acc"])
    except (KeyError, ValueError):
        raise ReviewError(f"{label} records no test_acc to reproduce") from None
    if abs(measured - recorded) > 1e-3:  # the tag holds it to 4 decimals
        raise ReviewError(
            f"{label} scores {measured:.2f} on the {len(test.labels)} test images it was certified on, "
            f"but its record says {recorded:.2f}"
        )
    return measured, predictions


def certified_split(
    tracker: Tracker, found, record: dict[str, str], manifest: Manifest, params: Params
) -> None:
    """Refuse, in one line, unless the data prepared here is exactly the split the version was
    certified on (its ``data_fingerprint``): on another split (another seed, fractions, source)
    its test images may be its own training images, and a score there proves nothing."""
    label, theirs = f"{found.name} v{found.version}", record.get("data_fingerprint", "")
    if theirs == manifest.fingerprint:
        return
    if not theirs:
        raise ReviewError(
            f"{label} records no data_fingerprint, so the split it was certified on cannot be told; "
            "nothing moved"
        )
    raise ReviewError(
        f"{label} was certified on data {theirs[:12]}, but the data prepared here is "
        f"{manifest.fingerprint[:12]} (another seed, split or source: its test images may be {label}'s "
        f"own training images); nothing moved: get its split back with "
        f"{split_hint(tracker, found, record, params)}, then try again"
    )


def split_hint(tracker: Tracker, found, record: dict[str, str], params: Params) -> str:
    """How to prepare the split a version was certified on again: the ``prepare`` params its
    pipeline run logged that differ from this project's, as overrides; else its commit's data."""
    here, keys = _flat(params.model_dump()), STAGES["prepare"].params
    differ = {
        key: value
        for key, value in certified_params(tracker, found.run_id).items()
        if any(key == k or key.startswith(f"{k}.") for k in keys) and value != str(here.get(key))
    }
    if differ:
        overrides = sorted(differ.items())[:SHOWN_OVERRIDES]
        shown = " ".join("-s " + shlex.quote(f"{k}={'null' if v == 'None' else v}") for k, v in overrides)
        return f"`shrinkflow stage prepare {shown}` (the params its run logged)"
    if (commit := record.get("git_commit", "none")) not in ("", "none"):
        checkout = f"git checkout {commit[:12]} -- dvc.lock && dvc checkout {params.paths.prepared}"
        return f"`{checkout}` (its commit's data)"
    return "`shrinkflow stage prepare` and the seed and data params of the run that certified it"


def certified_params(tracker: Tracker, run_id: str | None) -> dict[str, str]:
    """The params the pipeline run that registered a version logged (its promote run's parent's);
    none when it ran as a DVC stage, or they cannot be read."""
    try:
        parent = tracker.run(run_id).data.tags.get("mlflow.parentRunId") if run_id else None
        return dict(tracker.run(parent).data.params) if parent else {}
    except mlflow.exceptions.MlflowException:
        return {}


def _flat(tree: dict, prefix: str = "") -> dict[str, object]:
    """Nested params as the pipeline run logs them (``data.seed``-style keys)."""
    flat: dict[str, object] = {}
    for key, value in tree.items():
        flat |= _flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
    return flat


def pending_registration(found, record: dict[str, str]) -> bool:
    """Whether a run registered the version and stopped before completing it (tag
    ``registration=pending``). As a re-run would not adopt it, it is refused, in one line, while
    the process that registered it may still be completing it: alive on this host, or on another
    host less than the registry lock's stale age ago."""
    if record.get(REGISTRATION_TAG) != "pending":
        return False
    owner, label = record.get(PROCESS_TAG, ""), f"{found.name} v{found.version}"
    if process_gone(owner):
        return True
    if owner.partition(":")[0] == socket.gethostname():
        raise ReviewError(
            f"{label} is registration=pending and {owner}, the run registering it, is still running: "
            "let it finish, then try again; nothing moved"
        )
    age = time.time() - found.creation_timestamp / 1000
    if age > REGISTRY_LOCK_STALE_S:
        return True
    raise ReviewError(
        f"{label} is registration=pending, registered {age / 60:.0f} min ago by {owner or 'a process'} on "
        f"another host, which may still be completing it: try again once that run has ended (or after "
        f"{REGISTRY_LOCK_STALE_S / 60:.0f} min); nothing moved"
    )


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
    ``@challenger`` if it pointed there, complete a pending registration, and record the event.
    ``expected``: refuse unless ``@champion`` is still that version (a rollback away from it)."""
    reason = " ".join(reason.split())[:REASON_CHARS]
    if not reason:
        raise ReviewError(f"--reason is empty: say why {name} v{checked.version} should be {cfg.alias}")
    version = checked.version
    with registry_lock(tracker.registry, name, this_process()):
        before = version_by_alias(tracker, name, cfg.alias)
        previous = str(before.version) if before is not None else None
        if expected is not None and previous != expected:
            raise ReviewError(
                f"{name}@{cfg.alias} moved from v{expected} to v{previous} meanwhile; nothing moved, "
                "review again"
            )
        if previous == version and not checked.pending:
            raise ReviewError(f"{name} v{version} is already {cfg.alias}; nothing moved")
        set_alias(tracker, name, cfg.alias, version)
        challenger = version_by_alias(tracker, name, cfg.challenger_alias)
        cleared = challenger is not None and str(challenger.version) == version
        if cleared:
            tracker.registry.delete_registered_model_alias(name, cfg.challenger_alias)
        when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        moved = f"v{previous} -> v{version}" if previous else f"none -> v{version}"
        event = Event(next_event(tracker, name), action, moved, by, when, reason, f"{checked.test_acc:.4f}")
        record_event(tracker, name, event, checked, previous, cfg)
    was = "already" if previous == version else f"was v{previous}" if previous else "was none"
    line = (
        f"{'approved' if action == 'approve' else 'rolled back to'} {name} v{version} as @{cfg.alias} "
        f"({was}), by {by}: {reason}"
        + (f"; @{cfg.challenger_alias} cleared" if cleared else "")
        + ("; its pending registration completed" if checked.pending else "")
        + f" (event {event.number})"
    )
    log.info(line)
    return Moved(version, previous, cleared, line)


def next_event(tracker: Tracker, name: str) -> int:
    """The number of the registered model's next event (called under the registry lock)."""
    return 1 + max((e.number for e in history(tracker.registry.get_registered_model(name).tags)), default=0)


def record_event(
    tracker: Tracker, name: str, event: Event, checked: Checked, previous: str | None, cfg: PromoteConfig
) -> None:
    """Keep ``event`` (on the registered model first: its history is the record), then make the
    versions say what they now are: the verdict tag follows ``@champion`` to ``checked.version``,
    the version it left reads what it now is, and each description gets the event on top."""
    client, version = tracker.registry, checked.version
    client.set_registered_model_tag(name, event.key, event.value())
    client.set_model_version_tag(name, version, event.key, event.value())
    client.set_model_version_tag(name, version, "verdict", Kind.CHAMPION)
    if checked.pending:  # the reload check passed: what a re-run would mark
        mark_registration(tracker, name, version, "complete")
    how = "Approved as `champion`" if event.what == "approve" else "Made `champion` by a rollback"
    prepend(
        tracker, name, version, f"**{how}** (event {event.number}, {event.champion})", event, checked.line
    )
    if previous == version:  # it was champion already: only its registration was pending
        return
    # What a rollback from it goes back to.
    client.set_model_version_tag(name, version, PREVIOUS_TAG, previous or "none")
    if previous is None:
        return
    now = verdict_once_replaced(tracker, name, cfg, previous)
    client.set_model_version_tag(name, previous, event.key, event.value())
    client.set_model_version_tag(name, previous, "verdict", now)
    title = f"**No longer `champion`**, now `{now}` (event {event.number}, {event.champion})"
    prepend(tracker, name, previous, title, event)


def prepend(tracker: Tracker, name: str, version: str, title: str, event: Event, checked: str = "") -> None:
    """The event at the top of the version's description, above what it said before."""
    block = (
        f"{title} by {markdown_text(event.who)} on {event.when}: {markdown_text(event.why)}."
        + (f" Re-validated: {markdown_text(checked)}." if checked else "")
        + "\n\n"
    )
    description = tracker.registry.get_model_version(name, version).description or ""
    tracker.registry.update_model_version(name, version, description=block + description)


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
    for v in tracker.registry.search_model_versions(f"name='{name}'"):
        tags = v.tags
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
                "reviewed": last_review(tags),
            }
        )
    return pd.DataFrame(rows).sort_values("version", ascending=False) if rows else pd.DataFrame(rows)


def last_review(tags: dict[str, str]) -> str:
    """A version's last approve or rollback, short (``-``: none)."""
    if events := history(tags):
        last = events[-1]
        return f"{last.what} by {one_line(last.who, WHO_CHARS)} {last.when[:10]} (#{last.number})"
    if tags.get("approved_by"):  # recorded by a shrinkflow that kept only the last event
        by = one_line(tags["approved_by"], WHO_CHARS)
        return f"{tags.get('approval')} by {by} {tags.get('approved_at', '')[:10]}"
    return "-"


def history_lines(tracker: Tracker, name: str) -> list[str]:
    """The registered model's approve and rollback events, oldest first, one line each."""
    return [event.line() for event in history(registered_model(tracker.registry, name, tracker.uri).tags)]


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
    for label, v in versions.items():
        if (data := records[label].get("data_fingerprint", "none")) != test.manifest.fingerprint:
            lines.append(
                f"{label} v{v} was certified on other data ({data[:12]}): today's test images may "
                "include its training images"
            )
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
