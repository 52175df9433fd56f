"""``shrinkflow``: run the whole flow, one stage (what dvc.yaml calls), or re-print a report.

Prefect is imported only by the commands that need it, so ``shrinkflow stage`` starts fast.
"""

from __future__ import annotations

import logging
import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from tasks.config import ConfigError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Shrink trained PyTorch classifiers within an accuracy tolerance.",
    pretty_exceptions_enable=False,
)

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params file to read.")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", "-s", help="override one key, e.g. -s train.epochs=5")
]
RootOpt = Annotated[
    Path, typer.Option("--root", help="project directory that holds data/, artifacts/, reports/.")
]


class Stage(StrEnum):
    prepare = "prepare"
    baseline = "baseline"
    shrink = "shrink"
    evaluate = "evaluate"
    promote = "promote"


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


@app.command()
def run(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, root: RootOpt = Path(".")) -> None:
    """Run the whole Prefect flow and print the candidates table and the promotion.

    Example: shrinkflow run -s shrink.workers=1 -s promote.tolerance=0.5
    """
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "tasks,models")
    from flows.pipeline import run as run_flow
    from tasks.config import load_params

    try:
        load_params(params, tuple(set_ or ()))
    except ConfigError as exc:
        _fail(str(exc))
    run_flow(params, tuple(set_ or ()), root)
    report(params=params, root=root)


@app.command()
def stage(
    name: Annotated[Stage, typer.Argument(help="the stage to run.")],
    candidate: Annotated[
        str | None, typer.Option(help="the candidate to shrink (shrink stage only).")
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    root: RootOpt = Path("."),
) -> None:
    """Run one stage without Prefect; this is what each dvc.yaml stage calls.

    Example: shrinkflow stage shrink --candidate width-0.5
    """
    from tasks import stages

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        ctx = stages.Context.load(params, tuple(set_ or ()), root)
    except ConfigError as exc:
        _fail(str(exc))
    if name is Stage.shrink:
        if candidate not in ctx.params.shrink.candidates:
            known = ", ".join(ctx.params.shrink.candidates)
            _fail(f"--candidate {candidate!r} is not in shrink.candidates ({known})")
        stages.run_candidate(ctx, candidate)
    elif name is Stage.prepare:
        stages.run_prepare(ctx)
    elif name is Stage.baseline:
        stages.run_baseline(ctx)
    elif name is Stage.evaluate:
        stages.run_evaluate(ctx)
    else:
        stages.run_promote(ctx)


@app.command()
def report(params: ParamsOpt = Path("params.yaml"), root: RootOpt = Path(".")) -> None:
    """Re-print the last run's candidates table and promotion decision from reports/."""
    import pandas as pd

    from tasks.config import load_params
    from tasks.layout import Layout
    from tasks.promote import load_decision
    from tasks.report import format_table

    try:
        layout = Layout.from_params(load_params(params), root)
    except ConfigError as exc:
        _fail(str(exc))
    if not layout.candidates_csv.exists():
        _fail(f"{layout.candidates_csv} does not exist; run the pipeline first")
    decision = load_decision(layout) if layout.promotion_json.exists() else None
    typer.echo(format_table(pd.read_csv(layout.candidates_csv), decision.winner if decision else None))
    if decision:
        reg = decision.registry
        where = f"{reg.get('model_name')} v{reg.get('version')} @{reg.get('alias')}"
        typer.echo(f"\npromoted: {decision.winner} -> {where}")
        typer.echo(f"reason: {decision.reason}")


def main() -> None:
    app(prog_name="shrinkflow")


if __name__ == "__main__":
    sys.exit(main())
