"""Post-training static int8 quantisation on CPU, saved and loaded as spec + state dict.

torch 2.14 still ships FX graph-mode quantisation (``torch.ao.quantization.quantize_fx``),
deprecated in favour of torchao's pt2e flow, which is not installed here. FX mode traces
torchvision's ResNet/MobileNetV2 and BaseNet without code changes, fuses conv-BN-ReLU, and its
quantised state dict (int8 tensors plus scales) loads with ``torch.load(weights_only=True)``.
The converted graph is a function of the float architecture alone, so a checkpoint rebuilds it
from the float spec and then loads the quantised tensors: nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from models.registry import build_model

SCHEME = "fx-static-int8"
BACKEND = "x86"  # fbgemm's successor on x86 CPUs; per-channel int8 weights, uint8 activations

# quantize_fx reads and sets the process-wide quantised engine; candidates run in threads.
_ENGINE_LOCK = threading.Lock()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # FX quantisation warns on every call that it is deprecated (see the module docstring).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        yield


def _example(spec: dict[str, Any]) -> Tensor:
    return torch.zeros(1, spec["in_channels"], spec["image_size"], spec["image_size"])


def quantize_int8(model: nn.Module, float_spec: dict[str, Any], calibration: Tensor | None) -> nn.Module:
    """Fuse, observe ``calibration`` (skipped when rebuilding for a state dict) and convert."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    with _ENGINE_LOCK, _quiet():
        torch.backends.quantized.engine = BACKEND
        prepared = prepare_fx(model.eval(), get_default_qconfig_mapping(BACKEND), (_example(float_spec),))
        if calibration is not None:
            with torch.inference_mode():
                for start in range(0, len(calibration), 64):
                    prepared(calibration[start : start + 64])
        return convert_fx(prepared)


class Int8Net(nn.Module):
    """A quantised network plus the float spec it came from (which also rebuilds it)."""

    def __init__(self, float_spec: dict[str, Any], scheme: str = SCHEME, qmodel: nn.Module | None = None):
        super().__init__()
        if scheme != SCHEME:
            raise ValueError(f"unknown quantisation scheme {scheme!r}; only {SCHEME!r} is supported")
        self.float_spec = float_spec
        self.qmodel = (
            qmodel if qmodel is not None else quantize_int8(build_model(float_spec), float_spec, None)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.qmodel(x)

    ARCH = "int8"  # in a spec only: rebuilt by models.checkpoint, never declared in params.yaml

    def spec(self) -> dict[str, Any]:
        return {"arch": self.ARCH, "scheme": SCHEME, "float_spec": self.float_spec}

    def float_equivalent(self) -> nn.Module:
        """An (untrained) float network of the same shapes: what FLOPs and params are counted on,
        since the counters do not see quantised kernels."""
        return build_model(self.float_spec).eval()

    def train(self, mode: bool = True) -> Int8Net:
        if mode:
            raise RuntimeError("an int8 model cannot be trained; quantise after fine-tuning")
        return super().train(False)


def dense_twin(model: nn.Module) -> nn.Module:
    """The float network whose shapes ``model`` has (``model`` itself unless it is quantised)."""
    return model.float_equivalent() if isinstance(model, Int8Net) else model
