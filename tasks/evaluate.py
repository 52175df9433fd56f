"""Stage 4: measure every model, baseline included, with one function, and write the table."""

from __future__ import annotations

import io
import logging
import statistics
import time
from dataclasses import dataclass

import pandas as pd
import torch
from sklearn.metrics import f1_score
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from models.checkpoint import load_checkpoint
from tasks.config import EvaluateConfig, Params
from tasks.engine import Split, evaluate, predict
from tasks.io import atomic_path, write_json
from tasks.layout import Layout
from tasks.prepare import load_manifest, load_split
from tasks.train import ModelRecord, load_record

log = logging.getLogger(__name__)

COLUMNS = [
    "name", "strategy", "ratio", "status", "val_acc", "test_acc", "macro_f1", "params", "flops",
    "size_bytes", "latency_ms", "param_ratio", "acc_drop", "epochs", "train_seconds", "error",
]  # fmt: skip


@dataclass(frozen=True)
class Measurement:
    val_acc: float
    test_acc: float
    macro_f1: float
    params: int
    flops: int
    size_bytes: int
    latency_ms: float


def count_flops(model: nn.Module, example: Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(example)
    return int(counter.get_total_flops())


def serialized_size(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


@torch.inference_mode()
def latency_ms(model: nn.Module, example: Tensor, cfg: EvaluateConfig) -> float:
    """Median single-thread CPU latency of one forward pass, after warm-up."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(cfg.latency_warmup):
            model(example)
        times = []
        for _ in range(cfg.latency_repeats):
            start = time.perf_counter()
            model(example)
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times) * 1000


def measure(model: nn.Module, val: Split, test: Split, cfg: EvaluateConfig) -> Measurement:
    """Everything the promotion rule and a reviewer need to know about one model."""
    model.eval()
    example = test[0][:1]
    return Measurement(
        val_acc=evaluate(model, val),
        test_acc=evaluate(model, test),
        macro_f1=float(f1_score(test[1].numpy(), predict(model, test[0]).numpy(), average="macro")) * 100,
        params=sum(p.numel() for p in model.parameters()),
        flops=count_flops(model, example),
        size_bytes=serialized_size(model),
        latency_ms=latency_ms(model, example, cfg),
    )


def _row(record: ModelRecord, layout: Layout, val: Split, test: Split, cfg: EvaluateConfig) -> dict:
    row = {
        "name": record.name,
        "strategy": record.strategy,
        "ratio": record.options.get("ratio", 0.0),
        "status": record.status,
        "epochs": record.epochs,
        "train_seconds": round(record.train_seconds, 3),
        "error": record.error or "",
    }
    if record.status == "ok":
        model, _ = load_checkpoint(layout.root / record.checkpoint, sha256=record.sha256)
        row |= vars(measure(model, val, test, cfg))
    return row


def evaluate_models(params: Params, layout: Layout) -> pd.DataFrame:
    """Measure the baseline and every declared candidate; write ``candidates.csv`` and
    ``metrics.json``. A candidate whose training failed keeps its row with ``status=failed``."""
    val, test = load_split(layout, "val"), load_split(layout, "test")
    names = ["baseline", *params.shrink.candidates]
    rows = []
    for name in names:
        try:
            record = load_record(layout, name)
        except FileNotFoundError:
            record = ModelRecord(name=name, strategy=_strategy(params, name), options={}, status="missing")
        rows.append(_row(record, layout, val, test, params.evaluate))
    table = pd.DataFrame(rows).reindex(columns=COLUMNS)
    base = table.iloc[0]
    table["param_ratio"] = (base["params"] / table["params"]).round(3)
    table["acc_drop"] = (base["test_acc"] - table["test_acc"]).round(3)
    with atomic_path(layout.candidates_csv) as tmp:
        table.to_csv(tmp, index=False, float_format="%.4f")
    write_json(layout.metrics_json, metrics_summary(table, load_manifest(layout).fingerprint))
    return table


def _strategy(params: Params, name: str) -> str:
    return "baseline" if name == "baseline" else params.shrink.candidates[name].strategy


def metrics_summary(table: pd.DataFrame, fingerprint: str) -> dict:
    base = table.iloc[0]
    ok = table[table["status"] == "ok"]
    return {
        "data_fingerprint": fingerprint,
        "baseline": {k: _plain(base[k]) for k in ("val_acc", "test_acc", "macro_f1", "params", "flops")},
        "candidates": {
            "declared": len(table) - 1,
            "ok": len(ok) - 1,
            "failed": int((table["status"] != "ok").sum()),
        },
    }


def _plain(value):
    return round(float(value), 4) if isinstance(value, float) else int(value)
