"""Stage 5: pick the smallest model that passes the gate, let test veto it, judge it against the
registry's current champion, register it, validate it, and only then move an alias.

Every decision is a paired comparison on shared images (:mod:`shrinkflow.tasks.gate`):

- **choose** on the gate split: a model is eligible when the one-sided lower confidence bound of
  its accuracy minus the baseline's is above ``-tolerance``; the smallest eligible model wins.
  Nothing else is ever chosen on the gate split (epochs and ratio searches use validation).
- **veto** on test: when the winner's whole test interval against the baseline lies beyond the
  tolerance, test disagrees with the gate and nothing is registered (unless forced).
- **against the champion** on the current test images: the winner takes the alias when it is
  smaller and non-inferior by ``champion_tolerance``, or better at comparable size (lower bound
  above zero); otherwise it becomes the challenger.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace

import mlflow
import numpy as np
import pandas as pd
import torch

from shrinkflow.models.checkpoint import CheckpointError
from shrinkflow.tasks.config import Params, PromoteConfig
from shrinkflow.tasks.engine import accuracy
from shrinkflow.tasks.errors import ShrinkflowError
from shrinkflow.tasks.escape import markdown_code, markdown_text
from shrinkflow.tasks.evaluate import load_predictions, load_table
from shrinkflow.tasks.gate import certifiable, class_accuracies, versus_baseline
from shrinkflow.tasks.given import lineage_tags
from shrinkflow.tasks.io import read_json, write_json
from shrinkflow.tasks.layout import Layout
from shrinkflow.tasks.lock import registry_lock
from shrinkflow.tasks.prepare import load_raw_split, normalise
from shrinkflow.tasks.records import Manifest, load_manifest, load_record
from shrinkflow.tasks.stats import Comparison, compare
from shrinkflow.tasks.tracking import PROCESS_TAG, Tracker, predicted_classes, process_gone, this_process

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
    gate_acc: float
    test_acc: float
    baseline_val_acc: float
    baseline_gate_acc: float
    baseline_test_acc: float
    tolerance: float
    tolerance_mode: str
    confidence: float | None
    eligible: list[str]
    reason: str
    gate: dict = field(default_factory=dict)  # the winner against the baseline on gate (Comparison)
    test: dict = field(default_factory=dict)  # ... and on test: the veto's evidence
    summary: str = ""  # "l1-75: -0.4 points (95% bound -1.3 > -2.0) on 540 gate images"
    warning: str = ""  # e.g. the gate split is too small to certify the tolerance
    verdict: str = ""  # champion | challenger | unchanged | vetoed
    verdict_reason: str = ""
    forced: bool = False
    champion_before: dict = field(default_factory=dict)
    champion_comparison: dict = field(default_factory=dict)
    per_class: list[dict] = field(default_factory=list)  # test accuracy per class: winner, baseline
    registry: dict[str, str] = field(default_factory=dict)


SERVED_BATCH = 1024  # test images a served model predicts at a time (uint8 in, float inside)


@dataclass(frozen=True)
class ServedTest:
    """The test split as a served model takes it (stored uint8 pixels, memory-mapped), with its
    labels and class names; a served model sees it a batch at a time."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    manifest: Manifest

    @classmethod
    def load(cls, layout: Layout) -> ServedTest:
        (images, labels), manifest = load_raw_split(layout, "test"), load_manifest(layout)
        return cls(images.numpy(), labels.numpy(), manifest.classes, manifest)

    def normalised(self, rows: slice) -> np.ndarray:
        """The images at ``rows`` as the pipeline's models take them."""
        return normalise(torch.from_numpy(self.images[rows]), self.manifest).numpy()

    def predict(self, model) -> np.ndarray:
        """A registered version's predicted class for every test image."""
        batches = (slice(i, i + SERVED_BATCH) for i in range(0, len(self.images), SERVED_BATCH))
        return np.concatenate(
            [predicted_classes(model, self.images[b], self.normalised(b), self.classes) for b in batches]
        )

    def accuracy(self, predictions: np.ndarray) -> float:
        return accuracy(torch.from_numpy(predictions), torch.from_numpy(self.labels))


@dataclass(frozen=True)
class Champion:
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


