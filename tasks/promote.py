"""Stage 5: carry out the decision (:func:`shrinkflow.tasks.decide.decide`): gather its inputs,
register the winner, validate it, and only then move an alias, past the champion it was compared
with (compare-and-set under the registry lock).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace

import mlflow
import numpy as np
import pandas as pd
import torch

from shrinkflow.models.checkpoint import CheckpointError
from shrinkflow.tasks.config import Params, PromoteConfig
from shrinkflow.tasks.decide import Champion, Kind, PromotionError, Verdict, decide
from shrinkflow.tasks.engine import accuracy
from shrinkflow.tasks.errors import first_line, named_first_line
from shrinkflow.tasks.escape import markdown_code, markdown_text
from shrinkflow.tasks.evaluate import load_predictions, load_table
from shrinkflow.tasks.gate import class_accuracies
from shrinkflow.tasks.given import lineage_tags
from shrinkflow.tasks.io import read_json, write_json
from shrinkflow.tasks.layout import Layout
from shrinkflow.tasks.lock import registry_lock
from shrinkflow.tasks.prepare import load_raw_split, normalise
from shrinkflow.tasks.records import Manifest, load_manifest, load_record
from shrinkflow.tasks.registry import (
    RECORD_FILE,
    describe_registered_model,
    load_version,
    predicted_classes,
    register_model,
    set_alias,
    version_by_alias,
    version_record,
)
from shrinkflow.tasks.reproduce import dirty_warning
from shrinkflow.tasks.tracking import PROCESS_TAG, Tracker, process_gone, this_process

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
    tags = version_record(tracker.client, cfg.model_name, version.version)
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
    cfg = params.promote
    publish = publish or (lambda verdict: write_json(layout.promotion_json, asdict(verdict)))
    table = load_table(layout.candidates_csv)
    manifest, served = load_manifest(layout), ServedTest.load(layout)
    arena = Arena(
        tracker,
        cfg,
        served,
        task_identity(manifest),
        table,
        load_predictions(layout.predictions_csv),
        checkpoint_hashes(layout, table),
        force,
        manifest.fingerprint,
    )
    champion = current_champion(tracker, cfg, served, arena.identity, force)
    verdict = arena.meet(champion)
    if verdict.verdict == Kind.VETOED:
        publish(verdict)
        name_parent_run(tracker, run_id, f"{cfg.model_name}: {verdict.winner} vetoed by test")
        return verdict
    if verdict.verdict == Kind.UNCHANGED:
        verdict = replace(
            verdict, registry={"model_name": cfg.model_name, "version": champion.version, "alias": cfg.alias}
        )
        if champion.tags.get(REGISTRATION_TAG) == "pending":  # its run died after the alias move
            mark_registration(tracker, cfg.model_name, champion.version, "complete")
        publish(verdict)
        name_parent_run(tracker, run_id, f"{cfg.model_name}: unchanged, {cfg.alias} v{champion.version}")
        return verdict
    lineage = lineage_tags(load_record(layout, "baseline").origin)
    tags = {**arena.identity, **lineage, **(extra_tags or {})}
    if champion:
        tags["champion_data_fingerprint"] = champion.tags.get("data_fingerprint", "")
    row, sha256 = table[table["name"] == verdict.winner].iloc[0], arena.checkpoints[verdict.winner]
    version = pending_version(tracker, cfg.model_name, sha256, verdict.verdict)
    if version is None:
        onnx = layout.onnx(verdict.winner)
        figures = version_figures(verdict, row, manifest.fingerprint, sha256, tags, composition(params, row))
        story = arena.story(
            table, decision_alias(verdict, cfg), links(tracker, run_id, layout), figures["composition"]
        )
        version = register_model(
            tracker,
            run_id,
            layout.checkpoint(verdict.winner),
            cfg.model_name,
            manifest=layout.manifest,
            onnx=onnx if row["onnx"] == "ok" and onnx.is_file() else f"unavailable: {row['onnx']}",
            raw_example=served.images[:2],
            tags=review_tags(figures, keep=lineage),
            description=dirty_warning(tags) + story,
            record=figures,
        )
    validate(tracker, cfg.model_name, version, served, verdict.test_acc, sha256)
    alias, previous = arena.move_alias(version, champion)
    return settle(tracker, cfg, arena, table, version, alias, previous, run_id, publish, layout, manifest)


def checkpoint_hashes(layout: Layout, table: pd.DataFrame) -> dict[str, str]:
    """Each measured model's checkpoint sha256, as its record gives it."""
    return {name: load_record(layout, name).sha256 for name in table.loc[table["status"] == "ok", "name"]}


