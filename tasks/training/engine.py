"""The one training loop and the one ``evaluate``: the baseline and every candidate go through
them, so a candidate differs from the baseline only in what the strategy did to it."""

from __future__ import annotations

import collections
import contextlib
import copy
import ctypes
import functools
import logging
import math
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import ParamSpec, Protocol, TypeVar

import torch
from torch import Tensor, nn

from shrinkflow.models.allocation import has_batch_norm, reestimate_batch_norm
from shrinkflow.models.footprint import CHUNK_BYTES, chunked_forward
from shrinkflow.tasks.config import TrainConfig
from shrinkflow.tasks.errors import ShrinkflowError
from shrinkflow.tasks.training import progress, stop

log = logging.getLogger(__name__)
P, R = ParamSpec("P"), TypeVar("R")


class Images(Protocol):
    """What training and evaluation read images from, a batch at a time: a tensor, or a prepared
    split's memory map (:class:`shrinkflow.tasks.data.prepare.MappedImages`), which normalises only
    the rows asked for."""

    def __len__(self) -> int: ...

    @property
    def shape(self) -> torch.Size: ...

    def __getitem__(self, rows: slice | Tensor, /) -> Tensor: ...


Split = tuple[Images, Tensor]  # images and their int64 labels


class TrainingDiverged(ShrinkflowError, RuntimeError):
    """The loss became NaN or infinite; the model is unusable."""


# (logits, inputs, targets) -> loss
LossFn = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Hooks:
    """What a training mode changes inside the one loop: the ``loss`` (distillation), a
    ``penalty`` added to it (slimming's L1 on BatchNorm scales) and a constraint re-imposed
    ``after_step`` (pruned weights stay zero). The defaults are plain cross-entropy training."""

    loss: LossFn | None = None
    penalty: Callable[[nn.Module], Tensor] | None = None
    after_step: Callable[[nn.Module], None] | None = None


def distillation_loss(teacher: nn.Module, temperature: float, alpha: float) -> LossFn:
    """Hinton et al.'s loss: ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE``; the
    T^2 keeps the soft term's gradients on the scale of the hard one's."""
    teacher.eval()

    def loss(logits: Tensor, inputs: Tensor, targets: Tensor) -> Tensor:
        teacher.to(inputs.device)  # fit moves the student; a no-op after the first batch
        with torch.no_grad():
            soft_targets = (teacher(inputs) / temperature).log_softmax(1)
        soft = nn.functional.kl_div(
            (logits / temperature).log_softmax(1), soft_targets, reduction="batchmean", log_target=True
        )
        return alpha * temperature**2 * soft + (1 - alpha) * nn.functional.cross_entropy(logits, targets)

    return loss


