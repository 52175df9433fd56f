"""Stage 5: carry out the decision (:func:`shrinkflow.tasks.decision.decide.decide`): gather its inputs,
register the winner, validate it, and only then move an alias, past the champion it was compared
with (compare-and-set under the registry lock), then write what reviewers read.

No rule is decided here: when ``@champion`` moved under this promotion, the decision is taken
again with the champion found there (and the count of moves), and its verdict is carried out
as it stands. The Markdown a reviewer reads is :mod:`shrinkflow.tasks.decision.report`'s.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import mlflow
import numpy as np
import pandas as pd
import torch

from shrinkflow.models.checkpoint import CheckpointError
from shrinkflow.tasks.config import Params, PromoteConfig
from shrinkflow.tasks.data.prepare import load_raw_split, normalise
from shrinkflow.tasks.decision.decide import (
    Champion,
    Kind,
    PromotionError,
    Race,
    Registered,
    RunFacts,
    Standing,
    Verdict,
    alias_of,
    decide,
    needs_same_champion,
    verdict_from_json,
    verdict_json,
    verdict_keys,
)
from shrinkflow.tasks.decision.gate import class_accuracies
from shrinkflow.tasks.decision.report import ChampionFigures, model_description, version_page
from shrinkflow.tasks.errors import first_line, named_first_line
from shrinkflow.tasks.io import read_json, write_json
from shrinkflow.tasks.layout import Layout
from shrinkflow.tasks.measurement.evaluate import load_predictions, load_table
from shrinkflow.tasks.promotion.reproduce import dirty_warning
from shrinkflow.tasks.records import Manifest, load_manifest, load_record
from shrinkflow.tasks.store.lock import registry_lock
from shrinkflow.tasks.store.registry import (
    RECORD_FILE,
    describe_registered_model,
    load_version,
    predicted_classes,
    register_model,
    set_alias,
    version_by_alias,
    version_record,
)
from shrinkflow.tasks.store.tracking import PROCESS_TAG, Tracker, process_gone, this_process
from shrinkflow.tasks.training.engine import accuracy
from shrinkflow.tasks.training.given import lineage_tags

log = logging.getLogger(__name__)


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


def current_champion(
    tracker: Tracker, cfg: PromoteConfig, test: ServedTest, identity: dict[str, str], force: bool = False
) -> Champion | None:
    """The registry's current champion and its predictions on today's test images, once its task
    is known to be this run's (``identity``; a different one is refused before anything loads,
    unless ``force``: then it is returned as not comparable).

    Only a champion whose files are gone or refused counts as "no longer loads"; any other
    failure (the tracking server, the network) is raised, so nothing moves on a blip."""
    try:
        version = version_by_alias(tracker, cfg.model_name, cfg.alias)
    except Exception as exc:
        first = first_line(exc)
        raise PromotionError(
            f"could not read {cfg.model_name}@{cfg.alias} from the registry ({first}); "
            "nothing registered, no alias moved"
        ) from exc
    if version is None:
        return None
    tags = version_record(tracker.registry, cfg.model_name, version.version)
    size = float(tags.get(cfg.objective, "inf"))
    sha = tags.get("checkpoint_sha256", "")
    gone = Champion(str(version.version), None, size, sha, tags)
    if difference := task_difference(identity, tags, str(version.version)):
        if not force:
            raise PromotionError(identity_mismatch(identity, tags, cfg, str(version.version)))
        return replace(gone, error=f"is for another task ({difference})", other_task=True)
    if not sha:
        return replace(gone, error="records no checkpoint_sha256, so its files cannot be verified")
    try:
        predictions = test.predict(load_version(tracker, cfg.model_name, version.version, sha256=sha))
    except (FileNotFoundError, CheckpointError) as exc:
        return replace(gone, error=f"no longer loads ({named_first_line(exc)})")
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST" and "No such file" not in str(exc):
            raise PromotionError(_unreachable(cfg, version.version, exc)) from exc
        return replace(gone, error=f"no longer loads ({named_first_line(exc)})")
    except Exception as exc:
        raise PromotionError(_unreachable(cfg, version.version, exc)) from exc
    return replace(gone, predictions=predictions)


def _unreachable(cfg: PromoteConfig, version: str, exc: BaseException) -> str:
    first = first_line(exc)
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


Publish = Callable[[Verdict], None]


@dataclass(frozen=True, eq=False)
class Promotion:
    """One promotion: what its decision is made from (read once, reused when ``@champion``
    moves and the decision is taken again) and where the verdict is carried out."""

    params: Params
    layout: Layout
    tracker: Tracker
    run_id: str
    publish: Publish  # writes what reviewers read (promotion.json, the report)
    force: bool
    table: pd.DataFrame  # candidates.csv
    predictions: dict[str, pd.DataFrame]  # predictions.csv by split
    manifest: Manifest
    served: ServedTest
    facts: RunFacts
    identity: dict[str, str]  # the task a registered model classifies

    @classmethod
    def gather(
        cls, params: Params, layout: Layout, tracker: Tracker, run_id: str, force: bool, publish: Publish
    ) -> Promotion:
        table = load_table(layout.candidates_csv)
        manifest, served = load_manifest(layout), ServedTest.load(layout)
        return cls(
            params=params,
            layout=layout,
            tracker=tracker,
            run_id=run_id,
            publish=publish,
            force=force,
            table=table,
            predictions=load_predictions(layout.predictions_csv),
            manifest=manifest,
            served=served,
            facts=RunFacts(checkpoint_hashes(layout, table), tuple(served.classes), manifest.fingerprint),
            identity=task_identity(manifest),
        )

    @property
    def cfg(self) -> PromoteConfig:
        return self.params.promote

    def champion(self) -> Champion | None:
        """The registry's ``@champion`` as it is now, with its predictions on the test images."""
        return current_champion(self.tracker, self.cfg, self.served, self.identity, self.force)

    def decide(self, champion: Champion | None, race: Race | None = None) -> Verdict:
        return decide(
            self.table, self.predictions, self.cfg, Standing(champion, self.force, race), self.facts
        )


