"""TensorBoard event files from what the pipeline already records: each model's per-epoch history
(``ModelRecord.history``) as scalars, and one hparams summary of every measured model.

Written at the stage edge from the records and the candidates table, never from inside the
training loop, so a model reused from the cache appears as well as a freshly trained one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
from torch.utils.tensorboard import SummaryWriter

from shrinkflow.tasks.records import ModelRecord

# history key -> TensorBoard tag
SCALARS = {"train_loss": "train/loss", "val_acc": "val/acc", "lr": "train/lr"}
HPARAMS = ("strategy", "composition", "ratio")
METRICS = ("val_acc", "test_acc", "params", "latency_ms")
HPARAMS_RUN = "hparams"


def write_runs(directory: Path, records: list[ModelRecord], table: pd.DataFrame) -> None:
    """``<directory>/<model>/``: each trained model's curves; ``<directory>/hparams/<model>/``:
    strategy, composition (e.g. ``prune_l1+distill+int8``) and ratio against accuracy, params and
    latency for every measured model. What an
    earlier run wrote there is replaced, so each model has one curve."""
    for record in records:
        shutil.rmtree(directory / record.name, ignore_errors=True)
        if record.history:
            write_history(directory / record.name, record.history)
    shutil.rmtree(directory / HPARAMS_RUN, ignore_errors=True)
    write_hparams(directory / HPARAMS_RUN, table)


def write_history(directory: Path, history: list[dict[str, float]]) -> None:
    with SummaryWriter(log_dir=str(directory)) as writer:
        for row in history:
            for key, tag in SCALARS.items():
                writer.add_scalar(tag, float(row[key]), global_step=int(row["epoch"]))


def write_hparams(directory: Path, table: pd.DataFrame) -> None:
    ok = table[table["status"] == "ok"]
    discrete = {key: sorted(ok[key].astype(str).unique().tolist()) for key in ("strategy", "composition")}
    with SummaryWriter(log_dir=str(directory)) as writer:
        for row in ok.to_dict("records"):
            writer.add_hparams(
                {key: float(row[key]) if key == "ratio" else str(row[key]) for key in HPARAMS},
                {f"hparam/{key}": float(row[key]) for key in METRICS},
                hparam_domain_discrete=discrete,
                run_name=str(row["name"]),
            )