def bn_l1_penalty(strength: float) -> Callable[[nn.Module], Tensor]:
    """Network slimming's sparsity term: ``strength * sum |gamma|`` over every BatchNorm scale."""

    def penalty(model: nn.Module) -> Tensor:
        scales = [m.weight.abs().sum() for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        return strength * torch.stack(scales).sum()

    return penalty


def small_bn_scales(model: nn.Module, below: float = 1e-2) -> float:
    """The share of BatchNorm scales with ``|gamma| < below``: what a sparsity phase produces."""
    scales = [m.weight.detach().abs() for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if not scales:
        return 0.0
    return round(float((torch.cat(scales) < below).float().mean()), 4)


def weight_l1_penalty(strength: float) -> Callable[[nn.Module], Tensor]:
    """The seed's L1 weight regularisation: ``strength * sum |w|`` over every conv and linear
    weight (biases and BatchNorm excluded). It drives unimportant weights towards zero, which is
    what magnitude and channel pruning then remove."""

    def penalty(model: nn.Module) -> Tensor:
        weights = [m.weight.abs().sum() for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
        return strength * torch.stack(weights).sum()

    return penalty


def keep_zeros(model: nn.Module) -> Callable[[nn.Module], None]:
    """A constraint that holds every conv/linear weight that is zero now at zero (momentum and
    weight decay would otherwise regrow unstructured-pruned weights)."""
    masks = {
        name: module.weight != 0
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d | nn.Linear)
    }

    @torch.no_grad()
    def restore(trained: nn.Module) -> None:
        for name, mask in masks.items():
            weight = trained.get_submodule(name).weight
            weight.mul_(mask.to(weight.device))

    return restore


@dataclass(frozen=True)
class Precision:
    """How the training step runs: ``autocast`` dtype (None: float32 throughout) and whether
    inputs and conv weights are channels-last. Weights, the optimizer state, validation,
    checkpoints and latency stay float32 and contiguous: the precision the model is served in."""

    name: str
    autocast: torch.dtype | None
    channels_last: bool

    def context(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast)


FP32 = Precision("fp32", None, False)
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively: a CUDA GPU that reports it, or a CPU with
    AVX512-BF16 or AMX (elsewhere oneDNN emulates bf16, slower than float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_precision(cfg: TrainConfig, device: torch.device, model: nn.Module) -> Precision:
    """``train.precision`` for ``model`` on ``device``. ``auto``: bf16 where the hardware has it,
    else fp16 on CUDA (with a gradient scaler), else float32. Channels-last (``auto``) for
    networks with convolutions, where oneDNN and cuDNN pick faster kernels for it (BaseNet at
    32x32 on an EPYC: 1.28x in float32, 1.39x more under bf16)."""
    name = cfg.precision
    if name == "auto":
        name = "bf16" if native_bf16(device) else "fp16" if device.type == "cuda" else "fp32"
    channels_last = cfg.channels_last
    if channels_last is None:
        channels_last = any(isinstance(m, nn.Conv2d) for m in model.modules())
    return Precision(name, _DTYPES.get(name), channels_last)


@dataclass
class FitResult:
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_val_acc: float = 0.0
    seconds: float = 0.0
    images_seen: int = 0
    precision: str = "fp32"  # what the training step ran in; "+cl": channels-last


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer {cfg.optimizer!r} is not supported; only sgd and adamw are")


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig
) -> torch.optim.lr_scheduler.LRScheduler:
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, cfg.epochs // 3), gamma=0.1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def train_one_epoch(
    model: nn.Module,
    train: Split,
    optimizer: torch.optim.Optimizer,
    batch_size: int,
    generator: torch.Generator,
    augment: str = "none",
    hooks: Hooks = Hooks(),
    precision: Precision = FP32,
    scaler: torch.amp.GradScaler | None = None,
) -> float:
    """One pass over ``train`` in a seeded random order (``augment``: see :func:`augment_batch`);
    ``hooks`` change the loss, add a penalty, constrain the weights; the forward pass and the
    loss run under ``precision`` (an fp16 ``scaler`` scales the gradients). Returns the mean
    loss."""
    model.train()
    x, y = train
    device = model_device(model)
    order = torch.randperm(len(y), generator=generator)
    total = 0.0
    for start in range(0, len(y), batch_size):
        stop.check()  # an interrupted run stops here, in every thread
        idx = order[start : start + batch_size]
        # Batches are read, normalised and moved to the model's device one at a time.
        inputs = augment_batch(x[idx], augment, generator).to(device)
        if precision.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with precision.context(device):
            logits = model(inputs)
            loss = (hooks.loss or _cross_entropy)(logits, inputs, y[idx].to(device))
        if hooks.penalty is not None:
            loss = loss + hooks.penalty(model)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"loss became {loss.item()} at sample {start}")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if hooks.after_step is not None:
            hooks.after_step(model)
        total += loss.item() * len(idx)
    return total / len(y)


def _sum(
    first: Callable[[nn.Module], Tensor] | None, second: Callable[[nn.Module], Tensor]
) -> Callable[[nn.Module], Tensor]:
    return second if first is None else lambda model: first(model) + second(model)


def _cross_entropy(logits: Tensor, inputs: Tensor, targets: Tensor) -> Tensor:
    return nn.functional.cross_entropy(logits, targets)


def augment_batch(x: Tensor, mode: str, generator: torch.Generator) -> Tensor:
    """``crop``: a random crop of the zero-padded batch (pad = size / 8, as 4 pixels on 32x32);
    ``crop_flip``: also a horizontal flip of half the images. Every draw comes from the training
    loop's own ``generator``, so runs are repeatable and threads never share a random state."""
    if mode == "none":
        return x
    n, _, h, w = x.shape
    pad = max(1, h // 8)
    padded = nn.functional.pad(x, (pad, pad, pad, pad))
    top = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator)
    left = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator)
    cols = torch.arange(w).expand(n, w)
    if mode == "crop_flip":
        flip = torch.rand(n, 1, generator=generator) < 0.5
        cols = torch.where(flip, cols.flip(1), cols)
    rows, cols = top + torch.arange(h), left + cols  # n x h, n x w: each image's own window
    batch = torch.arange(n)[:, None, None]
    windows = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # n x h x w x c
    return windows.permute(0, 3, 1, 2).contiguous()