def promote(
    params: Params,
    layout: Layout,
    tracker: Tracker,
    run_id: str,
    extra_tags: dict[str, str] | None = None,
    force: bool = False,
    publish: Publish | None = None,
) -> Verdict:
    """Decide, then register this run's winner and move the alias the verdict gives it.

    ``publish`` writes what reviewers read (``promotion.json`` by default); it runs once the
    verdict is final, and if it fails the alias move is undone, so no decision file ever
    disagrees with the registry."""
    publish = publish or (lambda verdict: write_json(layout.promotion_json, verdict_json(verdict)))
    job = Promotion.gather(params, layout, tracker, run_id, force, publish)
    champion = job.champion()
    verdict = job.decide(champion)
    if verdict.kind == Kind.VETOED:
        job.publish(verdict)
        name_parent_run(tracker, run_id, f"{job.cfg.model_name}: {verdict.winner} vetoed by test")
        return verdict
    if verdict.kind == Kind.UNCHANGED:
        return keep_champion(job, verdict, champion)
    move = Move(verdict, champion, alias_of(verdict, job.cfg))
    version = register(job, move, extra_tags or {})
    sha256 = job.facts.checkpoints[verdict.winner]
    validate(tracker, job.cfg.model_name, version, job.served, verdict.test_acc, sha256)
    return settle(job, version, move_alias(job, version, move))


def checkpoint_hashes(layout: Layout, table: pd.DataFrame) -> dict[str, str]:
    """Each measured model's checkpoint sha256, as its record gives it."""
    return {name: load_record(layout, name).sha256 for name in table.loc[table["status"] == "ok", "name"]}


def keep_champion(job: Promotion, verdict: Verdict, champion: Champion) -> Verdict:
    """The winner is the champion's own checkpoint: nothing new is registered (a champion whose
    run died after its alias move is marked complete)."""
    cfg = job.cfg
    verdict = replace(verdict, registry=Registered(cfg.model_name, champion.version, cfg.alias))
    if champion.tags.get(REGISTRATION_TAG) == "pending":
        mark_registration(job.tracker, cfg.model_name, champion.version, "complete")
    job.publish(verdict)
    name_parent_run(job.tracker, job.run_id, f"{cfg.model_name}: unchanged, {cfg.alias} v{champion.version}")
    return verdict


