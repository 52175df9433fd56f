"""Stage 4: measure every model, baseline included, with one function, and write the table.

Every model predicts every validation, gate and test image once; accuracies, macro-F1 and the
paired comparisons with the baseline (the promotion gate, :mod:`shrinkflow.tasks.decision.gate`) all
derive from those predictions, which are kept in ``predictions.csv`` so any two models can be compared on
the same images later (the champion rule does).
"""

from __future__ import annotations

import io
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from shrinkflow.models import build_model, model_spec
from shrinkflow.models.allocation import prunable_groups
from shrinkflow.models.checkpoint import load_checkpoint
from shrinkflow.models.determinism import nondeterminism
from shrinkflow.models.lowrank import low_rank_layers
from shrinkflow.models.quantize import dense_twin
from shrinkflow.models.strategies import STRATEGIES
from shrinkflow.models.strategies.structured import StructuredOptions
from shrinkflow.models.timing import median_latency_ms
from shrinkflow.tasks.config import EvaluateConfig, Params, PromoteConfig
from shrinkflow.tasks.data.prepare import load_split
from shrinkflow.tasks.decision.gate import versus_baseline, worst_class
from shrinkflow.tasks.errors import ShrinkflowError, named_first_line
from shrinkflow.tasks.io import atomic_path, write_json
from shrinkflow.tasks.layout import Layout
from shrinkflow.tasks.measurement.export import check_onnx
from shrinkflow.tasks.records import ModelRecord, load_manifest, load_record
from shrinkflow.tasks.training.engine import Split, accuracy, predict

log = logging.getLogger(__name__)

# The splits every model is measured on. The paired statistics against the baseline are computed
# on the gate (it decides promotion) and on test (it may only veto).
MEASURED_SPLITS = ("val", "gate", "test")
PAIRED_SPLITS = ("gate", "test")
PAIRED_STATS = ("delta", "lower", "upper", "p")
# Validation images every candidate is evaluated on twice (the answers must be identical); the
# baseline stage checked the baseline the same way.
DETERMINISM_IMAGES = 32

# Every column but latency_ms is a function of data, params, seed and code alone, so two runs
# write the same bytes; latency is a measurement of the machine (training time is left to the
# records and MLflow for the same reason).
COLUMNS = [
    "name",
    "strategy",
    "composition",  # the steps, e.g. prune_l1+distill+int8 (Params.composition)
    "ratio",
    "status",
    "val_acc",
    "gate_acc",
    "test_acc",
    "val_f1",
    "test_f1",
    "params",
    "flops",
    "size_bytes",
    "latency_ms",
    "float_latency_ms",
    "ort_latency_ms",
    "onnx",
    "param_ratio",
    *(f"{split}_{stat}" for split in PAIRED_SPLITS for stat in PAIRED_STATS),
    "worst_class",
    "worst_class_drop",
    "epochs",
    "error",
    "sparsity",
    "compressed_bytes",
    "note",
    # channels kept per pruned group and ranks of factorised layers, e.g. "features.0=12 classifier.1=50r8"
    "widths",
]
MACHINE_COLUMNS = ("latency_ms", "float_latency_ms", "ort_latency_ms")


@dataclass(frozen=True)
class Measurement:
    val_acc: float
    gate_acc: float
    test_acc: float
    val_f1: float  # macro-F1, percent
    test_f1: float
    params: int
    flops: int
    size_bytes: int
    latency_ms: float
    # An int8 model's float twin (same shapes, float kernels), timed alike: is int8 faster here?
    float_latency_ms: float | None
    sparsity: float  # fraction of conv/linear weights that are exactly zero
    compressed_bytes: int  # the serialised state dict after zlib: what unstructured zeros save


