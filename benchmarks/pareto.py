"""The benchmark's Pareto plot: test accuracy (95% interval) against batch-1 latency and against
params for every model, one front per method (shrinkflow's joint pruning + low-rank and its
ladder, low-rank alone, pruning only, torch-pruning uniform and global, the seed's AdjustedNet)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.figures import Figures, wilson

METHOD_STYLES = {  # method -> (colour, marker)
    "baseline": ("black", "*"),
    "shrinkflow joint / ladder (pruning + low-rank)": ("tab:green", "D"),
    "shrinkflow low-rank alone": ("tab:purple", "P"),
    "shrinkflow pruning only": ("tab:blue", "o"),
    "torch-pruning uniform": ("tab:orange", "s"),
    "torch-pruning global": ("tab:red", "^"),
    "AdjustedNet (width, fresh init)": ("tab:gray", "v"),
}


def method_of(name: str, strategy: str | None = None, composition: str | None = None) -> str:
    """Which method's front a model belongs to: by its name for a contender, by its strategy and
    composed steps (``prune_l1+lowrank+distill``) for a model of the pipeline run."""
    if name == "baseline":
        return "baseline"
    if name.startswith("torch-pruning"):
        return "torch-pruning global" if "global" in name else "torch-pruning uniform"
    steps = composition.split("+") if isinstance(composition, str) else []
    if strategy == "lowrank":
        return "shrinkflow low-rank alone"
    if "lowrank" in steps:
        return "shrinkflow joint / ladder (pruning + low-rank)"
    return "AdjustedNet (width, fresh init)" if strategy == "width" else "shrinkflow pruning only"


def _points(figures: Figures) -> list[tuple]:
    """(method, name, latency, params, acc, low, high) of every model: the pipeline's from its
    table, the peers from the contenders (the others are among the pipeline's models)."""
    n = figures.config["test_images"]
    ours = [
        (
            method_of(r["name"], r.get("strategy"), r.get("composition")),
            r["name"],
            r["latency_ms"],
            r["params"],
            r["test_acc"],
            *wilson(r["test_acc"], n),
        )
        for r in figures.candidates
    ]
    peers = [
        (method_of(c.name), c.name, c.latency_ms, c.params, c.test_acc, c.test_low, c.test_high)
        for c in figures.contenders
        if c.name.startswith("torch-pruning")
    ]
    return ours + peers


def pareto_png(figures: Figures, path: Path) -> Path:
    """Test accuracy (95% interval) against batch-1 latency and params for every pipeline model
    and every peer, coloured by method; each method's non-dominated models (none of the same
    method both cheaper and more accurate) joined by a line of its colour."""
    from matplotlib.figure import Figure

    points = _points(figures)
    fig = Figure(figsize=(13, 5.5), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, (col, label) in zip(
        axes, ((2, "CPU latency, batch 1, one thread (ms)"), (3, "parameters (log)")), strict=True
    ):
        for method, (colour, marker) in METHOD_STYLES.items():
            mine = [p for p in points if p[0] == method]
            if not mine:
                continue
            for _, name, *values in mine:
                x, acc, low, high = values[col - 2], values[2], values[3], values[4]
                ax.errorbar(
                    x, acc, yerr=[[acc - low], [high - acc]], fmt=marker, color=colour, capsize=2, ms=5
                )
                ax.annotate(name, (x, acc), textcoords="offset points", xytext=(4, 3), fontsize=6)
            front = pareto_front([(p[col], p[4]) for p in mine])
            ax.plot(*zip(*front, strict=True), color=colour, lw=1, ls="--", marker=marker, ms=0, label=method)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
        if col == 3:
            ax.set_xscale("log")
    axes[0].set_ylabel(f"{figures.config['data'].split(' (')[0]} test accuracy (%), 95% interval")
    axes[0].legend(fontsize=8, title="each method's Pareto front")
    fig.suptitle(f"{figures.setup}: every model, by method")
    fig.savefig(path, format="png", dpi=110)
    return path


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (cost, accuracy) points no other point beats on both, by increasing cost."""
    front, best = [], float("-inf")
    for cost, acc in sorted(points, key=lambda p: (p[0], -p[1])):
        if acc > best:
            front.append((cost, acc))
            best = acc
    return front
