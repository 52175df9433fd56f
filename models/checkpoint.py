"""Checkpoints as an architecture spec plus a state dict, read back without unpickling code.

``torch.load(weights_only=True)`` only admits tensors and plain containers, so a planted pickle
is refused rather than executed; a recorded sha256 guards against a swapped or truncated file.
"""

from __future__ import annotations

import hashlib
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shrinkflow.models.quantize import Int8Net
from shrinkflow.models.registry import build_model, model_spec

CHECKPOINT_FORMAT = "shrinkflow.checkpoint/1"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, tampered with or not ours."""


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_payload(model: nn.Module, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a checkpoint holds: the spec that rebuilds ``model``, its tensors and free metadata."""
    state = model.state_dict()
    return {
        "format": CHECKPOINT_FORMAT,
        "spec": model_spec(model),
        "state_dict": {k: _plain(v) for k, v in state.items()},
        # Per-module state versions: quantised layers read their tensors by version.
        "state_versions": {k: dict(v) for k, v in getattr(state, "_metadata", {}).items()},
        "meta": meta or {},
    }


def _plain(value: Any) -> Any:
    # Quantised packed params also carry their dtype, which weights_only loading admits.
    return value.detach().cpu().contiguous() if isinstance(value, torch.Tensor) else value


def rebuild(spec: dict[str, Any]) -> nn.Module:
    """An untrained model of the shapes ``spec`` records (an int8 one rebuilt from its float spec)."""
    if spec.get("arch") == Int8Net.ARCH:
        return Int8Net(**{k: v for k, v in spec.items() if k != "arch"})
    return build_model(spec)


def user_factory(path: str | Path) -> str | None:
    """The user's factory (``package.module:callable``) a checkpoint's network is built by, if any."""
    spec = torch.load(path, map_location="cpu", weights_only=True)["spec"]
    spec = spec.get("float_spec", spec)  # an int8 network names its float network
    return spec.get("factory") if spec.get("arch") == "factory" else None


def load_checkpoint(path: str | Path, sha256: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model a checkpoint describes; refuse it if ``sha256`` is given and differs."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if sha256 is not None and (actual := sha256_file(path)) != sha256:
        raise CheckpointError(f"checkpoint {path} has sha256 {actual[:12]}..., expected {sha256[:12]}...")
    try:
        with warnings.catch_warnings():
            # torch rebuilds the quantised tensors of int8 checkpoints through its own
            # TypedStorage and quantised-tensor constructors, and warns about its own use of them.
            warnings.filterwarnings("ignore", "TypedStorage is deprecated", UserWarning)
            warnings.filterwarnings("ignore", "torch.quantize_per_tensor, torch.quantize_per", UserWarning)
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError, EOFError, ... depending on the damage
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"checkpoint {path} cannot be loaded safely: {first}") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a {CHECKPOINT_FORMAT} file")
    model = rebuild(payload["spec"])
    state = OrderedDict(payload["state_dict"])
    state._metadata = OrderedDict(payload.get("state_versions", {}))  # read by load_state_dict
    model.load_state_dict(state)
    return model.eval(), payload["meta"]