def register(job: Promotion, move: Move, extra_tags: dict[str, str]) -> str:
    """The winner's version: the one an interrupted run registered for this checkpoint and
    verdict, or a new one, tagged ``registration=pending`` until its alias moved."""
    cfg, layout, verdict = job.cfg, job.layout, move.verdict
    lineage = lineage_tags(load_record(layout, "baseline").origin)
    tags = {**job.identity, **lineage, **extra_tags}
    if move.champion:
        tags["champion_data_fingerprint"] = move.champion.tags.get("data_fingerprint", "")
    row = job.table[job.table["name"] == verdict.winner].iloc[0]
    sha256 = job.facts.checkpoints[verdict.winner]
    if (version := pending_version(job.tracker, cfg.model_name, sha256, verdict.kind)) is not None:
        return version
    figures = version_figures(
        verdict, row, job.manifest.fingerprint, sha256, tags, composition(job.params, row)
    )
    onnx = layout.onnx(verdict.winner)
    return register_model(
        job.tracker,
        job.run_id,
        layout.checkpoint(verdict.winner),
        cfg.model_name,
        manifest=layout.manifest,
        onnx=onnx if row["onnx"] == "ok" and onnx.is_file() else f"unavailable: {row['onnx']}",
        raw_example=job.served.images[:2],
        tags=review_tags(figures, keep=lineage),
        description=dirty_warning(tags) + version_story(job, move, figures["composition"]),
        record=figures,
    )


@dataclass(frozen=True)
class Move:
    """An alias move, planned or done: the verdict it carries out, the champion that verdict
    was compared with, the alias (None: none moves) and, once moved, where it pointed before."""

    verdict: Verdict
    champion: Champion | None
    alias: str | None
    previous: str | None = None


def move_alias(job: Promotion, version: str, move: Move) -> Move:
    """Point the verdict's alias at ``version`` if ``@champion`` is still the one compared with;
    otherwise take the decision again against the champion there now. This ends: after
    COMPARE_ATTEMPTS such rounds the decision says challenger, an alias that moves without a
    comparison; or it says unchanged (the champion became this very checkpoint): no alias moves."""
    rounds = 0
    while (moved := compare_and_set(job, version, move)) is None:
        rounds += 1
        seen = f"v{move.champion.version}" if move.champion else "none"
        champion = job.champion()
        verdict = job.decide(champion, Race(rounds, seen))
        move = Move(verdict, champion, alias_of(verdict, job.cfg))
        if verdict.kind == Kind.UNCHANGED:
            return replace(move, alias=None)
    return moved


def compare_and_set(job: Promotion, version: str, move: Move) -> Move | None:
    """Under the registry lock, move the verdict's alias to ``version``, unless that alias is
    ``@champion`` and it moved away from the champion the verdict was compared with (None)."""
    cfg, tracker, name = job.cfg, job.tracker, job.cfg.model_name
    with registry_lock(tracker.registry, name, this_process()):
        now = version_by_alias(tracker, name, cfg.alias)
        if not needs_same_champion(move.verdict, cfg, job.force) or _same(now, move.champion):
            before = version_by_alias(tracker, name, move.alias)
            set_alias(tracker, name, move.alias, version)
            return replace(move, previous=str(before.version) if before else None)
    seen = f"v{move.champion.version}" if move.champion else "none"
    found = f"v{now.version}" if now else "none"
    log.warning(
        "%s@%s moved from %s to %s during this promotion; comparing again", name, cfg.alias, seen, found
    )
    return None


def _same(now, champion: Champion | None) -> bool:
    """Whether the alias read ``now`` is still the ``champion`` the comparison used."""
    return (now is None and champion is None) or (
        now is not None and champion is not None and str(now.version) == champion.version
    )


