"""The one training loop and the one ``evaluate``: the baseline and every candidate go through
them, so a candidate differs from the baseline only in what the strategy did to it."""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from tasks.config import TrainConfig

log = logging.getLogger(__name__)

Split = tuple[Tensor, Tensor]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the model is unusable."""


@dataclass
class FitResult:
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_val_acc: float = 0.0
    seconds: float = 0.0
    images_seen: int = 0


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
) -> float:
    """One pass over ``train`` in a seeded random order; returns the mean loss."""
    model.train()
    x, y = train
    order = torch.randperm(len(y), generator=generator)
    total = 0.0
    for start in range(0, len(y), batch_size):
        idx = order[start : start + batch_size]
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"loss became {loss.item()} at sample {start}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(idx)
    return total / len(y)


@torch.inference_mode()
def predict(model: nn.Module, x: Tensor, batch_size: int = 1024) -> Tensor:
    """Class predictions for ``x``, in eval mode."""
    model.eval()
    return torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def accuracy(predictions: Tensor, targets: Tensor) -> float:
    """Top-1 accuracy in percent, exact to 4 decimals (an integer count over the split size)."""
    return round(100.0 * int((predictions == targets).sum()) / len(targets), 4)


def evaluate(model: nn.Module, split: Split) -> float:
    """Top-1 accuracy of ``model`` on ``split``, in percent."""
    x, y = split
    return accuracy(predict(model, x), y)


def fit(model: nn.Module, train: Split, val: Split, cfg: TrainConfig, seed: int) -> FitResult:
    """Train ``model`` in place and leave it holding its best-on-validation weights."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    result, best_state = FitResult(), copy.deepcopy(model.state_dict())
    start = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        lr = optimizer.param_groups[0]["lr"]
        loss = train_one_epoch(model, train, optimizer, cfg.batch_size, generator)
        scheduler.step()
        val_acc = evaluate(model, val)
        result.history.append({"epoch": epoch, "train_loss": loss, "val_acc": val_acc, "lr": lr})
        result.images_seen += len(train[1])
        if val_acc > result.best_val_acc or epoch == 1:
            result.best_epoch, result.best_val_acc = epoch, val_acc
            best_state = copy.deepcopy(model.state_dict())
        log.debug("epoch %d loss %.4f val_acc %.2f", epoch, loss, val_acc)
        if not math.isfinite(loss):
            raise TrainingDiverged(f"loss became {loss} in epoch {epoch}")
    model.load_state_dict(best_state)
    result.seconds = time.perf_counter() - start
    return result
