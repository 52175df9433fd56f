"""What people look at: the candidates table, the decision as Markdown (report.md, the printed
summary, the registered version's page and the registered model's), and the Pareto plot."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pandas as pd

from shrinkflow.tasks.config import PromoteConfig
from shrinkflow.tasks.decision.decide import Registered, Verdict
from shrinkflow.tasks.decision.stats import margin_points
from shrinkflow.tasks.escape import markdown_code, markdown_text
from shrinkflow.tasks.io import atomic_path
from shrinkflow.tasks.records import Manifest

SHOWN = [
    "name",
    "strategy",
    "composition",
    "ratio",
    "status",
    "val_acc",
    "gate_acc",
    "test_acc",
    "val_f1",
    "test_f1",
    "gate_delta",
    "gate_lower",
    "gate_p",
    "decision",
    "test_delta",
    "test_lower",
    "test_upper",
    "params",
    "flops",
    "size_bytes",
    "latency_ms",
    "float_latency_ms",
    "ort_latency_ms",
    "onnx",
    "param_ratio",
]

TERMINAL_WIDTH = 120  # columns of the printed table and summary (the full table is report.md's)
CONSOLE_NAME_CHARS = 18
CONSOLE_COMPOSITION_CHARS = 24


def plain_code(value: object) -> str:
    return f"`{value}`"


def full_table(
    table: pd.DataFrame, winner: str | None = None, text=markdown_text, verdict: Verdict | None = None
) -> str:
    """Every column of the candidates table as Markdown (report.md, Prefect's artefact), the
    promoted row marked with a star and, with the ``verdict``, what the decision made of each
    model; names pass through ``text``."""
    outcomes = {c.name: str(c.outcome) for c in verdict.candidates} if verdict else {}
    shown = table.assign(decision=[outcomes.get(n, "") for n in table["name"]]).reindex(columns=SHOWN)
    for column in ("params", "flops", "size_bytes"):  # counts, even with a failed row's blanks
        shown[column] = shown[column].astype("Int64")
    shown["gate_p"] = [f"{p:.2g}" if p == p else "" for p in shown["gate_p"]]
    shown = shown.astype(object).where(shown.notna(), "")
    shown.insert(0, " ", ["*" if name == winner else "" for name in shown["name"]])
    for column in ("name", "strategy", "composition", "onnx"):
        shown[column] = [text(v) if v != "" else v for v in shown[column]]
    return shown.to_markdown(index=False, floatfmt=".2f")


def format_table(
    table: pd.DataFrame, winner: str | None = None, text=markdown_text, verdict: Verdict | None = None
) -> str:
    """The candidates table for a terminal, at most :data:`TERMINAL_WIDTH` columns: each model's
    composition, its size and latency as a fraction of the baseline's, the gate's paired delta
    and lower bound, whether the decision found it eligible (or what it made of it) and the test
    delta; the promoted row is starred. Long names are shortened; :func:`full_table` has it all."""
    base = table[table["name"] == "baseline"].iloc[0]
    outcomes = {c.name: str(c.outcome) for c in verdict.candidates} if verdict else {}
    eligible = set(verdict.eligible) if verdict else set()

    def decided(name: str) -> str:
        if not verdict:
            return ""
        return "yes" if name in eligible else str(outcomes.get(name, ""))

    shown = pd.DataFrame(
        {
            " ": ["*" if name == winner else "" for name in table["name"]],
            "name": [_cell(text(n), CONSOLE_NAME_CHARS) for n in table["name"]],
            "composition": [_cell(text(c), CONSOLE_COMPOSITION_CHARS) for c in _column(table, "composition")],
            "size": _ratio(table["params"], base["params"]),
            "latency": _ratio(table["latency_ms"], base["latency_ms"]),
            "gate_delta": _points(table["gate_delta"]),
            "gate_bound": _points(table["gate_lower"]),
            "eligible": [decided(n) for n in table["name"]],
            "test_delta": _points(table["test_delta"]),
        }
    )
    return _aligned(shown)


def _aligned(frame: pd.DataFrame) -> str:
    """``frame``'s text cells in left-aligned columns two spaces apart, a rule under the header."""
    rows = [list(frame.columns), *frame.astype(str).values.tolist()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    rows.insert(1, ["-" * w for w in widths])
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def _column(table: pd.DataFrame, column: str) -> list:
    """A column that a table from before it existed lacks (blank)."""
    return table[column].fillna("").tolist() if column in table else [""] * len(table)


def _cell(value: object, chars: int) -> str:
    """One line of at most ``chars`` characters: a name's control characters become spaces."""
    line = "".join(c if c.isprintable() else " " for c in str(value))
    return line if len(line) <= chars else line[: chars - 1] + "…"


def _ratio(values: pd.Series, base: float) -> list[str]:
    return [f"{v / base:.2f}x" if v == v and base else "" for v in pd.to_numeric(values, errors="coerce")]


def _points(values: pd.Series) -> list[str]:
    return [f"{v:+.2f}" if v == v else "" for v in pd.to_numeric(values, errors="coerce")]


def decision_lines(
    decision: Verdict, text=markdown_text, code=markdown_code, width: int | None = None
) -> list[str]:
    """The decision in a few sentences: the printed summary, report.md and Prefect's artefact.
    Names and reasons pass through ``text`` and ``code`` (plain ones for a terminal, where each
    sentence is also wrapped to ``width``, :data:`TERMINAL_WIDTH` unless told)."""
    reg = decision.registry
    where = "nothing"
    if reg and reg.alias:
        where = f"{code(reg.model_name)} v{reg.version} as {code('@' + reg.alias)}"
    elif reg:
        where = f"{code(reg.model_name)} v{reg.version} (no alias)"
    made_of = decision.composition or decision.strategy
    lines = [f"**Winner:** {code(decision.winner)} ({text(made_of)}), registered {where}."]
    if gate := decision.gate:
        p_text = f"; p = {gate.p_value:.3g}" if gate.p_value is not None else ""
        lines.append(f"**Gate:** {text(decision.summary)}{p_text}.")
    lines.append(f"**Why this model:** {text(decision.reason)}.")
    if decision.certified_by:
        order = " > ".join(decision.order) or "none"
        stop = f", stopped at {text(decision.stopped_at)}" if decision.stopped_at else ""
        lines.append(f"**Certified by:** {text(decision.certified_by)}; order tested: {text(order)}{stop}.")
    if test := decision.test:
        lines.append(
            f"**Test (may only veto):** {test.delta:+.2f} points against the baseline, interval "
            f"[{test.lower:+.2f}, {test.upper:+.2f}] on {test.n} test images "
            f"({decision.test_acc:.2f}% vs {decision.baseline_test_acc:.2f}%)."
        )
    lines.append(f"**Against the registry:** {decision.kind} - {text(decision.kind_reason)}.")
    if decision.warning:
        lines.append(f"**Warning:** {text(decision.warning)}.")
    width = width or (TERMINAL_WIDTH if text is str else None)
    if width:
        lines = [textwrap.fill(line, width, subsequent_indent="  ", break_on_hyphens=False) for line in lines]
    return lines


def per_class_section(decision: Verdict) -> list[str]:
    """The winner's test accuracy in each class beside the baseline's, worst class first."""
    if not decision.per_class or decision.winner == "baseline":
        return []
    rows = sorted(decision.per_class, key=lambda r: r.difference)
    table = pd.DataFrame([r.as_json() for r in rows]).rename(
        columns={"model": markdown_text(decision.winner)}
    )
    table["class"] = [markdown_text(c) for c in table["class"]]
    return [
        f"## Per class on test: {markdown_code(decision.winner)} against the baseline (worst first)",
        "",
        table.to_markdown(index=False, floatfmt=".2f"),
        "",
    ]


MLFLOW_UI_DEFAULT = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local store


def links_section(
    tracking_uri: str,
    experiment_id: str,
    parent_run: str,
    registry: Registered | None,
    flow_run: str = "",
    flow_run_url: str | None = None,
) -> list[str]:
    """Where this run lives in MLflow (the parent run, the registered version) and in Prefect, as
    Markdown links: a tracking server's own pages, or for a local store the pages `mlflow ui`
    serves once started on it."""
    served = tracking_uri.startswith(("http://", "https://"))
    ui = tracking_uri.rstrip("/") if served else MLFLOW_UI_DEFAULT
    run_url = f"{ui}/#/experiments/{quote(experiment_id)}/runs/{quote(parent_run)}"
    lines = ["## Links", "", f"- MLflow parent run: [{markdown_text(parent_run)}]({run_url})"]
    if registry and registry.version:
        name, version = registry.model_name, registry.version
        alias = f" {markdown_code('@' + registry.alias)}" if registry.alias else ""
        url = f"{ui}/#/models/{quote(name, safe='')}/versions/{quote(version)}"
        lines.append(f"- Registered version: [{markdown_text(name)} v{markdown_text(version)}]({url}){alias}")
    else:
        lines.append("- Registered version: none (nothing registered by this run)")
    if not served:
        serve = markdown_code(f"mlflow ui --backend-store-uri {tracking_uri}")
        lines.append(f"- The store is local: {serve} serves these pages")
    if flow_run:
        where = f"[{markdown_text(flow_run)}]({flow_run_url})" if flow_run_url else markdown_code(flow_run)
        lines.append(f"- Prefect flow run: {where} (the MLflow runs carry it as `prefect.flow_run_*` tags)")
    return [*lines, ""]


def markdown_report(table: pd.DataFrame, decision: Verdict) -> str:
    """The run's decision, its reason and the whole table, for Prefect and MLflow."""
    return "\n".join(
        [
            "# shrinkflow run",
            "",
            "\n\n".join(decision_lines(decision)),
            "",
            *per_class_section(decision),
            "## Candidates (`*` = this run's winner)",
            "",
            "`composition`: the model's steps in order (e.g. `prune_l1+distill+int8`); "
            "`gate_*`: paired comparison with the baseline on the gate split (delta, one-sided lower "
            "bound, p-value of the non-inferiority test); `decision`: what the procedure made of the "
            "model (certified, failed, untested after the sequence stopped, dominated: no more "
            "accurate on validation than a cheaper recipe, not smaller than the baseline, slower int8: "
            "int8 kernels no faster here than float); `test_*`: the same on test, with both bounds.",
            "",
            full_table(table, decision.winner, verdict=decision),
        ]
    )


WORST_CLASSES = 3  # shown on the version page; report.md has them all


@dataclass(frozen=True)
class ChampionFigures:
    """The champion a verdict was compared with, as its record (``tags``) says and as it scores
    on today's test images (``None`` / empty: it does not load)."""

    version: str
    tags: Mapping[str, str]
    error: str
    test_acc_today: float | None = None
    per_class: Mapping[str, float] = field(default_factory=dict)  # accuracy by class name


def version_page(
    verdict: Verdict,
    table: pd.DataFrame,
    alias: str,
    champion: ChampionFigures | None = None,
    links: dict[str, str] | None = None,
    steps: str = "",
) -> str:
    """The Markdown a reviewer reads on the version page: the verdict, then this version side by
    side with the ``champion`` it was compared with and the baseline, its worst classes, and
    ``links`` to the Pareto plot and its record; ``steps`` is its composition."""
    before = verdict.champion_before
    champ = f"v{before.version}" if before else "none"
    gate = verdict.gate
    p_value = f"p = {gate.p_value:.3g}" if gate.p_value is not None else "point rule"
    lines = [
        f"**Verdict: `{alias}`**{' (forced)' * verdict.forced}: {markdown_text(verdict.kind_reason)}.",
        "",
        f"**Gate:** {markdown_text(verdict.summary)} ({p_value} for a drop of {gate.margin:g} points "
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


def comparison_table(
    verdict: Verdict, table: pd.DataFrame, champion: ChampionFigures | None, steps: str
) -> list[str]:
    """This version | the champion it was compared with | the baseline, figure by figure."""
    row = table[table["name"] == verdict.winner].iloc[0]
    base = table[table["name"] == "baseline"].iloc[0]
    tags = champion.tags if champion else {}
    title = f"champion v{champion.version} (`{tags.get('candidate', '?')}`)" if champion else "champion"

    def theirs(key: str, fmt: str) -> str:
        try:
            return format(float(tags[key]), fmt)
        except (KeyError, ValueError):
            return "—" if champion else "none yet"

    versus, test = verdict.champion_comparison, verdict.test
    today = (
        f"{champion.test_acc_today:.2f}"
        if champion and champion.test_acc_today is not None
        else theirs("", "")
    )
    vs_champion = (
        f"{versus.delta:+.2f} [{versus.lower:+.2f}, {versus.upper:+.2f}] on {versus.n} images "
        f"({versus.gain} won, {versus.loss} lost)"
        if versus
        else (markdown_text(champion.error) if champion and champion.error else "—")
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
        f"| test change vs baseline, points [interval] | {test.delta:+.2f} "
        f"[{test.lower:+.2f}, {test.upper:+.2f}] | | 0 |",
        f"| this version minus the champion on today's test images, points [interval] | {vs_champion} | | |",
    ]


def worst_classes(verdict: Verdict, champion: ChampionFigures | None) -> list[str]:
    """The classes this version loses most on against the baseline, with the champion's today."""
    if not verdict.per_class:
        return []
    # Most lost against the baseline first; then (a baseline, or no loss) the weakest classes.
    worst = sorted(verdict.per_class, key=lambda c: (c.difference, c.model))[:WORST_CLASSES]
    theirs = champion.per_class if champion else {}
    lines = [
        f"**Worst classes on test** (of {len(verdict.per_class)}):",
        "",
        "| class | this version | champion | baseline | change vs baseline, points |",
        "|---|---|---|---|---|",
    ]
    for c in worst:
        champ = f"{theirs[c.name]:.1f}" if c.name in theirs else "—"
        lines.append(
            f"| {markdown_text(c.name)} | {c.model:.1f} | {champ} | {c.baseline:.1f} | {c.difference:+.1f} |"
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


STRATEGY_MARKERS = "osD^v<>PXh*"


def pareto_plot(table: pd.DataFrame, decision: Verdict, path: Path) -> Path:
    """Test accuracy against params (log) and against latency; tolerance band and winner marked."""
    from matplotlib.figure import Figure  # a second to import: only when a plot is drawn

    ok = table[table["status"] == "ok"]
    # A Figure of its own (no pyplot state machine, no global backend): safe in threads and servers.
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    floor = decision.baseline_test_acc - margin_points(
        decision.baseline_test_acc, decision.tolerance, decision.tolerance_mode
    )
    panels = [("params", "parameters (log scale)"), ("latency_ms", "CPU latency, batch 1 (ms)")]
    for ax, (column, label) in zip(axes, panels, strict=True):
        ax.axhspan(
            floor,
            decision.baseline_test_acc,
            color="tab:green",
            alpha=0.12,
            label=f"within {decision.tolerance:g} ({decision.tolerance_mode}) of the baseline",
        )
        ax.axhline(decision.baseline_test_acc, color="tab:green", lw=1, ls="--")
        for i, (strategy, group) in enumerate(ok.groupby("strategy", sort=True)):
            # Error bars: the paired test interval against the baseline, around the model's accuracy.
            below = (group["test_delta"] - group["test_lower"]).clip(lower=0)
            above = (group["test_upper"] - group["test_delta"]).clip(lower=0)
            color = f"C{i}"
            ax.errorbar(
                group[column],
                group["test_acc"],
                yerr=[below, above],
                fmt="none",
                ecolor=color,
                elinewidth=1,
                capsize=2,
                alpha=0.6,
                zorder=2,
            )
            ax.scatter(
                group[column],
                group["test_acc"],
                marker=STRATEGY_MARKERS[i % len(STRATEGY_MARKERS)],
                s=45,
                label=strategy,
                zorder=3,
                color=color,
            )
            for _, row in group.iterrows():
                ax.annotate(
                    row["name"],
                    (row[column], row["test_acc"]),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=7,
                )
        best = ok[ok["name"] == decision.winner]
        ax.scatter(
            best[column],
            best["test_acc"],
            s=260,
            facecolors="none",
            edgecolors="red",
            lw=2,
            zorder=4,
            label=f"promoted: {decision.winner}",
        )
        if column == "params":
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    axes[1].legend(fontsize=8, loc="lower right")
    confidence = f"{decision.confidence:.0%} paired intervals" if decision.confidence else "point rule"
    fig.suptitle(f"Test accuracy against size: every model (chosen on the gate split; bars: {confidence})")
    # The plotted points ride along in the PNG's text metadata, so the file can be checked
    # against the table it claims to show.
    points = ok[["name", "strategy", "params", "latency_ms", "test_acc", "test_lower", "test_upper"]].to_json(
        orient="records"
    )
    with atomic_path(path) as tmp:
        fig.savefig(
            tmp, format="png", dpi=110, metadata={"Title": "shrinkflow pareto", "Description": points}
        )
    return path