def settle(
    tracker: Tracker,
    cfg: PromoteConfig,
    arena: Arena,
    table: pd.DataFrame,
    version: str,
    alias: str | None,
    previous: str | None,
    run_id: str,
    publish: Publish,
    layout: Layout,
    manifest: Manifest,
) -> Verdict:
    """Write the verdict for a version whose ``alias`` just moved (from ``previous``) and mark
    it complete; if the verdict cannot be written, put the alias back."""
    name, verdict = cfg.model_name, arena.verdict
    if alias is None:  # the champion became this very checkpoint meanwhile
        mark_registration(tracker, name, version, "complete", verdict)
        verdict = replace(
            verdict, registry={"model_name": name, "version": verdict.champion_before["version"]}
        )
        publish(verdict)
        return verdict
    verdict = replace(
        verdict, registry={"model_name": name, "version": str(version), "alias": alias, "run_id": run_id}
    )
    try:
        publish(verdict)
    except BaseException as exc:
        undone = undo_alias(tracker, cfg, alias, version, previous)
        if not isinstance(exc, Exception):  # interrupted: the caller ends the run KILLED
            log.warning("interrupted before the decision was written: %s", undone)
            raise
        raise PromotionError(
            f"could not write the decision ({named_first_line(exc)}); {undone}; v{version} stays registered "
            "(tag registration=pending) and the next run completes it"
        ) from exc
    try:  # the alias moved and the decision is written: a failure here must not undo either
        registered = tracker.client.get_model_version(name, version)
        steps = registered.tags.get("composition", "")
        story = arena.story(table, alias, links(tracker, registered.run_id or run_id, layout), steps)
        if alias == cfg.alias:  # what `shrinkflow rollback` goes back to
            tracker.client.set_model_version_tag(name, version, PREVIOUS_TAG, previous or "none")
        mark_registration(tracker, name, version, "complete", verdict, story)
        describe_registered_model(
            tracker.client, name, model_description(manifest, cfg), model_tags(arena.identity, cfg)
        )
        name_parent_run(tracker, run_id, f"{name} v{version} @{alias}: {verdict.winner}")
    except Exception as exc:
        log.warning("%s v%s stays tagged pending (the next run completes it): %s", name, version, exc)
    log.info("registered %s as %s v%s @%s", verdict.winner, name, version, alias)
    return verdict


def decision_alias(verdict: Verdict, cfg: PromoteConfig) -> str:
    return cfg.alias if verdict.verdict == Kind.CHAMPION else cfg.challenger_alias


COMPARE_ATTEMPTS = 3  # comparisons with a champion that keeps moving before settling for challenger