def select_winner(table: pd.DataFrame, cfg: PromoteConfig) -> Decision:
    """Among healthy models that pass the gate (``eligible``; the baseline always does), the
    smallest by ``cfg.objective``; ties go to the higher gate accuracy, then the name."""
    base = table[table["name"] == "baseline"].iloc[0]
    if base["status"] != "ok":
        raise PromotionError("the baseline has no measurements; nothing can be promoted")
    ok = table[table["status"] == "ok"]
    if len(ok) == 1:
        raise PromotionError(f"all {len(table) - 1} candidates failed; nothing promoted, no alias moved")
    eligible = ok[ok["eligible"].astype(bool)]
    rejected = [_why_not(row, cfg) for _, row in ok.iterrows() if row["name"] not in set(eligible["name"])]
    slower_int8 = []
    if cfg.objective == "latency_ms" and "float_latency_ms" in ok:
        # A latency objective never picks int8 kernels that are slower than the float ones here.
        slower = eligible["float_latency_ms"].notna() & (
            eligible["latency_ms"] >= eligible["float_latency_ms"]
        )
        slower_int8 = sorted(eligible.loc[slower, "name"])
        eligible = eligible[~slower]
    best = eligible.sort_values([cfg.objective, "gate_acc", "name"], ascending=[True, False, True]).iloc[0]
    rule = (
        f"whose {cfg.confidence:.0%} lower bound of gate accuracy minus the baseline's is above "
        if cfg.confidence
        else "whose gate accuracy minus the baseline's (point rule, no confidence bound) is at least "
    )
    reason = (
        f"{best['name']} has the fewest {cfg.objective} ({best[cfg.objective]:g}) of the "
        f"{len(eligible)} models {rule}-{cfg.tolerance:g} ({cfg.tolerance_mode})"
        + (f"; failed the gate: {', '.join(sorted(rejected))}" if rejected else "")
        + (f"; int8 slower than its float twin here: {', '.join(slower_int8)}" if slower_int8 else "")
    )
    return Decision(
        winner=str(best["name"]),
        strategy=str(best["strategy"]),
        ratio=float(best["ratio"]),
        objective=cfg.objective,
        objective_value=float(best[cfg.objective]),
        val_acc=float(best["val_acc"]),
        gate_acc=float(best["gate_acc"]),
        test_acc=float(best["test_acc"]),
        baseline_val_acc=float(base["val_acc"]),
        baseline_gate_acc=float(base["gate_acc"]),
        baseline_test_acc=float(base["test_acc"]),
        tolerance=cfg.tolerance,
        tolerance_mode=cfg.tolerance_mode,
        confidence=cfg.confidence,
        eligible=sorted(eligible["name"]),
        reason=reason,
    )


def _why_not(row: pd.Series, cfg: PromoteConfig) -> str:
    """A model that is not eligible, and why when it is the per-class guard."""
    lost = row.get("worst_class_drop")
    if cfg.max_class_drop is not None and lost == lost and lost is not None and lost > cfg.max_class_drop:
        return (
            f"{row['name']} (loses {lost:g} points on class {row['worst_class']!r} > {cfg.max_class_drop:g})"
        )
    return str(row["name"])


def vetoed_by_test(test: Comparison) -> bool:
    """Test vetoes the gate's choice when even its upper bound lies beyond the tolerance."""
    return test.upper < -test.margin


def judge(
    decision: Decision, champion: Champion | None, versus: Comparison | None, cfg: PromoteConfig
) -> tuple[str, str]:
    """Which alias the run's winner deserves against the current champion, and why; ``versus``
    is the winner against the champion on the current test images."""
    if champion is None:
        return cfg.alias, f"there is no {cfg.alias} yet"
    if versus is None:
        return cfg.alias, f"the current {cfg.alias} v{champion.version} {champion.error}"
    ours, theirs = decision.objective_value, champion.size
    vs = f"{cfg.alias} v{champion.version} ({theirs:g} {cfg.objective}; ours {ours:g})"
    evidence = versus.line(decision.winner, "test")
    if ours < theirs and versus.passed:
        return cfg.alias, f"smaller than {vs} and not worse by {cfg.champion_tolerance:g} points: {evidence}"
    if versus.lower > 0 and ours <= theirs * (1 + cfg.comparable_size):
        return cfg.alias, f"more accurate than {vs} at comparable size: {evidence}"
    return cfg.challenger_alias, f"not better than {vs}: {evidence}"


