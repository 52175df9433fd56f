"""Stage 4: measure every model, baseline included, with one function, and write the table."""

from __future__ import annotations

import io
import logging
import shutil
import statistics
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from sklearn.metrics import f1_score
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from models.checkpoint import load_checkpoint
from models.quantize import dense_twin
from models.strategies import STRATEGY_INFO
from tasks.config import EvaluateConfig, Params
from tasks.engine import Split, evaluate, predict
from tasks.export import check_onnx
from tasks.io import atomic_path, write_json
from tasks.layout import Layout
from tasks.prepare import load_manifest, load_split
from tasks.train import ModelRecord, load_record

log = logging.getLogger(__name__)

# Every column but latency_ms is a function of data, params, seed and code alone, so two runs
# write the same bytes; latency is a measurement of the machine (training time is left to the
# records and MLflow for the same reason).
COLUMNS = [
    "name", "strategy", "ratio", "status", "val_acc", "test_acc", "macro_f1", "params", "flops",
    "size_bytes", "latency_ms", "ort_latency_ms", "onnx", "param_ratio", "acc_drop", "epochs", "error",
    "sparsity", "compressed_bytes", "steps", "note",
]  # fmt: skip
MACHINE_COLUMNS = ("latency_ms", "ort_latency_ms")


@dataclass(frozen=True)
class Measurement:
    val_acc: float
    test_acc: float
    macro_f1: float
    params: int
    flops: int
    size_bytes: int
    latency_ms: float
    sparsity: float  # fraction of conv/linear weights that are exactly zero
    compressed_bytes: int  # the serialised state dict after zlib: what unstructured zeros save


def count_flops(model: nn.Module, example: Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(example)
    return int(counter.get_total_flops())


def _serialized(model: nn.Module) -> memoryview:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer()


def serialized_size(model: nn.Module) -> int:
    return _serialized(model).nbytes


def compressed_size(model: nn.Module) -> int:
    """Bytes of the serialised state dict after zlib; zeroed weights compress, dense ones barely."""
    return len(zlib.compress(_serialized(model), 6))


def weight_sparsity(model: nn.Module) -> float:
    """Fraction of conv/linear weights (int8 ones included) that are exactly zero."""
    zeros = total = 0
    for key, value in model.state_dict().items():
        if isinstance(value, tuple):  # quantised linears keep (weight, bias) packed
            key, value = "weight", value[0]
        if not isinstance(value, Tensor) or "weight" not in key or value.dim() < 2:
            continue
        values = value.int_repr() if value.is_quantized else value
        zeros, total = zeros + int((values == 0).sum()), total + values.numel()
    return round(zeros / max(total, 1), 4)


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
    dense = dense_twin(model)  # the counters do not see int8 kernels; count its float twin
    return Measurement(
        val_acc=evaluate(model, val),
        test_acc=evaluate(model, test),
        macro_f1=float(f1_score(test[1].numpy(), predict(model, test[0]).numpy(), average="macro")) * 100,
        params=sum(p.numel() for p in dense.parameters()),
        flops=count_flops(dense, example),
        size_bytes=serialized_size(model),
        latency_ms=latency_ms(model, example, cfg),
        sparsity=weight_sparsity(model),
        compressed_bytes=compressed_size(model),
    )


def _note(steps: list[str]) -> str:
    notes = [STRATEGY_INFO[s].note for s in steps if s in STRATEGY_INFO and STRATEGY_INFO[s].note]
    return "; ".join(notes)


def _row(record: ModelRecord, layout: Layout, val: Split, test: Split, cfg: EvaluateConfig) -> dict:
    row = {
        "name": record.name,
        "strategy": record.strategy,
        "ratio": record.options.get("ratio", 0.0),
        "status": record.status,
        "epochs": record.epochs,
        "error": record.error or "",
        "steps": ">".join(record.steps),
        "note": _note(record.steps),
    }
    if record.status == "ok":
        model, _ = load_checkpoint(layout.root / record.checkpoint, sha256=record.sha256)
        row |= vars(measure(model, val, test, cfg))
        row |= onnx_columns(model, test, cfg)
    return row


def onnx_columns(model: nn.Module, test: Split, cfg: EvaluateConfig) -> dict:
    """Whether the model exports to ONNX that onnxruntime runs like PyTorch, and how fast."""
    check = check_onnx(model, test[0], cfg.latency_warmup, cfg.latency_repeats)
    return {"onnx": check.status, "ort_latency_ms": check.ort_latency_ms}


def load_table(path: str | Path) -> pd.DataFrame:
    """Read ``candidates.csv`` back; only empty cells are missing (a candidate may be named "nan")."""
    return pd.read_csv(path, keep_default_na=False, na_values=[""])


def evaluate_models(params: Params, layout: Layout) -> pd.DataFrame:
    """Measure the baseline and every declared candidate; write ``candidates.csv`` and
    ``metrics.json``. A candidate whose training failed keeps its row with ``status=failed``."""
    val, test = load_split(layout, "val"), load_split(layout, "test")
    names = ["baseline", *params.shrink.candidates]
    records = [_record(params, layout, name) for name in names]
    rows = [_row(record, layout, val, test, params.evaluate) for record in records]
    write_curves(layout.curves, records)
    table = pd.DataFrame(rows).reindex(columns=COLUMNS)
    base = table.iloc[0]
    table["param_ratio"] = (base["params"] / table["params"]).round(3)
    table["acc_drop"] = (base["test_acc"] - table["test_acc"]).round(3)
    with atomic_path(layout.candidates_csv) as tmp:
        table.to_csv(tmp, index=False, float_format="%.4f")
    write_json(layout.metrics_json, metrics_summary(table, load_manifest(layout).fingerprint))
    return table


def _record(params: Params, layout: Layout, name: str) -> ModelRecord:
    try:
        return load_record(layout, name)
    except FileNotFoundError:
        return ModelRecord(name=name, strategy=_strategy(params, name), options={}, status="missing")


def write_curves(directory: Path, records: list[ModelRecord]) -> None:
    """Each trained model's per-epoch history as ``<name>.csv``; models that did not train, and
    models no longer declared, leave no file behind."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    for record in records:
        if record.history:
            with atomic_path(directory / f"{record.name}.csv") as tmp:
                pd.DataFrame(record.history).to_csv(tmp, index=False)


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