@dataclass
class Arena:
    """This run's decision against whichever version is ``@champion``: the verdict, and the
    compare-and-set that moves the alias only past a champion it was compared with."""

    tracker: Tracker
    cfg: PromoteConfig
    served: ServedTest
    identity: dict[str, str]
    table: pd.DataFrame
    predictions: dict[str, pd.DataFrame]
    checkpoints: dict[str, str]  # each measured model's checkpoint sha256
    force: bool
    fingerprint: str  # of this run's prepared data
    verdict: Verdict | None = None
    champion: Champion | None = None  # the one the verdict was compared with

    def meet(self, champion: Champion | None) -> Verdict:
        """Decide against ``champion`` (None: there is none); the verdict is kept and returned."""
        self.champion = champion
        verdict = decide(
            self.table,
            self.predictions,
            self.cfg,
            champion,
            self.checkpoints,
            self.served.classes,
            self.force,
        )
        if (
            champion is not None
            and champion.predictions is not None
            and (note := self.check_record(champion))
        ):
            verdict = replace(verdict, warning="; ".join(filter(None, [verdict.warning, note])))
        self.verdict = verdict
        return verdict

    def story(self, table: pd.DataFrame, alias: str, links: dict[str, str], steps: str) -> str:
        """The version page's Markdown: the verdict, side by side with the champion compared with;
        ``steps`` is the winner's composition."""
        figures = champion_figures(self.champion, self.served)
        return describe(self.verdict, table, alias, figures, links, steps)

    def check_record(self, champion: Champion) -> str:
        """A warning when the champion, measured on the very test images it was certified on
        (same data fingerprint), does not score what its record says."""
        if champion.tags.get("data_fingerprint") != self.fingerprint:
            return ""
        try:
            recorded = float(champion.tags["test_acc"])
        except (KeyError, ValueError):
            return ""
        measured = round(self.served.accuracy(champion.predictions), 4)
        if abs(measured - recorded) <= 1e-3:
            return ""
        note = (
            f"{self.cfg.alias} v{champion.version} scores {measured:.2f} on the test images it was "
            f"certified on, but its record says {recorded:.2f}"
        )
        log.warning(note)
        return note

    def move_alias(self, version: str, champion: Champion | None) -> tuple[str | None, str | None]:
        """Point the verdict's alias at ``version`` if ``@champion`` is still the one compared
        with; otherwise compare with the new one and try again. Returns the alias moved (None:
        the new champion is this checkpoint) and the version it pointed at before."""
        cfg, name = self.cfg, self.cfg.model_name
        for _ in range(COMPARE_ATTEMPTS):
            alias = decision_alias(self.verdict, cfg)
            with registry_lock(self.tracker.client, name, this_process()):
                now = version_by_alias(self.tracker, name, cfg.alias)
                if alias != cfg.alias or self.force or _same(now, champion):
                    before = version_by_alias(self.tracker, name, alias)
                    set_alias(self.tracker, name, alias, version)
                    return alias, (str(before.version) if before else None)
            seen = f"v{champion.version}" if champion else "none"
            log.warning(
                "%s@%s moved from %s to v%s during this promotion; comparing again",
                name,
                cfg.alias,
                seen,
                now.version,
            )
            champion = current_champion(self.tracker, cfg, self.served, self.identity, self.force)
            verdict = self.meet(champion)
            if verdict.verdict == Kind.UNCHANGED:
                return None, None
            self.verdict = replace(
                verdict,
                verdict_reason=f"{verdict.verdict_reason} (compared again: {cfg.alias} moved from {seen} "
                "during this run)",
            )
        self.verdict = replace(
            self.verdict,
            verdict=Kind.CHALLENGER,
            verdict_reason=(
                f"{cfg.alias} moved {COMPARE_ATTEMPTS} times while this run compared with it; registered as "
                f"{cfg.challenger_alias}: no champion replaced unseen (last: {self.verdict.verdict_reason})"
            ),
        )
        with registry_lock(self.tracker.client, name, this_process()):
            before = version_by_alias(self.tracker, name, cfg.challenger_alias)
            set_alias(self.tracker, name, cfg.challenger_alias, version)
        return cfg.challenger_alias, (str(before.version) if before else None)


def _same(now, champion: Champion | None) -> bool:
    """Whether the alias read ``now`` is still the ``champion`` the comparison used."""
    return (now is None and champion is None) or (
        now is not None and champion is not None and str(now.version) == champion.version
    )


REGISTRATION_TAG = "registration"  # pending (registered, alias not yet moved) | complete
PREVIOUS_TAG = "previous_champion"  # the version @champion pointed at before this one took it


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
    verdict: Verdict | None = None,
    description: str = "",
) -> None:
    """Record that the version's alias move is done, with the verdict it finally got."""
    if verdict is not None:
        tracker.client.set_model_version_tag(name, version, "verdict", verdict.verdict)
        tracker.client.set_model_version_tag(name, version, "forced", str(verdict.forced).lower())
    if description:
        tags = version_record(tracker.client, name, version)
        tracker.client.update_model_version(name, version, description=dirty_warning(tags) + description)
    tracker.client.set_model_version_tag(name, version, REGISTRATION_TAG, state)


def undo_alias(tracker: Tracker, cfg: PromoteConfig, alias: str, version: str, previous: str | None) -> str:
    """Put ``alias`` back where it was, if it still points at ``version``; says what happened."""
    name = cfg.model_name
    try:
        with registry_lock(tracker.client, name, this_process()):
            now = version_by_alias(tracker, name, alias)
            if now is None or str(now.version) != str(version):
                return f"@{alias} had already moved on from v{version}; left as it is"
            if previous is None:
                tracker.client.delete_registered_model_alias(name, alias)
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
        "verdict": verdict.verdict,
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
        "gate_acc_change_pts": gate["delta"],
        "gate_bound_pts": gate["lower"],
        "gate_p_value": f"{gate['p_value']:.3g}" if gate.get("p_value") is not None else "none",
        "gate_images": gate["n"],
        "test_interval_pts": f"[{test['lower']}, {test['upper']}]",
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


