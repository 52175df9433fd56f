"""What people look at: the Pareto PNG, the Markdown report, the CLI's help and `report`."""

from __future__ import annotations

import csv
import dataclasses
import json
import re

import pytest
from PIL import Image
from typer.testing import CliRunner

from shrinkflow.flows.cli import app
from shrinkflow.tasks.decision.decide import ClassAccuracy, Registered, decide
from shrinkflow.tasks.decision.report import (
    TERMINAL_WIDTH,
    decision_lines,
    format_table,
    full_table,
    links_section,
    markdown_report,
    pareto_plot,
    plain_code,
)
from shrinkflow.tasks.escape import markdown_text
from shrinkflow.tasks.measurement.evaluate import load_predictions, load_table, write_table
from tests.conftest import copy_project


def test_pareto_plot_is_a_png_showing_exactly_the_table(evaluated, tmp_path):
    params, layout = copy_project(evaluated, tmp_path, "promote.tolerance=50")
    table = load_table(layout.candidates_csv)
    decision = decide(table, load_predictions(layout.predictions_csv), params.promote)
    path = pareto_plot(table, decision, tmp_path / "pareto.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 800
        points = json.loads(image.info["Description"])
    ok = table[table["status"] == "ok"]
    assert [p["name"] for p in points] == list(ok["name"])
    assert [p["test_acc"] for p in points] == list(ok["test_acc"])
    assert [p["params"] for p in points] == list(ok["params"])


def test_markdown_report_names_the_winner_and_reason(evaluated, tmp_path):
    params, layout = copy_project(evaluated, tmp_path)
    table = load_table(layout.candidates_csv)
    decision = decide(table, load_predictions(layout.predictions_csv), params.promote)
    text = markdown_report(table, decision)
    assert decision.certified_by in text and "order tested" in text
    assert f"`{decision.winner}`" in text and markdown_text(decision.reason) in text
    star_rows = [line for line in full_table(table, decision.winner).splitlines() if line.startswith("| *")]
    assert len(star_rows) == 1 and decision.winner in star_rows[0]
    assert "| composition " in text and "| prune_l1 " in text


def test_the_console_table_and_summary_fit_a_terminal(evaluated, tmp_path):
    params, layout = copy_project(evaluated, tmp_path, "promote.tolerance=50")
    table = load_table(layout.candidates_csv)
    long = {"l1-50": "l1-50-" + "x" * 60}  # a user's long name, and a long composition
    table["name"] = table["name"].replace(long)
    table.loc[table["name"] == long["l1-50"], "composition"] = "+".join(["prune_l1", "distill", "int8"] * 5)
    predictions = {s: f.rename(columns=long) for s, f in load_predictions(layout.predictions_csv).items()}
    decision = decide(table, predictions, params.promote)
    console = format_table(table, decision.winner, text=str, verdict=decision)
    # As `shrinkflow report` prints them, without the bold markers.
    lines = [line.replace("**", "") for line in decision_lines(decision, text=str, code=plain_code)]
    printed = [*console.splitlines(), *"\n".join(lines).splitlines()]
    assert max(len(line) for line in printed) <= TERMINAL_WIDTH, "\n".join(printed)
    header = console.splitlines()[0].split()
    assert header == [
        "name",
        "composition",
        "size",
        "latency",
        "gate_delta",
        "gate_bound",
        "eligible",
        "test_delta",
    ]
    rows = {line.split()[0].lstrip("*"): line for line in console.splitlines()[2:]}
    assert "l1-50-xxxxxxxxxxx…" in console and "prune_l1+distill+int8+p…" in console
    base = table.set_index("name").loc["baseline"]
    w50 = table.set_index("name").loc["w50"]
    assert (
        f"{w50['params'] / base['params']:.2f}x" in rows["w50"] and f"{w50['gate_delta']:+.2f}" in rows["w50"]
    )
    assert rows["baseline"].split()[1:4] == ["baseline", "1.00x", "1.00x"]
    # The full table, with every column, is report.md's.
    assert " ort_latency_ms |" in markdown_report(table, decision) and "ort_latency_ms" not in console


def test_the_report_links_to_mlflow_and_prefect():
    served = links_section(
        "http://mlflow:5000/",
        "3",
        "abc",
        Registered("shrinkflow digits", "7", "champion"),
        "shrink-basenet-digits-20261130-2350",
        "http://prefect:4300/flow-runs/flow-run/f1",
    )
    text = "\n".join(served)
    assert "[abc](http://mlflow:5000/#/experiments/3/runs/abc)" in text
    assert (
        "[shrinkflow digits v7](http://mlflow:5000/#/models/shrinkflow%20digits/versions/7) `@champion`"
        in text
    )
    assert "[shrink-basenet-digits-20261130-2350](http://prefect:4300/flow-runs/flow-run/f1)" in text
    local = "\n".join(links_section("sqlite:////p/mlflow.db", "1", "abc", None))
    assert "http://127.0.0.1:5000/#/experiments/1/runs/abc" in local
    assert "`mlflow ui --backend-store-uri sqlite:////p/mlflow.db`" in local and "nothing registered" in local


@pytest.mark.parametrize("command", [[], ["run"], ["stage"], ["serve"], ["report"]])
def test_every_command_explains_itself(command):
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0
    assert "Usage:" in result.output
    if command:
        assert "Example" in result.output or command == ["report"]


def test_report_reprints_the_last_table(evaluated, tmp_path):
    params, layout = copy_project(evaluated, tmp_path)
    result = CliRunner().invoke(app, ["report", "-p", str(tmp_path / "params.yaml"), "--root", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert format_table(load_table(layout.candidates_csv)) in result.output


def test_report_without_a_run_says_so(tmp_path, evaluated):
    copy_project(evaluated, tmp_path)
    (tmp_path / "reports" / "candidates.csv").unlink()
    result = CliRunner().invoke(app, ["report", "-p", str(tmp_path / "params.yaml"), "--root", str(tmp_path)])
    assert result.exit_code != 0 and "run the pipeline first" in result.stderr


def _cells(line: str) -> int:
    return len(re.split(r"(?<!\\)\|", line))


def test_untrusted_names_stay_text_in_the_markdown_report(evaluated, tmp_path):
    params, layout = copy_project(evaluated, tmp_path)
    table = load_table(layout.candidates_csv)
    hostile = "|`\n<img src=x onerror=alert(1)>"
    candidates = table["name"] != "baseline"
    table.loc[candidates, "name"] = table.loc[candidates, "name"] + hostile
    predictions = load_predictions(layout.predictions_csv)
    predictions = {
        split: frame.rename(columns=lambda c: c if c in ("label", "baseline") else c + hostile)
        for split, frame in predictions.items()
    }
    decision = decide(table, predictions, params.promote.model_copy(update={"tolerance": 50.0}))
    decision = dataclasses.replace(
        decision,
        per_class=(
            ClassAccuracy("cat|dog\n<b>x</b>", 90.0, 80.0, -10.0),
            ClassAccuracy("plain", 90.0, 90.0, 0.0),
        ),
    )
    text = markdown_report(table, decision)
    outside_code = re.sub(r"`[^`\n]*`", "", text)  # code spans show their content literally
    assert "<img" not in outside_code and "<b>" not in outside_code and "&lt;img" in outside_code
    for block in text.split("\n\n"):
        rows = [line for line in block.splitlines() if line.startswith("|")]
        assert len({_cells(line) for line in rows}) <= 1, f"a name broke a table:\n{block}"
    assert decision.winner.endswith(hostile)
    assert f"`{decision.winner.removesuffix(hostile)}\\|' <img" in text
    # The terminal keeps names as they are.
    assert decision.winner.splitlines()[0] in format_table(table, decision.winner, text=str)


def test_a_class_name_is_never_a_spreadsheet_formula(evaluated, tmp_path):
    _, layout = copy_project(evaluated, tmp_path)
    table = load_table(layout.candidates_csv)
    names = ['=HYPERLINK("http://x","y")', "+1", "-2", "@SUM(A1)", "'=quoted", "cat"]
    table["worst_class"] = (names * len(table))[: len(table)]
    write_table(layout.candidates_csv, table)
    cells = [row[table.columns.get_loc("worst_class")] for row in csv.reader(layout.candidates_csv.open())]
    assert not [cell for cell in cells[1:] if cell.startswith(("=", "+", "-", "@"))], cells
    assert load_table(layout.candidates_csv)["worst_class"].tolist() == table["worst_class"].tolist()


@pytest.mark.parametrize(
    "cut",
    [lambda text: text.splitlines()[0] + "\n", lambda text: text[: len(text) - 7], lambda text: ""],
    ids=["header only", "last line cut", "empty"],
)
def test_a_truncated_table_is_refused_in_one_line(evaluated, tmp_path, cut):
    copy_project(evaluated, tmp_path)
    path = tmp_path / "reports" / "candidates.csv"
    path.write_text(cut(path.read_text()))
    result = CliRunner().invoke(app, ["report", "-p", str(tmp_path / "params.yaml"), "--root", str(tmp_path)])
    assert result.exit_code == 1, result.output
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "candidates.csv" in result.stderr and "shrinkflow stage evaluate" in result.stderr