def current_champion(
    tracker: Tracker, cfg: PromoteConfig, test: ServedTest, identity: dict[str, str], force: bool = False
) -> Champion | None:
    """The registry's current champion and its predictions on today's test images, once its task
    is known to be this run's (``identity``; a different one is refused before anything loads,
    unless ``force``: then it is returned as not comparable).

    Only a champion whose files are gone or refused counts as "no longer loads"; any other
    failure (the tracking server, the network) is raised, so nothing moves on a blip."""
    try:
        version = tracker.version_by_alias(cfg.model_name, cfg.alias)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise PromotionError(
            f"could not read {cfg.model_name}@{cfg.alias} from the registry ({first}); "
            "nothing registered, no alias moved"
        ) from exc
    if version is None:
        return None
    size = float(version.tags.get(cfg.objective, "inf"))
    sha, tags = version.tags.get("checkpoint_sha256", ""), dict(version.tags)
    gone = Champion(str(version.version), None, size, sha, tags)
    if difference := task_difference(identity, tags, str(version.version)):
        if not force:
            raise PromotionError(identity_mismatch(identity, tags, cfg, str(version.version)))
        return replace(gone, error=f"is for another task ({difference})", other_task=True)
    if not sha:
        return replace(gone, error="records no checkpoint_sha256, so its files cannot be verified")
    try:
        predictions = test.predict(tracker.load_version(cfg.model_name, version.version, sha256=sha))
    except (FileNotFoundError, CheckpointError) as exc:
        return replace(gone, error=f"no longer loads ({_first_line(exc)})")
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST" and "No such file" not in str(exc):
            raise PromotionError(_unreachable(cfg, version.version, exc)) from exc
        return replace(gone, error=f"no longer loads ({_first_line(exc)})")
    except Exception as exc:
        raise PromotionError(_unreachable(cfg, version.version, exc)) from exc
    return replace(gone, predictions=predictions)


