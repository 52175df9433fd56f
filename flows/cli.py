"""``shrinkflow``: run the whole flow, one stage (what dvc.yaml calls), or re-print a report.

Prefect is imported only by the commands that need it, so ``shrinkflow stage`` starts fast.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from shrinkflow.flows import reaper
from shrinkflow.tasks.config import load_params
from shrinkflow.tasks.training import progress, stop

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
    Path | None,
    typer.Option(
        "--root",
        help="project directory that holds data/, artifacts/, reports/ (default: the params file's).",
    ),
]


def project_root(params: Path, root: Path | None) -> Path:
    """The project is where its params file is, unless ``--root`` says otherwise."""
    return root if root is not None else params.parent


@contextlib.contextmanager
def _terminated_as_interrupt() -> Iterator[None]:
    """SIGTERM (a scheduler stopping the job, `kill`) unwinds like Ctrl-C, so every stage ends
    its MLflow run KILLED and leaves no half-made decision; only in the main thread. Either signal
    also asks the training loops to stop: Python drops an exception raised while it runs a
    callback (an import's module lock, a weakref), and the loop's next batch raises it again."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        reason = f"signal {signal.Signals(signum).name}"
        stop.request(reason)
        raise KeyboardInterrupt(reason)

    # Ctrl-C only where Python's own handler has it (a background job may ignore it).
    signals = [signal.SIGTERM] + [signal.SIGINT] * (
        signal.getsignal(signal.SIGINT) is signal.default_int_handler
    )
    stop.clear()  # a command starts unstopped, whatever an earlier one in this process heard
    previous = {sig: signal.signal(sig, interrupt) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class Stage(StrEnum):
    prepare = "prepare"
    baseline = "baseline"
    sensitivity = "sensitivity"
    shrink = "shrink"
    evaluate = "evaluate"
    promote = "promote"


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Errors a user can fix become one line on stderr and exit status 1, not a traceback."""
    from shrinkflow.models.checkpoint import CheckpointError
    from shrinkflow.models.probe import NoGraph
    from shrinkflow.tasks.errors import ShrinkflowError

    try:
        yield
    except (ShrinkflowError, CheckpointError, NoGraph) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (see _terminated_as_interrupt)
        term = "SIGTERM" in str(exc)
        typer.echo(
            f"error: interrupted by {'SIGTERM' if term else 'Ctrl-C'}; the MLflow runs of unfinished "
            "stages are marked KILLED and no decision was left half-made",
            err=True,
        )
        raise typer.Exit(128 + (signal.SIGTERM if term else signal.SIGINT)) from None


_details = logging.getLogger("shrinkflow.cli")
_details.setLevel(logging.INFO)  # its records reach only the log file (see _console_quiet)
# Prefect reports a failed task or flow run, and MLflow a failed database write, at ERROR with a
# traceback; under the CLI the failure is already one `error:` line, so these go to the log file only.
_FILE_ONLY = ("prefect.flow_runs", "prefect.task_runs", "mlflow.store")
# Libraries talking about themselves: torch's warnings about its own internals (the `_pytree`
# Enum deprecation a piped run printed), Python warnings raised inside libraries (captured into
# `py.warnings` for the session), onnxscript's and onnx_ir's export steps, alembic's migrations,
# urllib3's retries of a tracking server that stopped answering (the error line says so).
_CHATTER = ("torch", "py.warnings", "onnxscript", "onnx_ir", "alembic", "urllib3")
# Loggers with console handlers of their own: the root (basicConfig's under `stage`; under `run`
# Prefect leaves the root to the log file once it has a handler), and MLflow's and torch's, which
# do not propagate.
_CONSOLE_LOGGERS = ("", "mlflow", "torch")
_OWN = "shrinkflow"  # the package's loggers: the only ones whose INFO a console shows


def _console_quiet(record: logging.LogRecord) -> bool:
    """Whether a console shows ``record``: on a clean run only progress and the verdict reach
    the terminal; everything else (MLflow creating its tables or validating an input example,
    Prefect's temporary-server banner, torch's and onnxscript's chatter) goes to the log file."""
    if record.name == _details.name or record.name.startswith(_CHATTER):
        return False
    if record.levelno < logging.WARNING and not record.name.startswith(_OWN):
        return False
    return not (record.levelno >= logging.ERROR and record.name.startswith(_FILE_ONLY))


class _FileOnly(logging.Filter):
    """On a logger whose console handlers are remade at will (torch re-creates its own when a
    library sets its log levels), hands each record to the log file alone."""

    def __init__(self, file: logging.Handler) -> None:
        super().__init__()
        self.file = file

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= self.file.level:
            self.file.handle(record)
        return False


def _torch_loggers() -> list[logging.Logger]:
    known = logging.Logger.manager.loggerDict.items()
    return [lg for name, lg in known if name.split(".")[0] == "torch" and isinstance(lg, logging.Logger)]


@contextlib.contextmanager
def _project_session(root: Path, command: str) -> Iterator[None]:
    """One writer per project (see tasks/store/lock.py), with every log record of the command appended
    to ``<root>/.shrinkflow/shrinkflow.log`` and expected failures kept off the console."""
    from shrinkflow.tasks.store.lock import STATE_DIR, project_lock

    with project_lock(root, command), _command_log(Path(root) / STATE_DIR, command):
        yield


@contextlib.contextmanager
def _command_log(state: Path, command: str) -> Iterator[None]:
    """Every log record of the command appended to ``state/shrinkflow.log`` (a failure with its
    traceback), and expected failures kept off the console; no log when ``state`` is not there."""
    if not state.is_dir():
        yield
        return
    handler = logging.FileHandler(state / "shrinkflow.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    logging.captureWarnings(True)  # Python warnings become `py.warnings` records: the log file's
    own, own_level = logging.getLogger(_OWN), logging.getLogger(_OWN).level
    own.setLevel(logging.INFO)  # the stages' own account reaches the log (and Prefect's run logs)
    import mlflow  # noqa: F401 - MLflow adds its console handler at import: filter it too

    loggers = [logging.getLogger(name) for name in _CONSOLE_LOGGERS]
    consoles = [h for lg in loggers for h in lg.handlers if isinstance(h, logging.StreamHandler)]
    for lg in loggers:
        lg.addHandler(handler)
    for console in consoles:
        console.addFilter(_console_quiet)
    torch_only_to_file, torch_loggers = _FileOnly(handler), _torch_loggers()
    for lg in torch_loggers:
        lg.addFilter(torch_only_to_file)
    _details.info("shrinkflow %s in %s", command, state.parent.resolve())
    try:
        yield
    except Exception as exc:
        _details.error("%s failed: %s", command, exc, exc_info=True)  # the log file only
        raise
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
        handler.close()
        for console in consoles:
            console.removeFilter(_console_quiet)
        for lg in torch_loggers:
            lg.removeFilter(torch_only_to_file)
        own.setLevel(own_level)
        logging.captureWarnings(False)


@contextlib.contextmanager
def _registry_command(root: Path, command: str) -> Iterator[None]:
    """A command that reads or moves the registry (no project lock: it writes no project file):
    a user's error is one line on stderr, exit 1; its traceback goes to the project's log, when
    the project has one (a run or stage made it)."""
    from shrinkflow.tasks.store.lock import STATE_DIR

    with _user_errors(), _command_log(Path(root) / STATE_DIR, command):
        yield


_watchers: list = []  # kept referenced, so their pipes stay open until this process exits


def check_prefect_home() -> None:
    """Refuse, in one line, a Prefect home that cannot be written (Prefect would retry its
    database for half a minute and then print a thousand lines)."""
    from shrinkflow.tasks.errors import ShrinkflowError

    home = Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()
    try:
        home.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=home):
            pass
    except OSError as exc:
        raise ShrinkflowError(
            f"PREFECT_HOME {home} is not a writable directory ({exc.strerror or exc}); "
            "point PREFECT_HOME at one"
        ) from None


PREFECT_STARTUP_ATTEMPTS = 2


def start_temporary_prefect_server() -> None:
    """Start Prefect's temporary API server (when no PREFECT_API_URL names one) before the flow,
    waiting ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`` (120 under this CLI) and trying
    again once: on a loaded machine it can take longer than Prefect's own 20 s. The flow then
    uses this server. Only a server that cannot start at all is an error, in one line."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_ENABLED,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
    )

    from shrinkflow.tasks.errors import ShrinkflowError

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return
    server, wait = SubprocessASGIServer(), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
    for attempt in range(1, PREFECT_STARTUP_ATTEMPTS + 1):
        try:
            server.start(timeout=wait)
            return
        except RuntimeError as exc:
            _details.warning("temporary Prefect server, try %d: %s", attempt, exc)
            if server.server_process is not None and server.server_process.poll() is None:
                server.server_process.kill()  # Prefect leaves a server that was too slow running
            server.server_process, server.port = None, None
    raise ShrinkflowError(
        f"Prefect's temporary API server did not answer within {wait} s, {PREFECT_STARTUP_ATTEMPTS} "
        "times (details in .shrinkflow/shrinkflow.log); raise "
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS "
        "or start `prefect server start` and set PREFECT_API_URL"
    )


CANDIDATE_NAME_CHARS = 40  # of a failed candidate's quoted name; its line fits the table's width


def failure_lines(table) -> list[str]:
    """One line per candidate that has no measurements, saying why: the first line of its recorded
    error (outside text: control characters gone, the line cut to the terminal table's width),
    its name quoted."""
    from shrinkflow.tasks.decision.report import TERMINAL_WIDTH
    from shrinkflow.tasks.escape import one_line

    lines = []
    for _, row in table[(table["name"] != "baseline") & (table["status"] != "ok")].iterrows():
        error = row.get("error")
        said = [line for line in str(error).splitlines() if line.strip()] if isinstance(error, str) else []
        name = one_line(row["name"], CANDIDATE_NAME_CHARS)
        line = f"candidate {name!r} {row['status']}: {said[0] if said else 'no reason recorded'}"
        lines.append(one_line(line, TERMINAL_WIDTH))
    return lines


def _why_all_failed(csv: Path, since: float = 0.0) -> None:
    """When every candidate of the table at ``csv`` (written at or after ``since``: this run's)
    failed, print why each did: before the decision, in which the measured baseline stands, or
    before a one-line error."""
    from shrinkflow.tasks.errors import ShrinkflowError
    from shrinkflow.tasks.measurement.evaluate import load_table

    try:
        if csv.stat().st_mtime < since:
            return
        table = load_table(csv)
    except (OSError, ShrinkflowError):
        return
    if (table["status"] == "ok").sum() == 1 and len(table) > 1:  # the baseline alone
        typer.echo("\n".join(failure_lines(table)))


@app.command()
def run(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    root: RootOpt = None,
    force: Annotated[
        bool, typer.Option(help="make the winner champion even if the rules say challenger.")
    ] = False,
) -> None:
    """Run the whole Prefect flow and print the candidates table and the promotion.

    Example: shrinkflow run -s shrink.workers=1 -s promote.tolerance=0.5
    """
    from shrinkflow.tasks.errors import ShrinkflowError
    from shrinkflow.tasks.layout import Layout

    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "shrinkflow")
    root, started = project_root(params, root), time.time()
    with _user_errors():
        cfg = load_params(params, tuple(set_ or ()))  # refuse a bad config before Prefect even starts
        check_prefect_home()
        with _project_session(root, "run"):
            from shrinkflow.tasks.store.tracking import Tracker

            Tracker.for_project(root, cfg.tracking.experiment).check()  # before Prefect starts
            _watchers.append(reaper.watch(os.getpid()))  # its pipe closes when this process ends
            from shrinkflow.flows.pipeline import configured

            flow = configured(params, tuple(set_ or ()))
            start_temporary_prefect_server()
            try:
                with _terminated_as_interrupt():
                    flow(str(params), list(set_ or ()), str(root), force)
            except ShrinkflowError:
                progress.stop()
                _why_all_failed(Layout.from_params(cfg, root).candidates_csv, started)
                raise
            finally:
                progress.stop()
            _why_all_failed(Layout.from_params(cfg, root).candidates_csv, started)
    report(params=params, root=root)


@app.command()
def stage(
    name: Annotated[Stage, typer.Argument(help="the stage to run.")],
    candidate: Annotated[
        str | None, typer.Option(help="the candidate to shrink (shrink stage only).")
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    root: RootOpt = None,
    force: Annotated[bool, typer.Option(help="promote stage: make the winner champion regardless.")] = False,
) -> None:
    """Run one stage without Prefect; this is what each dvc.yaml stage calls.

    Example: shrinkflow stage shrink --candidate width-50
    """
    from shrinkflow.tasks.errors import ShrinkflowError
    from shrinkflow.tasks.pipeline import stages

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    root = project_root(params, root)
    with _user_errors(), _terminated_as_interrupt():
        cfg = load_params(params, tuple(set_ or ()))
        if name is Stage.shrink and candidate not in cfg.shrink.candidates:
            known = ", ".join(cfg.shrink.candidates)
            _fail(f"--candidate {candidate!r} is not in shrink.candidates ({known})")
        # A stage of a `shrinkflow run` (or `dvc repro` inside one) inherits the run's lock.
        with _project_session(root, f"stage {name.value}"):
            ctx = stages.Context.load(params, tuple(set_ or ()), root)
            if name is Stage.shrink:
                stages.run_candidate(ctx, candidate)
            elif name is Stage.promote:
                try:
                    stages.run_promote(ctx, force=force)
                except ShrinkflowError:
                    _why_all_failed(ctx.layout.candidates_csv)
                    raise
                _why_all_failed(ctx.layout.candidates_csv)
            else:
                runners = {
                    "prepare": stages.run_prepare,
                    "baseline": stages.run_baseline,
                    "sensitivity": stages.run_sensitivity,
                    "evaluate": stages.run_evaluate,
                }
                runners[name.value](ctx)


@app.command()
def serve(
    cron: Annotated[str, typer.Option(help='cron schedule, e.g. "0 3 * * 0" (Sundays 03:00).')] = "0 3 * * 0",
    name: Annotated[str, typer.Option(help="deployment name.")] = "scheduled-retrain",
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    root: RootOpt = None,
) -> None:
    """Serve the flow as a scheduled Prefect deployment (needs PREFECT_API_URL pointing at a
    running `prefect server start`). Blocks, executing scheduled and manual runs.

    Example: shrinkflow serve --cron "0 3 * * 0"
    """
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "shrinkflow")
    with _user_errors():
        check_prefect_home()
        from shrinkflow.flows.pipeline import configured

        flow = configured(params, tuple(set_ or ()))
    parameters = {
        "params_file": str(params.resolve()),
        "overrides": list(set_ or ()),
        "root": str(project_root(params, root).resolve()),
    }
    flow.serve(name=name, cron=cron, parameters=parameters, tags=["shrinkflow"])


@app.command()
def report(params: ParamsOpt = Path("params.yaml"), root: RootOpt = None) -> None:
    """Re-print the last run's candidates table and promotion decision from reports/."""

    from shrinkflow.tasks.decision.report import decision_lines, format_table, plain_code
    from shrinkflow.tasks.layout import Layout
    from shrinkflow.tasks.measurement.evaluate import load_table
    from shrinkflow.tasks.promotion.promote import load_decision

    with _user_errors():
        layout = Layout.from_params(load_params(params), project_root(params, root))
        if not layout.candidates_csv.exists():
            _fail(f"{layout.candidates_csv} does not exist; run the pipeline first")
        decision = load_decision(layout) if layout.promotion_json.exists() else None
        table = load_table(layout.candidates_csv)
    typer.echo(format_table(table, decision.winner if decision else None, text=str, verdict=decision))
    if failed := failure_lines(table):
        typer.echo("\n".join(failed))
    if decision:
        lines = decision_lines(decision, text=str, code=plain_code)
        typer.echo("\n" + "\n".join(line.replace("**", "") for line in lines if line))


@app.command()
def reproduce(
    name: Annotated[str, typer.Argument(help="registered model name")],
    version: Annotated[str, typer.Argument(help="its version number")],
    root: Annotated[
        Path, typer.Option("--root", help="a directory inside the project's git repository")
    ] = Path("."),
    keep: Annotated[
        bool, typer.Option("--keep", help="keep the temporary worktree with the rebuilt files")
    ] = False,
) -> None:
    """Rebuild a registered version from its commit and DVC data; say whether its checkpoint is
    byte for byte the registered one. Reads the registry, never moves an alias.

    Example: shrinkflow reproduce shrinkflow-digits 3
    """
    from shrinkflow.tasks.promotion.reproduce import reproduce as rebuild

    with _registry_command(root, "reproduce"):
        rebuilt = rebuild(name, version, root, keep)
    typer.echo(rebuilt.line + (f" (kept in {rebuilt.where})" if rebuilt.where else ""))
    if not rebuilt.identical:
        raise typer.Exit(1)


NameArg = Annotated[str, typer.Argument(help="registered model name, e.g. shrinkflow-digits")]
ReasonOpt = Annotated[str, typer.Option("--reason", help="why; recorded on the version")]
ByOpt = Annotated[str | None, typer.Option("--by", help="who decides (default: $USER, else the login)")]


def _reviewing(params: Path, root: Path | None):
    """The config, the registry and today's test images of the project a reviewer works in."""
    from shrinkflow.tasks.layout import Layout
    from shrinkflow.tasks.promotion.promote import ServedTest
    from shrinkflow.tasks.store.tracking import Tracker

    cfg = load_params(params)
    root = project_root(params, root)
    layout = Layout.from_params(cfg, root)
    return cfg, Tracker.for_project(root, cfg.tracking.experiment), ServedTest.load(layout)


@app.command()
def review(
    name: NameArg,
    versus: Annotated[
        str | None,
        typer.Option("--with", help="compare the champion with this version (default: challenger)"),
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
    root: RootOpt = None,
) -> None:
    """List NAME's versions (aliases, verdicts, key figures) and its history of approvals and
    rollbacks, then the champion and the challenger side by side, compared paired on the
    project's current test images. Moves nothing.

    Example: shrinkflow review shrinkflow-digits
    """
    from shrinkflow.tasks.promotion.review import history_lines, registered, side_by_side, versions_table

    with _registry_command(project_root(params, root), "review"):
        cfg, tracker, test = _reviewing(params, root)
        aliases = registered(tracker, name)
        table = versions_table(tracker, name)
        typer.echo(
            f"{name}: {len(table)} versions; " + ", ".join(f"@{a} v{v}" for a, v in sorted(aliases.items()))
        )
        typer.echo(table.to_string(index=False) if len(table) else "(no versions)")
        if events := history_lines(tracker, name):
            typer.echo("\nhistory (every approve and rollback, oldest first):\n" + "\n".join(events))
        champion, other = aliases.get(cfg.promote.alias), versus or aliases.get(cfg.promote.challenger_alias)
        if champion and other and other != champion:
            typer.echo("")
            pair = {"champion": champion, "challenger" if versus is None else "version": other}
            typer.echo("\n".join(side_by_side(tracker, name, pair, test, cfg.promote)))


@app.command()
def approve(
    name: NameArg,
    version: Annotated[str, typer.Argument(help="the version to make champion")],
    reason: ReasonOpt,
    by: ByOpt = None,
    params: ParamsOpt = Path("params.yaml"),
    root: RootOpt = None,
) -> None:
    """Re-validate VERSION on the split it was certified on and make it NAME@champion (completing
    a pending registration), recording who, when, why and the champion it replaced as an event of
    the model's history; refuses in one line, moving nothing, if it does not validate.

    Example: shrinkflow approve shrinkflow-digits 3 --reason "faster on the edge boxes"
    """
    from shrinkflow.tasks.promotion.review import move_champion, revalidate, who

    with _registry_command(project_root(params, root), "approve"):
        cfg, tracker, test = _reviewing(params, root)
        checked = revalidate(tracker, name, version, test, cfg)
        typer.echo(checked.line)
        moved = move_champion(tracker, name, checked, reason, who(by), cfg.promote)
    typer.echo(moved.line)


@app.command()
def rollback(
    name: NameArg,
    reason: ReasonOpt,
    to: Annotated[
        str | None, typer.Option("--to", help="the version to go back to (default: the previous champion)")
    ] = None,
    by: ByOpt = None,
    params: ParamsOpt = Path("params.yaml"),
    root: RootOpt = None,
) -> None:
    """Make NAME@champion the champion before it again (or --to VERSION), re-validated on the
    split it was certified on, recording who, when and why as an event of the model's history;
    refuses in one line, moving nothing, otherwise.

    Example: shrinkflow rollback shrinkflow-digits --reason "v4 misreads 7s in production"
    """
    from shrinkflow.tasks.promotion.review import move_champion, revalidate, rollback_target, who

    with _registry_command(project_root(params, root), "rollback"):
        cfg, tracker, test = _reviewing(params, root)
        target, current = rollback_target(tracker, name, cfg.promote, to)
        checked = revalidate(tracker, name, target, test, cfg)
        typer.echo(checked.line)
        expected = current if to is None else None  # going back from exactly the champion seen
        moved = move_champion(tracker, name, checked, reason, who(by), cfg.promote, "rollback", expected)
    typer.echo(moved.line)


# MLflow retries failed HTTP calls with exponential back-off; its defaults (7 retries, factor 2,
# 120 s timeout) leave a pipeline hanging for many minutes when the server is down. These give
# about half a minute of retrying before a clear failure; the environment still wins.
MLFLOW_RETRY_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


# A pipeline run is a batch job: Prefect's temporary server sends no telemetry (offline, its
# heartbeat also raced the flow for the sqlite database) and MLflow draws no progress bars.
QUIET_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # Prefect's 20 s for its temporary server is too short on a loaded machine (see `run`).
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    # Against a tracking server MLflow prints two "View run/experiment" lines per ended run to
    # stdout (dozens in a pipeline run); the verdict links the parent run instead.
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    # The stages' own log lines go to Prefect's run logs (PREFECT_LOGGING_EXTRA_LOGGERS); one
    # logged outside a run (before the flow starts) stays in the log file without a warning.
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
}


def main() -> None:
    for key, value in {**MLFLOW_RETRY_DEFAULTS, **QUIET_DEFAULTS}.items():
        os.environ.setdefault(key, value)
    app(prog_name="shrinkflow")


if __name__ == "__main__":
    sys.exit(main())
