"""Does the promotion keep its promise? The default run across seeds, each in a fresh project
with a fresh MLflow registry and Prefect home, judged on the test split it never chose on.

    python -m benchmarks.seeds [--seeds 0 1 2 3 4] [--params params.yaml] [-s key=value ...]

For every seed it runs ``shrinkflow run -s seed=N`` (the same command as ``make run``) in a
temporary copy of the project's params, then reads ``reports/promotion.json``: the promoted
model, its size against the baseline, its test drop, and whether that drop is within the
tolerance. Prints a Markdown table and the count of seeds that kept the promise ("smaller than
the baseline and within tolerance on test"); ``--out FILE`` also writes it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run_seed(seed: int, params: Path, overrides: list[str], work: Path) -> dict:
    """One default run in a fresh project directory; its decision as a table row."""
    project = work / f"seed-{seed}"
    project.mkdir(parents=True)
    shutil.copy(params, project / "params.yaml")
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
        "PREFECT_HOME": str(project / ".prefect"),
    }
    env.pop("PREFECT_API_URL", None)
    sets = [arg for item in (f"seed={seed}", *overrides) for arg in ("-s", item)]
    start = time.perf_counter()
    done = subprocess.run(
        [str(BIN / "shrinkflow"), "run", *sets], cwd=project, env=env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
        return {"seed": seed, "winner": "(run failed)", "note": tail[0] if tail else "", "seconds": seconds}
    decision = json.loads((project / "reports/promotion.json").read_text())
    table = pd.read_csv(project / "reports/candidates.csv", keep_default_na=False, na_values=[""])
    return row(seed, decision, table, seconds)


def row(seed: int, decision: dict, table: pd.DataFrame, seconds: float) -> dict:
    """What a reader needs from one run's decision (older decisions lack the gate fields)."""
    base = table[table["name"] == "baseline"].iloc[0]
    won = table[table["name"] == decision["winner"]].iloc[0]
    drop = round(decision["baseline_test_acc"] - decision["test_acc"], 2)
    tolerance = decision["tolerance"]
    if decision.get("tolerance_mode") == "relative":
        tolerance = decision["baseline_test_acc"] * tolerance / 100
    smaller = int(won["params"]) < int(base["params"])
    return {
        "seed": seed,
        "winner": decision["winner"],
        "params": int(won["params"]),
        "x smaller": round(int(base["params"]) / int(won["params"]), 2),
        "gate": decision.get("summary", "(point rule on validation)"),
        "test drop": drop,
        "tolerance": tolerance,
        "kept": "yes" if smaller and drop <= tolerance + 1e-9 else ("baseline" if not smaller else "NO"),
        "verdict": decision.get("verdict", ""),
        "seconds": round(seconds),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("-s", "--set", dest="overrides", action="append", default=[], help="key=value")
    parser.add_argument("--out", type=Path, help="also write the table to this Markdown file")
    parser.add_argument("--keep", type=Path, help="keep each seed's project under this new directory")
    args = parser.parse_args(argv)
    if args.keep and args.keep.exists():
        parser.error(f"--keep {args.keep}: already exists")
    with tempfile.TemporaryDirectory(prefix="shrinkflow-seeds-") as temporary:
        work, rows = args.keep or Path(temporary), []
        for seed in args.seeds:
            rows.append(run_seed(seed, args.params.resolve(), args.overrides, work))
            print(f"seed {seed}: {rows[-1]['winner']} ({rows[-1].get('kept', 'failed')})", file=sys.stderr)
    frame = pd.DataFrame(rows)
    kept = int((frame.get("kept") == "yes").sum()) if "kept" in frame else 0
    promise = "smaller than the baseline, test drop within tolerance"
    text = frame.to_markdown(index=False) + f"\n\nPromise kept ({promise}): {kept} of {len(rows)} seeds"
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