def _unreachable(cfg: PromoteConfig, version: str, exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return (
        f"could not load {cfg.model_name}@{cfg.alias} v{version} to compare with it "
        f"({type(exc).__name__}: {first}); nothing registered, no alias moved"
    )


def task_identity(manifest: Manifest) -> dict[str, str]:
    """What a registered model classifies: a model name holds one task."""
    return {
        "task_source": manifest.source,
        "task_classes": json.dumps(manifest.classes),
        "task_input_shape": "x".join(str(d) for d in manifest.input_shape),
    }


def task_difference(ours: dict[str, str], champion: dict[str, str], version: str) -> str:
    """How the champion's task tags differ from ours ("": the same task)."""
    differ = [key for key in ours if champion.get(key) != ours[key]]
    if not differ:
        return ""
    if not any(key in champion for key in ours):
        return f"v{version} carries no task tags: registered outside shrinkflow?"
    return "; ".join(f"{key.removeprefix('task_')} {champion.get(key)} vs {ours[key]}" for key in differ)


def identity_mismatch(
    ours: dict[str, str], champion: dict[str, str], cfg: PromoteConfig, version: str = "?"
) -> str | None:
    """Why the winner cannot join the champion's model name (``None``: same task). A champion
    without any task tag (registered by hand, or by another tool) counts as another task."""
    if not (shown := task_difference(ours, champion, version)):
        return None
    n_classes, shape = len(json.loads(ours["task_classes"])), ours["task_input_shape"]
    suggestion = f"{cfg.model_name}-{n_classes}c-{shape}"
    return (
        f"this run's task differs from {cfg.model_name}@{cfg.alias}'s ({shown}); refusing to register "
        f"it under that name: set promote.model_name, e.g. {suggestion}, or pass --force to replace "
        f"that {cfg.alias}"
    )


Publish = Callable[[Decision], None]


def promote(
    params: Params,
    layout: Layout,
    tracker: Tracker,
    run_id: str,
    extra_tags: dict[str, str] | None = None,
    force: bool = False,
    publish: Publish | None = None,
) -> Decision:
    """Register this run's winner and move the alias the rules (or ``force``) give it.

    ``publish`` writes what reviewers read (``promotion.json`` by default); it runs once the
    verdict is final, and if it fails the alias move is undone, so no decision file ever
    disagrees with the registry."""
    cfg = params.promote
    publish = publish or (lambda decision: write_json(layout.promotion_json, asdict(decision)))
    table = load_table(layout.candidates_csv)
    decision = select_winner(table, cfg)
    predictions = load_predictions(layout.predictions_csv)
    gate, test = predictions["gate"], predictions["test"]
    won, on_test = _versus_baseline(gate, decision.winner, cfg), _versus_baseline(test, decision.winner, cfg)
    decision.gate, decision.test = won.as_dict(), on_test.as_dict()
    decision.summary, decision.warning = won.line(decision.winner), certifiable(cfg, won.n) or ""

    manifest, record = load_manifest(layout), load_record(layout, decision.winner)
    served = ServedTest.load(layout)
    identity = task_identity(manifest)
    arena = Arena(
        tracker, cfg, served, identity, test, on_test, decision, record.sha256, force, manifest.fingerprint
    )
    champion = arena.meet(current_champion(tracker, cfg, served, identity, force))
    decision.per_class = per_class(test, decision.winner, served.classes)

    if vetoed_by_test(on_test) and not force:
        decision.verdict = "vetoed"
        decision.verdict_reason = (
            f"test disagrees: {on_test.line(decision.winner, 'test')}, and even its upper bound "
            f"{on_test.upper:+.2f} lies beyond the tolerance; nothing registered, no alias moved"
        )
        publish(decision)
        return decision
    if decision.verdict == "unchanged":
        decision.registry = {"model_name": cfg.model_name, "version": champion.version, "alias": cfg.alias}
        if champion.tags.get(REGISTRATION_TAG) == "pending":  # its run died after the alias move
            mark_registration(tracker, cfg.model_name, champion.version, "complete")
        publish(decision)
        return decision
    tags = {**arena.identity, **lineage_tags(load_record(layout, "baseline").origin), **(extra_tags or {})}
    if champion:
        tags["champion_data_fingerprint"] = champion.tags.get("data_fingerprint", "")
    row = table[table["name"] == decision.winner].iloc[0]
    version = pending_version(tracker, cfg.model_name, record.sha256, decision.verdict)
    if version is None:
        version = tracker.register_model(
            run_id,
            layout.root / record.checkpoint,
            cfg.model_name,
            manifest=layout.manifest,
            example=torch.from_numpy(served.normalised(slice(0, 2))),
            raw_example=served.images[:2],
            tags=version_tags(decision, row, manifest.fingerprint, record.sha256, tags),
            description=describe(decision, table, decision_alias(decision, cfg)),
        )
    validate(tracker, cfg.model_name, version, served, decision.test_acc, record.sha256)
    alias, previous = arena.move_alias(version, champion)
    return settle(tracker, cfg, decision, table, version, alias, previous, run_id, publish)


def settle(
    tracker: Tracker,
    cfg: PromoteConfig,
    decision: Decision,
    table: pd.DataFrame,
    version: str,
    alias: str | None,
    previous: str | None,
    run_id: str,
    publish: Publish,
) -> Decision:
    """Write the decision for a version whose ``alias`` just moved (from ``previous``) and mark
    it complete; if the decision cannot be written, put the alias back."""
    name = cfg.model_name
    if alias is None:  # the champion became this very checkpoint meanwhile
        mark_registration(tracker, name, version, "complete", decision)
        decision.registry = {"model_name": name, "version": decision.champion_before["version"]}
        publish(decision)
        return decision
    decision.registry = {"model_name": name, "version": str(version), "alias": alias, "run_id": run_id}
    try:
        publish(decision)
    except BaseException as exc:
        undone = undo_alias(tracker, cfg, alias, version, previous)
        if not isinstance(exc, Exception):  # interrupted: the caller ends the run KILLED
            log.warning("interrupted before the decision was written: %s", undone)
            raise
        raise PromotionError(
            f"could not write the decision ({_first_line(exc)}); {undone}; v{version} stays registered "
            "(tag registration=pending) and the next run completes it"
        ) from exc
    try:  # the alias moved and the decision is written: a failure here must not undo either
        mark_registration(tracker, name, version, "complete", decision, describe(decision, table, alias))
    except Exception as exc:
        log.warning("%s v%s stays tagged pending (the next run completes it): %s", name, version, exc)
    log.info("registered %s as %s v%s @%s", decision.winner, name, version, alias)
    return decision


def decision_alias(decision: Decision, cfg: PromoteConfig) -> str:
    return cfg.alias if decision.verdict == "champion" else cfg.challenger_alias


COMPARE_ATTEMPTS = 3  # comparisons with a champion that keeps moving before settling for challenger


@dataclass
class Arena:
    """This run's winner against whichever version is ``@champion``: the comparison, the
    verdict, and the compare-and-set that moves the alias only past a champion it was compared with."""

    tracker: Tracker
    cfg: PromoteConfig
    served: ServedTest
    identity: dict[str, str]
    test: pd.DataFrame
    on_test: Comparison  # the winner against the baseline on test: the veto's evidence
    decision: Decision
    sha256: str
    force: bool
    fingerprint: str  # of this run's prepared data

    def meet(self, champion: Champion | None) -> Champion | None:
        """Compare with ``champion`` (None: there is none) and set the decision's verdict."""
        decision, cfg = self.decision, self.cfg
        decision.champion_before = champion.describe() if champion else {}
        decision.champion_comparison, versus = {}, None
        if champion is not None and champion.predictions is not None:
            correct = self.test[decision.winner].to_numpy() == self.test["label"].to_numpy()
            versus = compare(
                correct, champion.predictions == self.served.labels, cfg.champion_tolerance, cfg.confidence
            )
            decision.champion_comparison = versus.as_dict()
            self.check_record(champion)
        if (
            champion
            and champion.predictions is not None
            and champion.sha256 == self.sha256
            and not self.force
        ):
            decision.verdict, decision.verdict_reason = (
                "unchanged",
                f"identical to {cfg.alias} v{champion.version}",
            )
            return champion
        alias, why = judge(decision, champion, versus, cfg)
        vetoed = vetoed_by_test(self.on_test)
        if vetoed:
            why = f"{why}; test disagrees ({self.on_test.line(decision.winner, 'test')})"
        if self.force and (alias != cfg.alias or vetoed or (champion is not None and champion.other_task)):
            alias, why, decision.forced = cfg.alias, f"forced by the operator (rules said: {why})", True
        decision.verdict, decision.verdict_reason = ("champion" if alias == cfg.alias else "challenger"), why
        return champion

    def check_record(self, champion: Champion) -> None:
        """Warn when the champion, measured on the very test images it was certified on (same
        data fingerprint), does not score what its record says."""
        if champion.tags.get("data_fingerprint") != self.fingerprint:
            return
        try:
            recorded = float(champion.tags["test_acc"])
        except (KeyError, ValueError):
            return
        measured = round(self.served.accuracy(champion.predictions), 4)
        if abs(measured - recorded) > 1e-3:
            note = (
                f"{self.cfg.alias} v{champion.version} scores {measured:.2f} on the test images it was "
                f"certified on, but its record says {recorded:.2f}"
            )
            log.warning(note)
            if note not in self.decision.warning:
                self.decision.warning = "; ".join(filter(None, [self.decision.warning, note]))

    def move_alias(self, version: str, champion: Champion | None) -> tuple[str | None, str | None]:
        """Point the verdict's alias at ``version`` if ``@champion`` is still the one compared
        with; otherwise compare with the new one and try again. Returns the alias moved (None:
        the new champion is this checkpoint) and the version it pointed at before."""
        cfg, name = self.cfg, self.cfg.model_name
        for _ in range(COMPARE_ATTEMPTS):
            alias = decision_alias(self.decision, cfg)
            with registry_lock(self.tracker.client, name, this_process()):
                now = self.tracker.version_by_alias(name, cfg.alias)
                if alias != cfg.alias or self.force or _same(now, champion):
                    before = self.tracker.version_by_alias(name, alias)
                    self.tracker.set_alias(name, alias, version)
                    return alias, (str(before.version) if before else None)
            seen = f"v{champion.version}" if champion else "none"
            log.warning(
                "%s@%s moved from %s to v%s during this promotion; comparing again",
                name,
                cfg.alias,
                seen,
                now.version,
            )
            champion = self.meet(current_champion(self.tracker, cfg, self.served, self.identity, self.force))
            if self.decision.verdict == "unchanged":
                return None, None
            self.decision.verdict_reason += (
                f" (compared again: {cfg.alias} moved from {seen} during this run)"
            )
        self.decision.verdict = "challenger"
        self.decision.verdict_reason = (
            f"{cfg.alias} moved {COMPARE_ATTEMPTS} times while this run compared with it; registered as "
            f"{cfg.challenger_alias}: no champion replaced unseen (last: {self.decision.verdict_reason})"
        )
        with registry_lock(self.tracker.client, name, this_process()):
            before = self.tracker.version_by_alias(name, cfg.challenger_alias)
            self.tracker.set_alias(name, cfg.challenger_alias, version)
        return cfg.challenger_alias, (str(before.version) if before else None)


def _same(now, champion: Champion | None) -> bool:
    """Whether the alias read ``now`` is still the ``champion`` the comparison used."""
    return (now is None and champion is None) or (
        now is not None and champion is not None and str(now.version) == champion.version
    )


REGISTRATION_TAG = "registration"  # pending (registered, alias not yet moved) | complete


def pending_version(tracker: Tracker, name: str, sha256: str, verdict: str) -> str | None:
    """A version an interrupted run registered for this checkpoint and verdict but never
    completed (its process is gone, or it is this one and that promotion failed), to be
    completed instead of registering a duplicate."""
    found = []
    for v in tracker.client.search_model_versions(f"name='{name}'"):
        tags = v.tags
        if (
            tags.get("checkpoint_sha256") == sha256
            and tags.get("verdict") == verdict
            and tags.get(REGISTRATION_TAG) == "pending"
            and (process_gone(owner := tags.get(PROCESS_TAG, "")) or owner == this_process())
        ):
            found.append(int(v.version))
    if not found:
        return None
    log.info("completing %s v%s, registered for this checkpoint by an interrupted run", name, max(found))
    return str(max(found))


def mark_registration(
    tracker: Tracker,
    name: str,
    version: str,
    state: str,
    decision: Decision | None = None,
    description: str = "",
) -> None:
    """Record that the version's alias move is done, with the verdict it finally got."""
    if decision is not None:
        tracker.client.set_model_version_tag(name, version, "verdict", decision.verdict)
        tracker.client.set_model_version_tag(name, version, "forced", str(decision.forced).lower())
    if description:
        tracker.client.update_model_version(name, version, description=description)
    tracker.client.set_model_version_tag(name, version, REGISTRATION_TAG, state)


def undo_alias(tracker: Tracker, cfg: PromoteConfig, alias: str, version: str, previous: str | None) -> str:
    """Put ``alias`` back where it was, if it still points at ``version``; says what happened."""
    name = cfg.model_name
    try:
        with registry_lock(tracker.client, name, this_process()):
            now = tracker.version_by_alias(name, alias)
            if now is None or str(now.version) != str(version):
                return f"@{alias} had already moved on from v{version}; left as it is"
            if previous is None:
                tracker.client.delete_registered_model_alias(name, alias)
                return f"the move of @{alias} to v{version} was undone (no @{alias} again)"
            tracker.set_alias(name, alias, previous)
            return f"the move of @{alias} to v{version} was undone (@{alias} is v{previous} again)"
    except Exception as exc:
        return f"@{alias} still points at v{version}: undoing the move failed too ({_first_line(exc)})"


def _first_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


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


def version_tags(
    decision: Decision, row: pd.Series, fingerprint: str, sha256: str, extra: dict[str, str]
) -> dict[str, str]:
    gate = decision.gate
    tags = {
        "strategy": decision.strategy,
        "ratio": decision.ratio,
        "candidate": decision.winner,
        "params": int(row["params"]),
        "flops": int(row["flops"]),
        "size_bytes": int(row["size_bytes"]),
        "latency_ms": round(float(row["latency_ms"]), 4),
        "val_acc": round(decision.val_acc, 4),
        "gate_acc": round(decision.gate_acc, 4),
        "test_acc": round(decision.test_acc, 4),
        "baseline_val_acc": round(decision.baseline_val_acc, 4),
        "baseline_gate_acc": round(decision.baseline_gate_acc, 4),
        "baseline_test_acc": round(decision.baseline_test_acc, 4),
        "acc_drop": round(decision.baseline_test_acc - decision.test_acc, 4),
        "tolerance": f"{decision.tolerance} {decision.tolerance_mode}",
        "confidence": decision.confidence if decision.confidence is not None else "off (point rule)",
        "gate_delta": gate["delta"],
        "gate_lower": gate["lower"],
        "gate_p_value": f"{gate['p_value']:.3g}",
        "gate_images": gate["n"],
        "test_delta": decision.test["delta"],
        "test_interval": f"[{decision.test['lower']}, {decision.test['upper']}]",
        "gate_summary": decision.summary,
        "data_fingerprint": fingerprint,
        "checkpoint_sha256": sha256,
        "verdict": decision.verdict,
        "forced": str(decision.forced).lower(),
        REGISTRATION_TAG: "pending",
        PROCESS_TAG: this_process(),
        **extra,
    }
    return {k: str(v) for k, v in tags.items()}


def describe(decision: Decision, table: pd.DataFrame, alias: str) -> str:
    """The Markdown a reviewer reads on the version page."""
    row = table[table["name"] == decision.winner].iloc[0]
    base = table[table["name"] == "baseline"].iloc[0]
    before = decision.champion_before
    champ = f"v{before['version']}" if before else "none"
    gate, test = decision.gate, decision.test
    return "\n".join(
        [
            f"**Registered as `{alias}`**{' (forced)' * decision.forced}: "
            f"{markdown_text(decision.verdict_reason)}.",
            "",
            f"**Gate:** {markdown_text(decision.summary)} (p = {gate['p_value']:.3g} for a drop of "
            f"{gate['margin']:g} points or more).",
            "",
            f"Selected in its run because {markdown_text(decision.reason)}.",
            "",
            "| | this version | baseline |",
            "|---|---|---|",
            f"| gate accuracy (certifies) | {decision.gate_acc:.2f} | {decision.baseline_gate_acc:.2f} |",
            f"| test accuracy (may veto) | {decision.test_acc:.2f} | {decision.baseline_test_acc:.2f} |",
            f"| test difference [interval] | {test['delta']:+.2f} "
            f"[{test['lower']:+.2f}, {test['upper']:+.2f}] | |",
            f"| val accuracy (tunes) | {decision.val_acc:.2f} | {decision.baseline_val_acc:.2f} |",
            f"| params | {int(row['params'])} | {int(base['params'])} |",
            f"| FLOPs | {int(row['flops'])} | {int(base['flops'])} |",
            f"| size (bytes) | {int(row['size_bytes'])} | {int(base['size_bytes'])} |",
            f"| latency (ms, batch 1) | {float(row['latency_ms']):.3f} | {float(base['latency_ms']):.3f} |",
            "",
            f"Champion before this run: {champ}. "
            f"Strategy {markdown_code(decision.strategy)}, candidate {markdown_code(decision.winner)}.",
            *(["", f"**Warning:** {markdown_text(decision.warning)}."] if decision.warning else []),
        ]
    )


def validate(
    tracker: Tracker, name: str, version: str, test: ServedTest, expected_acc: float, sha256: str
) -> None:
    """Load the version back from the registry (its checkpoint must hash to ``sha256``), feed it
    the raw test images as a user would, and check it reproduces its test accuracy."""
    try:
        measured = test.accuracy(test.predict(tracker.load_version(name, version, sha256=sha256)))
    except Exception as exc:
        raise PromotionError(
            f"registered {name} v{version} failed to load back; no alias moved: {_first_line(exc)}"
        ) from exc
    if measured != expected_acc:
        raise PromotionError(
            f"registered {name} v{version} scores {measured:.4f} on the test set, "
            f"expected {expected_acc:.4f}; no alias moved"
        )


def load_decision(layout: Layout) -> Decision:
    """The last run's decision, or one line saying why ``promotion.json`` cannot be read."""
    path = layout.promotion_json
    fix = "run `shrinkflow stage promote` to write it again"
    try:
        raw = read_json(path)
    except (OSError, ValueError) as exc:
        raise PromotionError(f"{path} cannot be read ({_first_line(exc)}); {fix}") from None
    known = {f.name for f in fields(Decision)}
    if not isinstance(raw, dict):
        raise PromotionError(f"{path} is not a decision (a JSON {type(raw).__name__}); {fix}")
    if unknown := sorted(set(raw) - known):
        log.warning("%s: ignored keys this version does not know: %s", path, ", ".join(unknown[:10]))
    try:
        return Decision(**{k: v for k, v in raw.items() if k in known})
    except TypeError as exc:
        raise PromotionError(f"{path} is not a complete decision ({exc}); {fix}") from None