def champion_figures(champion: Champion | None, served: ServedTest) -> dict | None:
    """The champion a verdict was compared with, as its record says and as it scores today."""
    if champion is None:
        return None
    figures = {"version": champion.version, "tags": champion.tags, "error": champion.error}
    if champion.predictions is not None:
        figures["test_acc_today"] = served.accuracy(champion.predictions)
        per_class = class_accuracies(champion.predictions, served.labels, len(served.classes))
        figures["per_class"] = dict(zip(served.classes, per_class.tolist(), strict=True))
    return figures


WORST_CLASSES = 3  # shown on the version page; report.md has them all


def describe(
    verdict: Verdict,
    table: pd.DataFrame,
    alias: str,
    champion: dict | None = None,
    links: dict[str, str] | None = None,
    steps: str = "",
) -> str:
    """The Markdown a reviewer reads on the version page: the verdict, then this version side by
    side with the champion it was compared with (``champion``, see :func:`champion_figures`) and
    the baseline, its worst classes, and ``links`` to the Pareto plot and its record."""
    before = verdict.champion_before
    champ = f"v{before['version']}" if before else "none"
    gate = verdict.gate
    p_value = f"p = {gate['p_value']:.3g}" if gate.get("p_value") is not None else "point rule"
    lines = [
        f"**Verdict: `{alias}`**{' (forced)' * verdict.forced}: {markdown_text(verdict.verdict_reason)}.",
        "",
        f"**Gate:** {markdown_text(verdict.summary)} ({p_value} for a drop of {gate['margin']:g} points "
        "or more).",
        "",
        f"Selected in its run because {markdown_text(verdict.reason)}.",
        "",
        f"**Certified by:** {markdown_text(verdict.certified_by)}.",
        "",
        *comparison_table(verdict, table, champion, steps),
        "",
        *worst_classes(verdict, champion),
        "",
        f"Champion before this run: {champ}.",
    ]
    if links:
        lines += ["", " · ".join(f"[{text}]({url})" for text, url in links.items())]
    if verdict.warning:
        lines += ["", f"**Warning:** {markdown_text(verdict.warning)}."]
    return "\n".join(lines)


def comparison_table(verdict: Verdict, table: pd.DataFrame, champion: dict | None, steps: str) -> list[str]:
    """This version | the champion it was compared with | the baseline, figure by figure."""
    row = table[table["name"] == verdict.winner].iloc[0]
    base = table[table["name"] == "baseline"].iloc[0]
    tags = champion["tags"] if champion else {}
    title = f"champion v{champion['version']} (`{tags.get('candidate', '?')}`)" if champion else "champion"

    def theirs(key: str, fmt: str) -> str:
        try:
            return format(float(tags[key]), fmt)
        except (KeyError, ValueError):
            return "—" if champion else "none yet"

    versus = verdict.champion_comparison
    today = (
        f"{champion['test_acc_today']:.2f}" if champion and "test_acc_today" in champion else theirs("", "")
    )
    test = verdict.test
    vs_champion = (
        f"{versus['delta']:+.2f} [{versus['lower']:+.2f}, {versus['upper']:+.2f}] on {versus['n']} images "
        f"({versus['gain']} won, {versus['loss']} lost)"
        if versus
        else (markdown_text(champion["error"]) if champion and champion["error"] else "—")
    )
    return [
        f"| | this version (`{verdict.winner}`) | {title} | baseline |",
        "|---|---|---|---|",
        f"| composition | {markdown_code(steps or row['strategy'])} | "
        f"{markdown_code(tags['composition']) if 'composition' in tags else '—'} | |",
        f"| params | {int(row['params'])} | {theirs('params', '.0f')} | {int(base['params'])} |",
        f"| size (bytes) | {int(row['size_bytes'])} | {theirs('size_bytes', '.0f')} | "
        f"{int(base['size_bytes'])} |",
        f"| FLOPs | {int(row['flops'])} | {theirs('flops', '.0f')} | {int(base['flops'])} |",
        f"| latency (ms, batch 1) | {float(row['latency_ms']):.3f} | {theirs('latency_ms', '.3f')} | "
        f"{float(base['latency_ms']):.3f} |",
        f"| gate accuracy (certifies) | {verdict.gate_acc:.2f} | {theirs('gate_acc', '.2f')} (its own run) | "
        f"{verdict.baseline_gate_acc:.2f} |",
        f"| test accuracy, today's images | {verdict.test_acc:.2f} | {today} | "
        f"{verdict.baseline_test_acc:.2f} |",
        f"| test change vs baseline, points [interval] | {test['delta']:+.2f} "
        f"[{test['lower']:+.2f}, {test['upper']:+.2f}] | | 0 |",
        f"| this version minus the champion on today's test images, points [interval] | {vs_champion} | | |",
    ]


