"""What people look at: the candidates table, the decision as Markdown, and the Pareto plot."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from shrinkflow.tasks.escape import markdown_code, markdown_text
from shrinkflow.tasks.io import atomic_path
from shrinkflow.tasks.promote import Decision
from shrinkflow.tasks.stats import margin_points

SHOWN = [
    "name",
    "strategy",
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
    "eligible",
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


def plain_code(value: object) -> str:
    return f"`{value}`"


def format_table(table: pd.DataFrame, winner: str | None = None, text=markdown_text) -> str:
    """The candidates table as Markdown, the promoted row marked with a star; names pass through
    ``text`` (``str`` for a terminal)."""
    shown = table.reindex(columns=SHOWN).copy()
    for column in ("params", "flops", "size_bytes"):  # counts, even with a failed row's blanks
        shown[column] = shown[column].astype("Int64")
    shown["gate_p"] = [f"{p:.2g}" if p == p else "" for p in shown["gate_p"]]
    shown = shown.astype(object).where(shown.notna(), "")
    shown.insert(0, " ", ["*" if name == winner else "" for name in shown["name"]])
    for column in ("name", "strategy", "onnx"):
        shown[column] = [text(v) if v != "" else v for v in shown[column]]
    return shown.to_markdown(index=False, floatfmt=".2f")


def decision_lines(decision: Decision, text=markdown_text, code=markdown_code) -> list[str]:
    """The decision in a few sentences: the printed summary, report.md and Prefect's artefact.
    Names and reasons pass through ``text`` and ``code`` (plain ones for a terminal)."""
    reg = decision.registry
    where = "nothing"
    if reg.get("alias"):
        where = f"{code(reg.get('model_name'))} v{reg.get('version')} as {code('@' + str(reg['alias']))}"
    elif reg:
        where = f"{code(reg.get('model_name'))} v{reg.get('version')} (no alias)"
    lines = [f"**Winner:** {code(decision.winner)} ({text(decision.strategy)}), registered {where}."]
    if decision.gate:
        p_value = decision.gate.get("p_value")
        p_text = f"; p = {p_value:.3g}" if p_value is not None else ""
        lines.append(f"**Gate:** {text(decision.summary)}{p_text}.")
    lines.append(f"**Why this model:** {text(decision.reason)}.")
    if test := decision.test:
        lines.append(
            f"**Test (may only veto):** {test['delta']:+.2f} points against the baseline, interval "
            f"[{test['lower']:+.2f}, {test['upper']:+.2f}] on {test['n']} test images "
            f"({decision.test_acc:.2f}% vs {decision.baseline_test_acc:.2f}%)."
        )
    if decision.verdict:
        lines.append(f"**Against the registry:** {decision.verdict} - {text(decision.verdict_reason)}.")
    if decision.warning:
        lines.append(f"**Warning:** {text(decision.warning)}.")
    return lines


def per_class_section(decision: Decision) -> list[str]:
    """The winner's test accuracy in each class beside the baseline's, worst class first."""
    if not decision.per_class or decision.winner == "baseline":
        return []
    rows = sorted(decision.per_class, key=lambda r: r["difference"])
    table = pd.DataFrame(rows).rename(columns={"model": markdown_text(decision.winner)})
    table["class"] = [markdown_text(c) for c in table["class"]]
    return [
        f"## Per class on test: {markdown_code(decision.winner)} against the baseline (worst first)",
        "",
        table.to_markdown(index=False, floatfmt=".2f"),
        "",
    ]


def markdown_report(table: pd.DataFrame, decision: Decision) -> str:
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
            "`gate_*`: paired comparison with the baseline on the gate split (delta, one-sided lower "
            "bound, p-value of the non-inferiority test); `test_*`: the same on test, with both bounds.",
            "",
            format_table(table, decision.winner),
        ]
    )


STRATEGY_MARKERS = "osD^v<>PXh*"


def pareto_plot(table: pd.DataFrame, decision: Decision, path: Path) -> Path:
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