def count_flops(model: nn.Module, example: Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode  # imports triton: only where FLOPs are counted

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
    """Fraction of conv/linear weights (int8 ones included: plain int8 tensors) that are exactly
    zero."""
    zeros = total = 0
    for key, value in model.state_dict().items():
        if not isinstance(value, Tensor) or "weight" not in key or value.dim() < 2:
            continue
        zeros, total = zeros + int((value == 0).sum()), total + value.numel()
    return round(zeros / max(total, 1), 4)


def latency_ms(model: nn.Module, example: Tensor, cfg: EvaluateConfig) -> float:
    """Median single-thread CPU latency of one forward pass, after warm-up."""
    return median_latency_ms(model, example, cfg.latency_warmup, cfg.latency_repeats)


def measure(model: nn.Module, splits: dict[str, Split], cfg: EvaluateConfig) -> tuple[Measurement, dict]:
    """Everything the promotion rule and a reviewer need to know about one model, and its
    predicted class for every image of ``splits`` (val, gate and test)."""
    model.eval()
    example = splits["test"][0][:1]
    dense = dense_twin(model)  # the counters do not see int8 kernels; count its float twin
    predicted = {split: predict(model, x) for split, (x, _) in splits.items()}
    measurement = Measurement(
        **{f"{s}_acc": accuracy(predicted[s], splits[s][1]) for s in MEASURED_SPLITS},
        **{f"{s}_f1": macro_f1(predicted[s], splits[s][1]) for s in ("val", "test")},
        params=sum(p.numel() for p in dense.parameters()),
        flops=count_flops(dense, example),
        size_bytes=serialized_size(model),
        latency_ms=latency_ms(model, example, cfg),
        float_latency_ms=latency_ms(dense, example, cfg) if dense is not model else None,
        sparsity=weight_sparsity(model),
        compressed_bytes=compressed_size(model),
    )
    return measurement, {split: p.numpy() for split, p in predicted.items()}


def macro_f1(predictions: Tensor, targets: Tensor) -> float:
    """Macro-averaged F1 in percent: every class counts the same, however many images it has."""
    from sklearn.metrics import f1_score  # seconds to import: only in the stages that score models

    return round(100 * float(f1_score(targets.numpy(), predictions.numpy(), average="macro")), 4)


def _note(steps: list[str]) -> str:
    notes = [STRATEGIES[s].note for s in steps if s in STRATEGIES and STRATEGIES[s].note]
    return "; ".join(notes)


def _row(
    record: ModelRecord, layout: Layout, splits: dict[str, Split], params: Params
) -> tuple[dict, dict[str, np.ndarray]]:
    cfg = params.evaluate
    row = {
        "name": record.name,
        "strategy": record.strategy,
        "composition": params.composition(record.name),
        "ratio": record.options.get("ratio") or 0.0,  # none: int8, lowrank by energy or ranks
        "status": record.status,
        "epochs": record.epochs,
        "error": record.error or "",
        "note": _note(record.steps),
    }
    if record.status != "ok":
        return row, {}
    model, _ = load_checkpoint(layout.root / record.checkpoint, sha256=record.sha256)
    if record.name != "baseline" and (reason := nondeterminism(model, splits["val"][0][:DETERMINISM_IMAGES])):
        # A candidate that answers the same images differently each time would pass the gate on
        # one evaluation and serve other answers: it fails here, before anything registers it.
        log.warning("%s fails: it answers the same images differently between calls: %s", record.name, reason)
        return row | {"status": "failed", "error": f"answers change between calls: {reason}"}, {}
    measurement, predicted = measure(model, splits, cfg)
    onnx = onnx_columns(model, splits["test"], cfg, layout.onnx(record.name))
    return row | vars(measurement) | onnx | {
        "widths": widths_text(record, model, splits["test"][0][:1])
    }, predicted


def widths_text(record: ModelRecord, model: nn.Module, example: Tensor) -> str:
    """A pruned or factorised candidate's shape, ``name=...`` apart by spaces: a structured
    pruner's kept channels per prunable group (``features.0=12``; the recorded allocation's, else
    read off the model) and each factorised layer's rank (``r64``; ``r12x24`` for a convolution's
    input and output ranks), after the width where the layer roots a group
    (``classifier.1=500r64``), else alone (``classifier.3=r16``); empty for any other model."""
    dense = dense_twin(model)
    ranks = {name: "r" + "x".join(map(str, m.ranks)) for name, m in low_rank_layers(dense).items()}
    structured = [
        s for s in record.steps if s in STRATEGIES and issubclass(STRATEGIES[s].options, StructuredOptions)
    ]
    widths = {}
    if structured:
        try:
            widths = record.options.get("widths") or prunable_groups(_whole(dense), example)
        except Exception as exc:  # a summary column: torch-pruning failing here must not fail the row
            log.warning("%s: no widths column (torch-pruning: %s)", record.name, named_first_line(exc))
    tokens = [f"{group}={kept}{ranks.pop(group, '')}" for group, kept in widths.items()]
    return " ".join([*tokens, *(f"{name}={rank}" for name, rank in ranks.items())])


def _whole(model: nn.Module) -> nn.Module:
    """``model`` with its factorised layers whole again (untrained, the shapes of its pruning):
    what the pruned widths are read off."""
    if not low_rank_layers(model):
        return model
    return build_model({k: v for k, v in model_spec(model).items() if k != "factorised"})


def onnx_columns(model: nn.Module, test: Split, cfg: EvaluateConfig, keep: Path | None = None) -> dict:
    """Whether the model exports to ONNX that onnxruntime runs like PyTorch, and how fast; the
    checked export is kept at ``keep``."""
    check = check_onnx(model, test[0], cfg.latency_warmup, cfg.latency_repeats, keep)
    return {"onnx": check.status, "ort_latency_ms": check.ort_latency_ms}


class TableError(ShrinkflowError, ValueError):
    """``candidates.csv`` is not a whole table as :func:`write_table` wrote it."""


# A cell a spreadsheet would run as a formula starts with one of these (OWASP's CSV injection
# list); such text, and text already starting with the quote, is written with one more quote in
# front, which spreadsheets show as text and :func:`load_table` takes off again.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")


def write_table(path: Path, table: pd.DataFrame) -> None:
    """Write ``candidates.csv`` atomically; class names and errors stay text in a spreadsheet."""
    text = table.select_dtypes(include=["object", "str"]).columns
    safe = table.assign(**{col: table[col].map(_quoted) for col in text})
    with atomic_path(path) as tmp:
        safe.to_csv(tmp, index=False, float_format="%.4f")


def _quoted(value: object) -> object:
    return f"'{value}" if isinstance(value, str) and value.startswith(_FORMULA_START) else value


def load_table(path: str | Path) -> pd.DataFrame:
    """Read ``candidates.csv`` back as :func:`write_table` wrote it; only empty cells are missing
    (a candidate may be named "nan"). A truncated or damaged file is refused in one line."""
    path = Path(path)
    fix = "run `shrinkflow stage evaluate` to write it again"
    try:
        raw = path.read_bytes()
        table = pd.read_csv(io.BytesIO(raw), keep_default_na=False, na_values=[""])
    except (OSError, ValueError) as exc:
        raise TableError(f"{path} cannot be read ({named_first_line(exc)}); {fix}") from None
    if problem := _damage(table, raw):
        raise TableError(f"{path} is truncated or damaged ({problem}); {fix}")
    for col in table.select_dtypes(include=["object", "str"]).columns:
        table[col] = table[col].map(_unquoted)
    return table


def _damage(table: pd.DataFrame, raw: bytes) -> str:
    """What shows that ``table`` is not whole (pandas reads a cut file without complaint)."""
    if missing := [col for col in ("name", "status", *SUMMARY) if col not in table.columns]:
        return f"no column {', '.join(missing)}"
    if table.empty or table["name"].iloc[0] != "baseline":
        return "no baseline row"
    if not raw.endswith(b"\n"):
        return "its last line is cut short"
    if table.loc[table["status"] == "ok", list(SUMMARY)].isna().any(axis=None):
        return "a measured model lacks its figures"
    return ""


def _unquoted(value: object) -> object:
    return (
        value[1:]
        if isinstance(value, str) and value[:1] == "'" and value[1:].startswith(_FORMULA_START)
        else value
    )


def evaluate_models(params: Params, layout: Layout) -> pd.DataFrame:
    """Measure the baseline and every declared candidate; write ``candidates.csv``, every model's
    predictions (``predictions.csv``) and ``metrics.json``. A candidate whose training failed, or
    that answers the same images differently between calls, keeps its row with ``status=failed``
    and the reason. A factory model's package must be importable (the stage runs inside
    :func:`shrinkflow.tasks.training.given.user_code`)."""
    splits = {split: load_split(layout, split) for split in MEASURED_SPLITS}
    names = ["baseline", *params.shrink.candidates]
    records = [_record(params, layout, name) for name in names]
    rows, predictions = [], {}
    for record in records:
        row, predicted = _row(record, layout, splits, params)
        rows.append(row)
        if predicted:
            predictions[record.name] = predicted
    write_curves(layout.curves, records)
    table = pd.DataFrame(rows).reindex(columns=COLUMNS)
    base = table.iloc[0]
    table["param_ratio"] = (base["params"] / table["params"]).round(3)
    labels = {split: y.numpy() for split, (_, y) in splits.items()}
    compare_with_baseline(table, predictions, labels, params.promote, load_manifest(layout).classes)
    write_table(layout.candidates_csv, table)
    write_predictions(layout.predictions_csv, predictions, labels)
    write_json(layout.metrics_json, metrics_summary(table, load_manifest(layout).fingerprint))
    return table


def compare_with_baseline(
    table: pd.DataFrame,
    predictions: dict[str, dict],
    labels: dict[str, np.ndarray],
    cfg: PromoteConfig,
    classes: list[str],
) -> None:
    """Fill each measured model's paired comparison with the baseline on gate and test, and the
    class it loses most on (gate). Whether that makes it eligible is for
    :func:`shrinkflow.tasks.decision.decide.decide` to say."""
    if "baseline" not in predictions:
        return
    table["worst_class"] = table["worst_class"].astype(object)
    base = predictions["baseline"]
    for i, name in enumerate(table["name"]):
        if name not in predictions:
            continue
        for split in PAIRED_SPLITS:
            c = versus_baseline(predictions[name][split], base[split], labels[split], cfg)
            for stat, value in zip(PAIRED_STATS, (c.delta, c.lower, c.upper, c.p_value), strict=True):
                table.loc[i, f"{split}_{stat}"] = value
        worst, drop = worst_class(predictions[name]["gate"], base["gate"], labels["gate"], len(classes))
        table.loc[i, ["worst_class", "worst_class_drop"]] = [classes[worst], round(drop, 4)]


def write_predictions(path: Path, predictions: dict[str, dict], labels: dict[str, np.ndarray]) -> None:
    """One row per val/gate/test image: its split, index, label and each model's predicted class
    (a model that did not train has no column). Small: one integer per image per model."""
    frames = []
    for split in MEASURED_SPLITS:
        frame = pd.DataFrame({"split": split, "index": np.arange(len(labels[split])), "label": labels[split]})
        for name, predicted in predictions.items():
            frame[name] = predicted[split]
        frames.append(frame)
    with atomic_path(path) as tmp:
        pd.concat(frames, ignore_index=True).to_csv(tmp, index=False)


def load_predictions(path: str | Path) -> dict[str, pd.DataFrame]:
    """``predictions.csv`` by split: ``label`` and one predicted-class column per model."""
    frame = pd.read_csv(path, dtype={"split": str})
    return {
        split: rows.drop(columns=["split", "index"]).reset_index(drop=True)
        for split, rows in frame.groupby("split", sort=False)
    }


def _record(params: Params, layout: Layout, name: str) -> ModelRecord:
    try:
        return load_record(layout, name)
    except FileNotFoundError:
        return ModelRecord(name=name, strategy=_strategy(params, name), options={}, status="missing")


CURVE_HEADER = "epoch,train_loss,val_acc,lr"


def write_curves(directory: Path, records: list[ModelRecord]) -> None:
    """Each trained model's per-epoch history as ``<name>.csv``; models that did not train, and
    models no longer declared, leave no file behind. Only curve files this function wrote are
    ever deleted: anything else in the directory is the user's."""
    directory.mkdir(parents=True, exist_ok=True)
    keep = {f"{record.name}.csv" for record in records if record.history}
    for stale in directory.glob("*.csv"):
        if stale.name not in keep and stale.is_file() and not stale.is_symlink() and _is_curve(stale):
            stale.unlink()
    for record in records:
        if record.history:
            with atomic_path(directory / f"{record.name}.csv") as tmp:
                pd.DataFrame(record.history).to_csv(tmp, index=False)


def _is_curve(path: Path) -> bool:
    with path.open(errors="replace") as f:
        return f.readline().strip() == CURVE_HEADER


def _strategy(params: Params, name: str) -> str:
    return "baseline" if name == "baseline" else params.shrink.candidates[name].strategy


SUMMARY = ("val_acc", "gate_acc", "test_acc", "test_f1", "params", "flops")


def metrics_summary(table: pd.DataFrame, fingerprint: str) -> dict:
    base = table.iloc[0]
    ok = table[table["status"] == "ok"]
    return {
        "data_fingerprint": fingerprint,
        "baseline": {k: _plain(base[k]) for k in SUMMARY},
        "candidates": {
            "declared": len(table) - 1,
            "ok": len(ok) - 1,
            "failed": int((table["status"] != "ok").sum()),
        },
    }


def _plain(value):
    return round(float(value), 4) if isinstance(value, float) else int(value)
