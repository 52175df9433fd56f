"""A benchmark run as Markdown: the machine, the contenders, each promoted model against its
torch-pruning peers, every model of the pipeline run, the efficiency figures, the targets and
every figure beside the same figure of an earlier run (read from that run's JSON)."""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.efficiency import REPEATS
from benchmarks.figures import Contender, Figures, Gap, beside, change, shown
from shrinkflow.tasks.promotion.reproduce import cpu_model

REPO = Path(__file__).resolve().parents[1]


def machine() -> dict:
    """What the figures were measured on."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "training_device": gpu or "cpu",
        "python": platform.python_version(),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip(),
    }


def machine_slug(info: dict) -> str:
    device = "cuda" if info["training_device"] != "cpu" else "cpu"
    cpu = re.sub(r"[^a-z0-9]+", "-", re.sub(r"\(R\)|\(TM\)|processor", "", info["cpu"], flags=re.I).lower())
    return f"{info['cores']}core-{cpu.strip('-')}-{device}"


def _ratio(base: float, value: float) -> str:
    return f"{base / value:.2f}x" if value else "-"


def contenders_table(rows: list[Contender]) -> str:
    """The comparison table; ratios say how many times smaller (params, FLOPs, size, latency) or
    faster (throughput) than the baseline."""
    base = rows[0]
    lines = [
        "| model | how | test acc % | 95% interval | drop (pts) | params | params / | FLOPs | FLOPs / "
        "| size (KB) | size / | latency b1 (ms) | latency / | throughput b64 (img/s) | throughput x |",
        "|" + "---|" * 15,
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.how} | {r.test_acc:.2f} | {r.test_low:.2f}-{r.test_high:.2f} "
            f"| {base.test_acc - r.test_acc:+.2f} | {r.params:,} "
            f"| {_ratio(base.params, r.params)} | {r.flops:,} | {_ratio(base.flops, r.flops)} "
            f"| {r.size_bytes / 1024:,.0f} | {_ratio(base.size_bytes, r.size_bytes)} | {r.latency_ms:.3f} "
            f"| {_ratio(base.latency_ms, r.latency_ms)} | {r.throughput:,.0f} "
            f"| {_ratio(r.throughput, base.throughput)} |"
        )
    return "\n".join(lines)


def gaps_table(figures: Figures) -> str:
    """Each promoted model against each torch-pruning peer at its size: the peer's accuracy with
    its 95% Wilson interval, and the gap paired on the same test images with its 95% interval."""
    lines = [
        "| promoted by | model | test acc % | peer | peer params | peer test acc % | peer 95% interval "
        "| gap (pts) | gap 95% interval (paired) |",
        "|" + "---|" * 9,
    ]
    by_name = {c.name: c for c in figures.contenders}
    for g in figures.gaps:
        g = g if isinstance(g, Gap) else Gap(**g)
        won, peer = figures.winner(g.objective), by_name[g.peer]
        lines.append(
            f"| {g.objective} | {g.winner} | {won.test_acc:.2f} | {g.peer} | {peer.params:,} "
            f"| {peer.test_acc:.2f} | {peer.test_low:.2f}-{peer.test_high:.2f} | {g.delta:+.2f} "
            f"| {g.low:+.2f} to {g.high:+.2f} |"
        )
    return "\n".join(lines)


def candidates_table(rows: list[dict], winners: dict[str, str]) -> str:
    """Every model the pipeline trained, as its evaluate stage measured them: the gate's paired
    difference with the baseline and its one-sided 95% lower bound, and what an allocation chose
    (kept channels by group, ranks of the factorised layers)."""
    lines = [
        "| candidate | composition | ratio | gate delta (pts) | 95% lower bound | eligible | test acc % "
        "| params | FLOPs | latency b1 (ms) | widths and ranks kept |",
        "|" + "---|" * 11,
    ]
    for r in rows:
        marks = [f"promoted by {o}" for o, name in winners.items() if name == r["name"]]
        composition = r.get("composition")
        composition = composition if isinstance(composition, str) and composition else "baseline"
        name = r["name"] + (f" ({', '.join(marks)})" if marks else "")
        lines.append(
            f"| {name} | {composition} | {r['ratio']:.3f} | {r['gate_delta']:+.2f} "
            f"| {r['gate_lower']:+.2f} | {'yes' if r['eligible'] else 'no'} | {r['test_acc']:.2f} "
            f"| {int(r['params']):,} | {int(r['flops']):,} | {r['latency_ms']:.3f} "
            f"| {widths_cell(r.get('widths'))} |"
        )
    return "\n".join(lines)


def widths_cell(widths: str | dict[str, int] | None) -> str:
    """A candidate's kept channels per group and ranks (``name=kept``, ``name=keptr64``: evaluate's
    widths column; a dict of widths in runs before 2026-12-07), else ``-``."""
    if isinstance(widths, dict):
        return ", ".join(f"{g}={k}" for g, k in widths.items()) or "-"
    return ", ".join(widths.split()) if widths else "-"


def _overhead_rows(over: dict) -> list[str]:
    work = ", ".join(f"{k} {v:.1f}" for k, v in over["work_s"].items())
    return [
        f"| orchestration overhead | {over['ratio']:.3f} | flow wall {over['flow_s']:.1f} s / stage work "
        f"{sum(over['work_s'].values()):.1f} s ({work}) |"
    ]


def _speedup_rows(speed: dict) -> list[str]:
    return [
        f"| fan-out scaling, 2 single-thread workers vs 1, {runner} runner | {r['speedup']:.2f} "
        f"| work {r['one_worker_s']:.1f} s -> {r['two_workers_s']:.1f} s on "
        f"{', '.join(speed['candidates'])} ({speed['epochs']} epoch(s) each; best of "
        f"{speed['repeats']}); 2-worker pool start-up {r['startup_s']:.1f} s, not in the work; "
        f"results identical across runners: {'yes' if speed['identical'] else 'NO'} |"
        for runner, r in speed["runners"].items()
    ]


def _throughput_rows(thr: dict) -> list[str]:
    return [
        f"| training throughput, engine.fit ({thr['precision']}) / fp32 bare loop | {thr['ratio']:.2f} "
        f"| {thr['engine_images_per_s']:.0f} vs {thr['bare_fp32_images_per_s']:.0f} images/s "
        f"({thr['epochs']} epoch(s) of {thr['images']:,} images, each with validation on all "
        f"{thr['val_images']:,} val images, baseline model; best of {REPEATS}) |",
        f"| training throughput, engine.fit / bare loop at the same precision "
        f"| {thr['ratio_same_precision']:.3f} | {thr['engine_images_per_s']:.0f} vs "
        f"{thr['bare_same_images_per_s']:.0f} images/s |",
    ]


def _dvc_rows(dvc: dict) -> list[str]:
    return [
        f"| `dvc repro`, nothing changed | {dvc['nothing_changed_s']:.1f} s "
        f"| digits, small params, one candidate; first repro {dvc['first_s']:.1f} s |"
    ]


EFFICIENCY_ROWS: dict[str, Callable[[dict], list[str]]] = {
    "overhead": _overhead_rows,
    "speedup": _speedup_rows,
    "throughput": _throughput_rows,
    "dvc": _dvc_rows,
}


def efficiency_table(eff: dict) -> str:
    """The efficiency figures this run measured (none: no table)."""
    rows = [row for key, rows_of in EFFICIENCY_ROWS.items() if key in eff for row in rows_of(eff[key])]
    return "\n".join(["| figure | value | how |", "|---|---|---|", *rows]) if rows else ""


def beside_table(now: dict, before: dict, label: str) -> str:
    """Every figure of this run (``now``, its JSON) beside the same figure of run ``label``."""
    lines = [f"| figure | this run | {label} | change |", "|---|---|---|---|"]
    lines += [f"| {name} | {shown(a)} | {shown(b)} | {change(a, b)} |" for name, a, b in beside(now, before)]
    return "\n".join(lines)


def _header(figures: Figures) -> list[str]:
    m, c = figures.machine, figures.config
    curve = ", ".join(f"{e}: {v:.1f}" for e, v in c["baseline_val_curve"].items())
    return [
        f"# Compression benchmark: {figures.setup}, {dt.date.today().isoformat()}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
        f"training on {m['training_device']}; latency and throughput on one CPU thread (medians). "
        f"Code: commit {m.get('commit') or 'unknown'}.",
        "",
        f"Data: {c['data']}; training augmentation: {c['augment']}. Baseline: {c['model']}, "
        f"{c['base_epochs']} epochs ({c['precision']}; validation accuracy by epoch: {curve}); "
        f"every contender fine-tuned/trained {c['tune_epochs']} epochs with the same loop. Promotion: "
        f"tolerance {c['tolerance']:g} points, one-sided 95% paired bound on {c['gate_images']:,} gate "
        f"images. Whole benchmark: {figures.wall_seconds / 60:.1f} min.",
    ]


def render(
    figures: Figures, targets: list[tuple[str, bool]], previous: tuple[str, dict, dict] | None = None
) -> str:
    """The whole result file: setup, machine, the tables, efficiency, targets and (``previous``:
    its label, this run's JSON and the earlier run's) every figure beside the earlier run's."""
    winners = {o: d["winner"] for o, d in figures.decisions.items()}
    lines = [
        *_header(figures),
        "",
        contenders_table(figures.contenders),
        "",
        "Ratios: times smaller than the baseline (params, FLOPs, size, latency) or faster (throughput). "
        "Intervals: 95% Wilson intervals of the test accuracy.",
        "",
        *[f"- promoted by {o}: {d['reason']}" for o, d in figures.decisions.items()],
        "",
        "Each promoted model against torch-pruning at its own size:",
        "",
        gaps_table(figures),
        "",
        "Every model of the pipeline run:",
        "",
        candidates_table(figures.candidates, winners),
        "",
        efficiency_table(figures.efficiency),
        "",
        "Targets (reported, not asserted):",
        "",
        *[f"- {'PASS' if ok else 'FAIL'}: {line}" for line, ok in targets],
    ]
    if previous:
        label, now, before = previous
        lines += ["", f"Every figure beside {label}:", "", beside_table(now, before, label)]
    return "\n".join(lines) + "\n"