def resolve_device(name: str) -> torch.device:
    """``train.device`` as a torch device: ``auto`` is cuda when torch sees a GPU, else cpu."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is cuda but torch sees no CUDA device; use auto or cpu")
    return torch.device(name)


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s weights are (cpu for a model without float parameters, e.g. int8)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


@contextlib.contextmanager
def batches_given_back() -> Iterator[None]:
    """Inside, memory blocks of 16 MiB and more are mapped afresh and returned to the system when
    freed; afterwards glibc's heap serves everything under 32 MiB again, and what the block freed
    is trimmed. For prediction passes: by default glibc raises its mmap threshold to the largest
    block it has freed (up to 32 MiB), so once a 32 MiB prediction batch was freed later
    batch-sized tensors came from the heap and stayed (a candidate that had predicted on 32 MiB
    batches kept 380 MB more than one that had not: benchmarks/results/scaling-2026-12-01-c.md).
    Not for training: with the threshold at 16 MiB every step mapped and faulted in BaseNet's
    32 MB fc1 gradient afresh, a third of the time in the kernel and 30% fewer images per second
    on CIFAR-10 (the first fix did that from `fit`). Does nothing where libc is not glibc.

    The settings and the trim are the whole process's: while another thread trains a model (the
    thread runner's other candidates) it does nothing, so no training step of theirs runs under
    a prediction's thresholds or re-faults what a trim gave back. A process of its own (a
    baseline, evaluate, the process and Dask runners' candidates) always has them."""
    if _trains_elsewhere():
        yield
        return
    _mallopt(_M_MMAP_THRESHOLD, 16 << 20)
    try:
        yield
    finally:
        # Where glibc's dynamic thresholds end up after a 32 MiB block: its ceiling, and twice it
        # for trimming the heap's top (left at 128 KiB, a freed gradient would be unmapped
        # every step).
        _mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        _mallopt(_M_TRIM_THRESHOLD, 64 << 20)
        if (libc := _glibc()) is not None:
            libc.malloc_trim(0)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)

_TRAINING: collections.Counter[int] = collections.Counter()  # threads inside `fit`, by ident
_TRAINING_LOCK = threading.Lock()


def trains_here(fit_fn: Callable[P, R]) -> Callable[P, R]:
    """Mark the calling thread as training for the duration of ``fit_fn``."""

    @functools.wraps(fit_fn)
    def counted(*args: P.args, **kwargs: P.kwargs) -> R:
        me = threading.get_ident()
        with _TRAINING_LOCK:
            _TRAINING[me] += 1
        try:
            return fit_fn(*args, **kwargs)
        finally:
            with _TRAINING_LOCK:
                _TRAINING[me] -= 1
                if not _TRAINING[me]:
                    del _TRAINING[me]

    return counted


def _trains_elsewhere() -> bool:
    """Whether a thread other than this one is inside ``fit`` now."""
    me = threading.get_ident()
    with _TRAINING_LOCK:
        return any(thread != me for thread in _TRAINING)


@functools.cache
def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (e.g. musl)
        return None


def _mallopt(param: int, value: int) -> None:
    if (libc := _glibc()) is not None:
        libc.mallopt(param, value)


# Bytes one prediction chunk may hold: its float input, the activations alive at once and its
# output, measured on the model's first two images (see models/footprint.py).
PREDICT_BYTES = CHUNK_BYTES


@torch.inference_mode()
def predict(model: nn.Module, x: Images, batch_size: int = 1024) -> Tensor:
    """Class predictions for ``x``, read a chunk at a time (at most ``batch_size`` images and
    :data:`PREDICT_BYTES`, activations included), on the model's device, in eval mode; returned
    on the CPU."""
    model.eval()
    device = model_device(model)
    with batches_given_back():
        chunks = chunked_forward(model, len(x), lambda rows: x[rows].to(device), PREDICT_BYTES, batch_size)
        return torch.cat([torch.empty(0, dtype=torch.long), *(logits.argmax(1).cpu() for logits in chunks)])


def accuracy(predictions: Tensor, targets: Tensor) -> float:
    """Top-1 accuracy in percent, exact to 4 decimals (an integer count over the split size)."""
    return round(100.0 * int((predictions == targets).sum()) / len(targets), 4)


def evaluate(model: nn.Module, split: Split) -> float:
    """Top-1 accuracy of ``model`` on ``split``, in percent."""
    x, y = split
    return accuracy(predict(model, x), y)


