"""Forward passes in chunks bounded by bytes: the input, the activations alive at once and the
output of one chunk stay within a budget, whatever the image size or the network.

Counting images is not enough: 1,024 images of 96 px are 113 MB of float input before the first
layer, and a network's activations are many times its input. The pipeline's prediction
(``tasks/training/engine.py``) and the served model (``tasks/store/serving.py``) measure the model
on its first small chunk (module hooks: sizes only, so the estimate is the same on every machine
and the chunks with it) and size every later chunk from that.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

FIRST_ROWS = 2  # the chunk the activations are measured on
# What one chunk may hold by default: about 540 of the 8x8 digits for BaseNet, 32 CIFAR-10 images.
CHUNK_BYTES = 32 << 20
# The process's real peak over the estimate of :func:`measured_forward` (whole batches, CPU,
# float32, peak RSS): 0.9-1.5 for ResNet-18, MobileNetV3, EfficientNet, ConvNeXt, ViT and BaseNet
# on RGB; 2.5 for DenseNet-121, whose blocks keep every layer's output outside any module's
# input; 2.9 for BaseNet on 1-channel 8x8 digits, where oneDNN unfolds the input (im2col).
WORKSPACE = 3


def _tensors(value: object) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list | tuple):
        return [t for item in value for t in _tensors(item)]
    return []


def _storages(value: object) -> dict[int, int]:
    """Each distinct storage ``value`` holds (views share one), with the bytes its tensors span
    there (a slice of a larger batch is not the whole batch)."""
    found: dict[int, int] = {}
    for t in _tensors(value):
        key = t.untyped_storage().data_ptr()
        found[key] = max(found.get(key, 0), t.numel() * t.element_size())
    return found


def measured_forward(model: nn.Module, x: Tensor) -> tuple[Tensor, int]:
    """``model(x)`` and the most bytes of activations alive at once while it ran, estimated:
    when a leaf module returns, its output plus the inputs of every module still running (a
    block's input stays alive for its skip connection), each storage counted once."""
    running: list[dict[int, int]] = []
    peak = 0

    # A model that exports itself on its first call (int8's lowering) is traced with these hooks
    # attached: inside the trace they do nothing, and the eager call around it counts.
    def enter(module: nn.Module, args: object) -> None:
        if not torch.compiler.is_compiling():
            running.append(_storages(args))

    def leave(module: nn.Module, args: object, output: object) -> None:
        nonlocal peak
        if torch.compiler.is_compiling():
            return
        if not list(module.children()):
            alive = {k: v for storages in running for k, v in storages.items()} | _storages(output)
            peak = max(peak, sum(alive.values()))
        running.pop()

    hooks = [
        hook
        for m in model.modules()
        for hook in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))
    ]
    try:
        output = model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return output, max(peak, sum(_storages(x).values()) + sum(_storages(output).values()))


def rows_within(budget: int, per_row: int, most: int) -> int:
    """How many rows of ``per_row`` bytes fit in ``budget`` (at least one, at most ``most``)."""
    return max(1, min(most, budget // max(per_row, 1)))


def chunked_forward(
    model: nn.Module,
    rows: int,
    read: Callable[[slice], Tensor],
    budget: int = CHUNK_BYTES,
    most: int = 1024,
    extra_per_row: int = 0,
) -> Iterator[Tensor]:
    """``model``'s outputs for rows ``0..rows`` of ``read(rows)``, chunk by chunk: the first
    chunk (:data:`FIRST_ROWS`) is measured, and each later one holds as many rows as ``budget``
    bytes allow for its input, activations and output (the estimate times :data:`WORKSPACE`,
    for what kernels allocate inside a layer), plus ``extra_per_row`` bytes that
    ``read`` itself needs for a row (decoding, resizing), and at most ``most``."""
    if rows == 0:
        return
    first = read(slice(0, min(rows, FIRST_ROWS)))
    output, peak = measured_forward(model, first)
    yield output
    size = rows_within(budget, WORKSPACE * -(-peak // len(first)) + extra_per_row, most)
    for start in range(len(first), rows, size):
        yield model(read(slice(start, start + size)))