def settle(job: Promotion, version: str, move: Move) -> Verdict:
    """Write the verdict for ``version`` once its alias moved, and mark it complete; if the
    verdict cannot be written, put the alias back."""
    name = job.cfg.model_name
    if move.alias is None:  # the champion became this very checkpoint meanwhile
        mark_registration(job.tracker, name, version, "complete", move.verdict)
        verdict = replace(move.verdict, registry=Registered(name, move.verdict.champion_before.version))
        job.publish(verdict)
        return verdict
    verdict = replace(move.verdict, registry=Registered(name, str(version), move.alias, job.run_id))
    try:
        job.publish(verdict)
    except BaseException as exc:
        undone = undo_alias(job.tracker, job.cfg, move.alias, version, move.previous)
        if not isinstance(exc, Exception):  # interrupted: the caller ends the run KILLED
            log.warning("interrupted before the decision was written: %s", undone)
            raise
        raise PromotionError(
            f"could not write the decision ({named_first_line(exc)}); {undone}; v{version} stays registered "
            "(tag registration=pending) and the next run completes it"
        ) from exc
    complete(job, version, replace(move, verdict=verdict))
    log.info("registered %s as %s v%s @%s", verdict.winner, name, version, move.alias)
    return verdict


def complete(job: Promotion, version: str, move: Move) -> None:
    """The version's bookkeeping once its alias moved and the decision is written: its page, the
    champion it replaced, ``registration=complete``, the model's page, the run's name. A failure
    here undoes neither; the version stays pending and the next run completes it."""
    tracker, cfg, name = job.tracker, job.cfg, job.cfg.model_name
    try:
        registered = tracker.registry.get_model_version(name, version)
        story = version_story(job, move, registered.tags.get("composition", ""), registered.run_id)
        if move.alias == cfg.alias:  # what `shrinkflow rollback` goes back to
            tracker.registry.set_model_version_tag(name, version, PREVIOUS_TAG, move.previous or "none")
            if move.previous not in (None, str(version)):  # the verdict tag follows the alias
                tracker.registry.set_model_version_tag(
                    name, move.previous, "verdict", verdict_once_replaced(tracker, name, cfg, move.previous)
                )
        mark_registration(tracker, name, version, "complete", move.verdict, story)
        describe_registered_model(
            tracker.registry, name, model_description(job.manifest, cfg), model_tags(job.identity, cfg)
        )
        name_parent_run(tracker, job.run_id, f"{name} v{version} @{move.alias}: {move.verdict.winner}")
    except Exception as exc:
        log.warning("%s v%s stays tagged pending (the next run completes it): %s", name, version, exc)


def verdict_once_replaced(tracker: Tracker, name: str, cfg: PromoteConfig, version: str) -> str:
    """What version ``version`` of registered model ``name``, which stopped being ``@champion``,
    now is: challenger if it holds that alias, else retired."""
    challenger = version_by_alias(tracker, name, cfg.challenger_alias)
    return Kind.CHALLENGER if challenger is not None and str(challenger.version) == version else RETIRED


def version_story(job: Promotion, move: Move, steps: str, run_id: str | None = None) -> str:
    """The version page's Markdown: the verdict ``move`` carries out under its alias, beside the
    champion it was compared with; ``steps`` is the winner's composition, ``run_id`` the run that
    registered it (this one unless told)."""
    where = links(job.tracker, run_id or job.run_id, job.layout)
    figures = champion_figures(move.champion, job.served)
    return version_page(move.verdict, job.table, move.alias, figures, where, steps)


REGISTRATION_TAG = "registration"  # pending (registered, alias not yet moved) | complete
PREVIOUS_TAG = "previous_champion"  # the version @champion pointed at before this one took it
RETIRED = "retired"  # the verdict of a version that stopped being champion and holds no other alias


def pending_version(tracker: Tracker, name: str, sha256: str, verdict: str) -> str | None:
    """A version an interrupted run registered for this checkpoint and verdict but never
    completed (its process is gone, or it is this one and that promotion failed), to be
    completed instead of registering a duplicate."""
    found = []
    for v in tracker.registry.search_model_versions(f"name='{name}'"):
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
    verdict: Verdict | None = None,
    description: str = "",
) -> None:
    """Record that the version's alias move is done, with the verdict it finally got."""
    if verdict is not None:
        tracker.registry.set_model_version_tag(name, version, "verdict", verdict.kind)
        tracker.registry.set_model_version_tag(name, version, "forced", str(verdict.forced).lower())
    if description:
        tags = version_record(tracker.registry, name, version)
        tracker.registry.update_model_version(name, version, description=dirty_warning(tags) + description)
    tracker.registry.set_model_version_tag(name, version, REGISTRATION_TAG, state)