# BatchNorm statistics are recomputed on this many training images. A MobileNetV3-Small a user
# trained on 32 px digits (800 images, 8 epochs; its own running statistics gave 10% on
# validation) scored 90.9 / 90.2 / 92.2 / 92.4% with statistics from 64 / 128 / 256 / 512
# images: fewer than 256 cost 1-2 points, more gained nothing measurable. 256 is also
# shrink.calibration_size's default, the batch apply_strategy recomputes them on after pruning.
BN_IMAGES = 256
BN_BATCH = 64  # images per forward pass while recomputing (bounds the memory of large inputs)


def reestimate_statistics(model: nn.Module, images: Images, n: int = BN_IMAGES) -> bool:
    """Recompute ``model``'s BatchNorm running statistics, in place, on ``n`` of ``images``
    (un-augmented) spread evenly over the split: a split of an image folder is in class order, so
    its first rows would be its first classes. False (and nothing done) without BatchNorm."""
    if not has_batch_norm(model):
        return False
    device = model_device(model)
    rows = torch.linspace(0, len(images) - 1, min(n, len(images))).round().long()
    batches = [images[rows[i : i + BN_BATCH]].to(device) for i in range(0, len(rows), BN_BATCH)]
    reestimate_batch_norm(model, batches)
    return True


@contextlib.contextmanager
def _dropout_seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Dropout draws from torch's global generator (``nn.Dropout`` takes none of its own): seed it
    for one fit and give the process its state back afterwards, so a network with dropout (most
    of torchvision's) fine-tunes to the same weights every run. Concurrent fits in one process
    (the thread runner) share the generator, so their dropout masks still interleave."""
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


@trains_here
def fit(
    model: nn.Module,
    train: Split,
    val: Split,
    cfg: TrainConfig,
    seed: int,
    augment: str = "none",
    hooks: Hooks = Hooks(),
) -> FitResult:
    """Train ``model`` in place and leave it holding its last (``cfg.keep == "last"``) or its
    best-on-validation weights; ``hooks`` select the training mode (plain, distillation,
    sparsity, fixed zeros) and ``cfg.l1`` adds the L1 weight penalty. Training runs on
    ``cfg.device`` in ``cfg.precision``; the model is handed back on the CPU, float32 and
    contiguous, where checkpoints and latency are taken, with its BatchNorm statistics recomputed
    on training images for the weights it holds (the running averages trail the weights and saw
    augmented images)."""
    generator = torch.Generator().manual_seed(seed)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg, device, model)
    model.to(device, memory_format=torch.channels_last if precision.channels_last else torch.preserve_format)
    if cfg.l1:
        hooks = replace(hooks, penalty=_sum(hooks.penalty, weight_l1_penalty(cfg.l1)))
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    scaler = torch.amp.GradScaler(device.type) if precision.autocast is torch.float16 else None
    result, best_state = (
        FitResult(precision=precision.name + ("+cl" if precision.channels_last else "")),
        None,
    )
    start = time.perf_counter()
    with _dropout_seeded(seed, device):
        for epoch in range(1, cfg.epochs + 1):
            lr = optimizer.param_groups[0]["lr"]
            try:
                loss = train_one_epoch(
                    model, train, optimizer, cfg.batch_size, generator, augment, hooks, precision, scaler
                )
            except TrainingDiverged as exc:
                raise TrainingDiverged(
                    f"training diverged in epoch {epoch} at lr {lr:g}: {exc}; lower the lr"
                ) from None
            scheduler.step()
            val_acc = evaluate(model, val)
            result.history.append({"epoch": epoch, "train_loss": loss, "val_acc": val_acc, "lr": lr})
            result.images_seen += len(train[1])
            if cfg.keep == "last" or epoch == 1 or val_acc > result.best_val_acc:
                result.best_epoch, result.best_val_acc = epoch, val_acc  # the epoch kept
                if cfg.keep == "best":
                    best_state = copy.deepcopy(model.state_dict())
            log.debug("epoch %d loss %.4f val_acc %.2f", epoch, loss, val_acc)
            progress.epoch_done(epoch, cfg.epochs, result.history[-1])
            if not math.isfinite(loss):
                raise TrainingDiverged(
                    f"training diverged in epoch {epoch} at lr {lr:g}: loss became {loss}; lower the lr"
                )
    if best_state is not None:
        model.load_state_dict(best_state)
    reestimate_statistics(model, train[0])
    model.to("cpu", memory_format=torch.contiguous_format)
    result.seconds = time.perf_counter() - start
    return result