def worst_classes(verdict: Verdict, champion: dict | None) -> list[str]:
    """The classes this version loses most on against the baseline, with the champion's today."""
    if not verdict.per_class:
        return []
    # Most lost against the baseline first; then (a baseline, or no loss) the weakest classes.
    worst = sorted(verdict.per_class, key=lambda c: (c["difference"], c["model"]))[:WORST_CLASSES]
    theirs = (champion or {}).get("per_class", {})
    lines = [
        f"**Worst classes on test** (of {len(verdict.per_class)}):",
        "",
        "| class | this version | champion | baseline | change vs baseline, points |",
        "|---|---|---|---|---|",
    ]
    for c in worst:
        champ = f"{theirs[c['class']]:.1f}" if c["class"] in theirs else "—"
        lines.append(
            f"| {markdown_text(c['class'])} | {c['model']:.1f} | {champ} | {c['baseline']:.1f} | "
            f"{c['difference']:+.1f} |"
        )
    return lines


def model_description(manifest: Manifest, cfg: PromoteConfig) -> str:
    """The registered model's page: the task, and how its versions are chosen."""
    shape = "x".join(str(d) for d in manifest.input_shape)
    classes = ", ".join(markdown_code(c) for c in manifest.classes)
    return "\n".join(
        [
            f"**Task:** `{markdown_text(manifest.source)}`, {len(manifest.classes)} classes: {classes}.",
            "",
            f"**Input:** uint8 images as stored (any batch, layout and size; resized to {shape}, "
            f"pixels 0-{manifest.scale:g}); **output:** the class name and one probability per class.",
            "",
            f"**How versions are chosen:** each `shrinkflow run` certifies the candidate with the "
            f"fewest `{cfg.objective}` whose gate accuracy is within {cfg.tolerance:g} points "
            f"({cfg.tolerance_mode}) of the baseline, then compares it on the current test images "
            f"with `@{cfg.alias}`: smaller and not worse by {cfg.champion_tolerance:g} points, or more "
            f"accurate, and it becomes `@{cfg.alias}`; otherwise `@{cfg.challenger_alias}`.",
            "",
            "A reviewer compares with `shrinkflow review NAME`, and moves `@champion` only with "
            "`shrinkflow approve` or `shrinkflow rollback` (they re-validate the version and record "
            "who and why). MLflow's *Promote model* button copies a version to another registered "
            "model; it is not an approval.",
        ]
    )


def model_tags(identity: dict[str, str], cfg: PromoteConfig) -> dict[str, str]:
    return {**identity, "objective": cfg.objective, "managed_by": "shrinkflow"}


def name_parent_run(tracker: Tracker, run_id: str, title: str) -> None:
    """Name the pipeline's parent run after its outcome (it starts as ``pipeline``); a name is
    not worth failing a promotion whose decision is already written."""
    try:
        parent = tracker.client.get_run(run_id).data.tags.get("mlflow.parentRunId")
        if parent:
            tracker.client.update_run(parent, name=title[:250])
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
    known = {f.name for f in fields(Verdict)}
    if not isinstance(raw, dict):
        raise PromotionError(f"{path} is not a decision (a JSON {type(raw).__name__}); {fix}")
    if unknown := sorted(set(raw) - known):
        log.warning("%s: ignored keys this version does not know: %s", path, ", ".join(unknown[:10]))
    try:
        verdict = Verdict(**{k: v for k, v in raw.items() if k in known})
        return replace(verdict, verdict=Kind(verdict.verdict)) if verdict.verdict else verdict
    except (TypeError, ValueError) as exc:
        raise PromotionError(f"{path} is not a complete decision ({exc}); {fix}") from None
