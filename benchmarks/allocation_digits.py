"""Which allocation should the default params.yaml use? The four allocations of a params budget
on the default digits pipeline (BaseNet (32, 64)/128, 30 baseline epochs), each candidate pruned
by prune_l1 and fine-tuned 20 epochs at lr 0.01 (optionally distilled), over several seeds; test
accuracy (360 images) and val accuracy (179) per candidate, and the params each kept. Prints a
Markdown table.

    python -m benchmarks.allocation_digits [--seeds 3] [--keeps 0.1 0.05] [--distill]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import yaml

from shrinkflow.models.checkpoint import load_checkpoint
from shrinkflow.tasks.config import apply_override, parse_params
from shrinkflow.tasks.data.prepare import load_split, prepare
from shrinkflow.tasks.layout import Layout
from shrinkflow.tasks.training.engine import evaluate
from shrinkflow.tasks.training.train import shrink_candidate, train_baseline

REPO = Path(__file__).resolve().parents[1]
METHODS = ("uniform", "global", "sensitivity", "sample")
KD = "distill: {temperature: 4.0, alpha: 0.7}"


def candidates(keeps: list[float], distill: bool) -> str:
    extra = f", {KD}" if distill else ""
    entries = [
        f"{m}-{int(k * 1000)}: {{strategy: prune_l1, lr: 0.01, budget: {{objective: params, keep: {k}}},"
        f" allocation: {m}{extra}}}"
        for k in keeps
        for m in METHODS
    ]
    return "{" + ", ".join(entries) + "}"


def run(seed: int, keeps: list[float], distill: bool, root: Path) -> dict[str, dict]:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for item in (f"seed={seed}", f"shrink.candidates={candidates(keeps, distill)}"):
        raw = apply_override(raw, item)
    params = parse_params(raw)
    layout = Layout.from_params(params, root)
    prepare(params, layout)
    base = train_baseline(params, layout)
    val, test = load_split(layout, "val"), load_split(layout, "test")
    model, _ = load_checkpoint(layout.root / base.checkpoint, sha256=base.sha256)
    found = {"baseline": {"val": evaluate(model, val), "test": evaluate(model, test), "params": 1.0}}
    for name in params.shrink.candidates:
        record = shrink_candidate(params, layout, name)
        model, _ = load_checkpoint(layout.root / record.checkpoint, sha256=record.sha256)
        found[name] = {
            "val": evaluate(model, val),
            "test": evaluate(model, test),
            "params": record.options["allocated"]["cost"]["params"],
            "widths": record.options["widths"],
        }
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.1, 0.05])
    parser.add_argument("--distill", action="store_true")
    args = parser.parse_args()
    runs = []
    for seed in range(args.seeds):
        with tempfile.TemporaryDirectory(prefix="alloc-digits-") as tmp:
            runs.append(run(seed, args.keeps, args.distill, Path(tmp)))
    print(f"seeds 0..{args.seeds - 1}; distill: {args.distill}\n")
    print(
        "| candidate | params kept | val acc % (mean) | test acc % (mean) | test acc % per seed "
        "| widths (seed 0) |"
    )
    print("|---|---|---|---|---|---|")
    for name in runs[0]:
        tests = [r[name]["test"] for r in runs]
        print(
            f"| {name} | {statistics.mean(r[name]['params'] for r in runs):.4f} "
            f"| {statistics.mean(r[name]['val'] for r in runs):.2f} | {statistics.mean(tests):.2f} "
            f"| {', '.join(f'{t:.2f}' for t in tests)} | {runs[0][name].get('widths', '-')} |"
        )


if __name__ == "__main__":
    main()
