"""ONNX for deployment: export a model with ``torch.onnx``, check onnxruntime reproduces PyTorch's
outputs, and time onnxruntime the way ``tasks/measurement/evaluate.py`` times PyTorch (batch 1, one
thread)."""

from __future__ import annotations

import functools
import logging
import math
import re
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor, nn

from shrinkflow.models.quantize import is_int8
from shrinkflow.tasks.io import atomic_path

log = logging.getLogger(__name__)

# onnxruntime fuses and reorders float32 arithmetic, so logits agree to rounding, not bit for bit.
PARITY_RTOL = 1e-3
PARITY_ATOL = 1e-4
PARITY_IMAGES = 256  # test images compared per model
INPUT, OUTPUT = "images", "logits"


class ExportError(RuntimeError):
    """A model that torch.onnx cannot export, or whose ONNX graph disagrees with PyTorch."""


@dataclass(frozen=True)
class OnnxCheck:
    status: str  # "ok", or why the model has no usable ONNX graph
    ort_latency_ms: float  # nan without one
    max_abs_diff: float  # largest |onnxruntime - PyTorch| logit on the compared test images


def export_onnx(model: nn.Module, example: Tensor, path: Path) -> Path:
    """Write ``model`` as a self-contained ONNX file with a dynamic batch dimension (``example``
    needs at least two images: torch.export specialises a batch of one)."""
    if quantised(model):
        raise ExportError("int8 graph: torch.onnx does not export PT2E int8 (oneDNN) kernels")
    model.eval()
    _build_torchlib_registry_once()
    try:
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=True,
            verbose=False,
            external_data=False,
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
        )
    except Exception as exc:
        raise ExportError(f"torch.onnx cannot export it ({type(exc).__name__}: {_first_line(exc)})") from exc
    return path


def _build_torchlib_registry_once() -> None:
    """torch.onnx 2.14 rebuilds its table of ATen -> ONNX functions (parsing onnxscript's sources)
    on every export: about 4 s, two thirds of exporting a small model. The table depends only on
    the opset and we never add to it (no ``custom_translation_table``), so one per process serves
    every export. Private API, so torch stays pinned; without it exports are only slower."""
    try:
        from torch.onnx._internal.exporter import _constants, _registration
    except ImportError:
        return
    registry = _registration.ONNXRegistry
    if hasattr(registry.from_torchlib, "cache_info"):
        return
    build = functools.cache(registry.from_torchlib)

    def from_torchlib(cls, opset_version: int = _constants.TORCHLIB_OPSET):
        return build(opset_version=opset_version)

    from_torchlib.cache_info = build.cache_info
    registry.from_torchlib = classmethod(from_torchlib)


def quantised(model: nn.Module) -> bool:
    return is_int8(model)


def session(path: Path) -> ort.InferenceSession:
    """An onnxruntime CPU session on one thread, like PyTorch's latency measurement."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def max_abs_diff(model: nn.Module, sess: ort.InferenceSession, images: Tensor) -> float:
    """Raise if onnxruntime's logits differ from PyTorch's beyond the stated tolerance."""
    with torch.inference_mode():
        expected = model(images).numpy()
    actual = sess.run([OUTPUT], {INPUT: images.numpy()})[0]
    diff = float(np.abs(actual - expected).max())
    if not np.allclose(actual, expected, rtol=PARITY_RTOL, atol=PARITY_ATOL):
        raise ExportError(f"onnxruntime logits differ from PyTorch's by up to {diff:.2e}")
    return diff


def ort_latency_ms(sess: ort.InferenceSession, example: Tensor, warmup: int, repeats: int) -> float:
    """Median onnxruntime latency of one batch-1 forward pass, after warm-up."""
    feed = {INPUT: example[:1].numpy()}
    for _ in range(warmup):
        sess.run([OUTPUT], feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sess.run([OUTPUT], feed)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def check_onnx(
    model: nn.Module, images: Tensor, warmup: int, repeats: int, keep: Path | None = None
) -> OnnxCheck:
    """Export, compare with PyTorch on ``images`` and time onnxruntime; a model that cannot be
    exported or disagrees is reported in ``status``, never raised. With ``keep``, the checked
    export is kept there (registration ships it instead of exporting again)."""
    images = images[:PARITY_IMAGES]
    if keep is not None:
        keep.unlink(missing_ok=True)  # no stale export survives a failed one
    with tempfile.TemporaryDirectory(prefix="shrinkflow-onnx-") as tmp:
        try:
            path = export_onnx(model, images[:2], Path(tmp) / "model.onnx")
            sess = session(path)
            diff = max_abs_diff(model, sess, images)
        except ExportError as exc:
            log.info("no ONNX model: %s", exc)
            return OnnxCheck(f"failed: {exc}", math.nan, math.nan)
        if keep is not None:
            keep.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(keep) as tmp_keep:
                shutil.copyfile(path, tmp_keep)
        return OnnxCheck("ok", ort_latency_ms(sess, images, warmup, repeats), diff)


def _first_line(exc: BaseException) -> str:
    """The error's first line without memory addresses, so the report stays reproducible."""
    line = re.sub(r"\x1b\[[0-9;]*m", "", (str(exc).strip().splitlines() or [""])[0])
    return re.sub(r"0x[0-9a-fA-F]+", "0x...", line)[:160]