def undo_alias(tracker: Tracker, cfg: PromoteConfig, alias: str, version: str, previous: str | None) -> str:
    """Put ``alias`` back where it was, if it still points at ``version``; says what happened."""
    name = cfg.model_name
    try:
        with registry_lock(tracker.registry, name, this_process()):
            now = version_by_alias(tracker, name, alias)
            if now is None or str(now.version) != str(version):
                return f"@{alias} had already moved on from v{version}; left as it is"
            if previous is None:
                tracker.registry.delete_registered_model_alias(name, alias)
                return f"the move of @{alias} to v{version} was undone (no @{alias} again)"
            set_alias(tracker, name, alias, previous)
            return f"the move of @{alias} to v{version} was undone (@{alias} is v{previous} again)"
    except Exception as exc:
        return f"@{alias} still points at v{version}: undoing the move failed too ({named_first_line(exc)})"


# The tags a reviewer filters on in the registry, and those code searches by (the integrity checks,
# the completion of an interrupted run, `shrinkflow reproduce`, the links to the flow run). Every
# figure, these included, is in the version's record (registry.RECORD_FILE).
REVIEW_TAGS = (
    "task_source",
    "task_classes",
    "task_input_shape",
    "verdict",
    "forced",
    "candidate",
    "composition",
    "params",
    "size_bytes",
    "test_acc",
    "test_acc_change_pts",
    "gate_bound_pts",
    "code_version",
    "data_fingerprint",
)
BOOKKEEPING_TAGS = (
    "checkpoint_sha256",
    REGISTRATION_TAG,
    PROCESS_TAG,
    "git_commit",
    "git_dirty",
    "prefect_flow_run_id",
)


def composition(params: Params, row: pd.Series) -> str:
    """The candidate's steps joined by ``+`` (``prune_l1+distill+int8``): the table's column when
    it has one, else from the candidate's config."""
    if isinstance(value := row.get("composition"), str) and value:
        return value
    name = str(row["name"])
    if name == "baseline":
        return "baseline"
    candidate = params.shrink.candidates.get(name)
    return "+".join(candidate.steps()) if candidate is not None else str(row["strategy"])


def version_figures(
    verdict: Verdict, row: pd.Series, fingerprint: str, sha256: str, extra: dict[str, str], steps: str
) -> dict[str, str]:
    """Every figure a registered version records. Changes are the model minus the baseline in
    accuracy points: positive means better."""
    gate, test = verdict.gate, verdict.test
    figures = {
        "verdict": verdict.kind,
        "forced": str(verdict.forced).lower(),
        "candidate": verdict.winner,
        "composition": steps,
        "strategy": verdict.strategy,
        "ratio": verdict.ratio,
        "params": int(row["params"]),
        "flops": int(row["flops"]),
        "size_bytes": int(row["size_bytes"]),
        "latency_ms": round(float(row["latency_ms"]), 4),
        "val_acc": round(verdict.val_acc, 4),
        "gate_acc": round(verdict.gate_acc, 4),
        "test_acc": round(verdict.test_acc, 4),
        "baseline_val_acc": round(verdict.baseline_val_acc, 4),
        "baseline_gate_acc": round(verdict.baseline_gate_acc, 4),
        "baseline_test_acc": round(verdict.baseline_test_acc, 4),
        "test_acc_change_pts": round(verdict.test_acc - verdict.baseline_test_acc, 4),
        "gate_acc_change_pts": gate.delta,
        "gate_bound_pts": gate.lower,
        "gate_p_value": f"{gate.p_value:.3g}" if gate.p_value is not None else "none",
        "gate_images": gate.n,
        "test_interval_pts": f"[{test.lower}, {test.upper}]",
        "gate_summary": verdict.summary,
        "multiplicity": verdict.multiplicity,
        "family_level": verdict.family_level if verdict.family_level is not None else "none",
        "certified_by": verdict.certified_by,
        "tolerance": f"{verdict.tolerance} {verdict.tolerance_mode}",
        "confidence": verdict.confidence if verdict.confidence is not None else "off (point rule)",
        "data_fingerprint": fingerprint,
        "checkpoint_sha256": sha256,
        REGISTRATION_TAG: "pending",
        PROCESS_TAG: this_process(),
        **extra,
    }
    return {k: str(v) for k, v in figures.items()}


