"""Human-readable views of the stage outputs (the candidates table and the decision)."""

from __future__ import annotations

import pandas as pd

SHOWN = ["name", "strategy", "ratio", "status", "val_acc", "test_acc", "params", "flops", "size_bytes",
         "latency_ms", "param_ratio", "acc_drop"]  # fmt: skip


def format_table(table: pd.DataFrame, winner: str | None = None) -> str:
    """The candidates table as Markdown, the promoted row marked with a star."""
    shown = table.reindex(columns=SHOWN).copy()
    shown.insert(0, " ", ["*" if name == winner else "" for name in shown["name"]])
    return shown.to_markdown(index=False, floatfmt=".3f")