def review_tags(figures: dict[str, str], keep: dict[str, str] | None = None) -> dict[str, str]:
    """The few figures that become tags (and ``keep``, e.g. a brought baseline's lineage)."""
    wanted = {*REVIEW_TAGS, *BOOKKEEPING_TAGS, *(keep or {})}
    return {k: v for k, v in figures.items() if k in wanted}


def links(tracker: Tracker, run_id: str, layout: Layout) -> dict[str, str]:
    """Where, in the MLflow UI, the run's Pareto plot and the version's record lie."""
    run = f"#/experiments/{tracker.experiment_id}/runs/{run_id}/artifacts"
    return {"Pareto plot": f"{run}/{layout.pareto_png.name}", "every figure (JSON)": f"{run}/{RECORD_FILE}"}


def champion_figures(champion: Champion | None, served: ServedTest) -> ChampionFigures | None:
    """The champion a verdict was compared with, as its record says and as it scores today."""
    if champion is None:
        return None
    if champion.predictions is None:
        return ChampionFigures(champion.version, champion.tags, champion.error)
    per_class = class_accuracies(champion.predictions, served.labels, len(served.classes))
    return ChampionFigures(
        champion.version,
        champion.tags,
        champion.error,
        served.accuracy(champion.predictions),
        dict(zip(served.classes, per_class.tolist(), strict=True)),
    )


def model_tags(identity: dict[str, str], cfg: PromoteConfig) -> dict[str, str]:
    return {**identity, "objective": cfg.objective, "managed_by": "shrinkflow"}


def name_parent_run(tracker: Tracker, run_id: str, title: str) -> None:
    """Name the pipeline's parent run after its outcome (it starts as ``pipeline``); a name is
    not worth failing a promotion whose decision is already written."""
    try:
        parent = tracker.run(run_id).data.tags.get("mlflow.parentRunId")
        if parent:
            tracker.rename_run(parent, title[:250])
    except Exception as exc:
        log.warning("the pipeline's run keeps its name: %s", exc)


def validate(
    tracker: Tracker, name: str, version: str, test: ServedTest, expected_acc: float, sha256: str
) -> None:
    """Load the version back from the registry (its checkpoint must hash to ``sha256``), feed it
    the raw test images as a user would, and check it reproduces its test accuracy."""
    try:
        measured = test.accuracy(test.predict(load_version(tracker, name, version, sha256=sha256)))
    except Exception as exc:
        raise PromotionError(
            f"registered {name} v{version} failed to load back; no alias moved: {named_first_line(exc)}"
        ) from exc
    if measured != expected_acc:
        raise PromotionError(
            f"registered {name} v{version} scores {measured:.4f} on the test set, "
            f"expected {expected_acc:.4f}; no alias moved"
        )


def load_decision(layout: Layout) -> Verdict:
    """The last run's decision, or one line saying why ``promotion.json`` cannot be read."""
    path = layout.promotion_json
    fix = "run `shrinkflow stage promote` to write it again"
    try:
        raw = read_json(path)
    except (OSError, ValueError) as exc:
        raise PromotionError(f"{path} cannot be read ({named_first_line(exc)}); {fix}") from None
    if not isinstance(raw, dict):
        raise PromotionError(f"{path} is not a decision (a JSON {type(raw).__name__}); {fix}")
    if unknown := sorted(set(raw) - verdict_keys()):
        log.warning("%s: ignored keys this version does not know: %s", path, ", ".join(unknown[:10]))
    try:
        return verdict_from_json(raw)
    except (KeyError, TypeError, ValueError) as exc:
        raise PromotionError(f"{path} is not a complete decision ({exc}); {fix}") from None
