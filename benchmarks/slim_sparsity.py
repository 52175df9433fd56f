"""Which L1 strength makes slimming's sparsity phase decide which channels go?

A BaseNet(1, 8, 10, channels=(32, 64), hidden=(128,), BatchNorm) trained on sklearn's digits
(8x8, normalised; 1200 train / 597 validation) for 10 epochs at lr 0.05, then a sparsity phase of
``--epochs`` epochs at lr ``--lr`` (the pipeline's: the candidate's train config, cosine) with
``strength * sum|gamma|`` added to the mean batch loss, for each strength (0: the same phase
without the penalty). Then ``slim`` at ``--ratio`` (global, BatchNorm scales) and a 3-epoch
fine-tune. Prints a Markdown table:

- ``|gamma| < 1e-2``: fraction of BatchNorm scales near zero after the phase;
- ``min / median``: of |gamma| over all BatchNorm scales;
- ``same pruned``: |pruned set & pruned set without penalty| / |pruned set|;
- accuracy on the validation split after the phase, after pruning, and after the fine-tune.

    python -m benchmarks.slim_sparsity [--epochs 5] [--lr 0.01] [--ratio 0.5]
"""

from __future__ import annotations

import argparse
import copy

import torch
from sklearn.datasets import load_digits
from torch import nn

from shrinkflow.models import apply_strategy
from shrinkflow.models.arch.basenet import BaseNet
from shrinkflow.tasks.config import TrainConfig
from shrinkflow.tasks.training.engine import Hooks, bn_l1_penalty, evaluate, fit

STRENGTHS = (0.0, 1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)


def digits() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    x = (x - x.mean()) / x.std()
    y = torch.tensor(y)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return (x[:1200], y[:1200]), (x[1200:], y[1200:])


def scales(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight.detach().clone() for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def pruned_channels(before: nn.Module, after: nn.Module) -> set[tuple[int, int]]:
    """(layer, channel) pairs removed: the channels whose BatchNorm scale no survivor carries."""
    out = set()
    for layer, (old, new) in enumerate(zip(scales(before), scales(after), strict=True)):
        kept = set(new.tolist())
        out |= {(layer, c) for c, g in enumerate(old.tolist()) if g not in kept}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--strengths", type=float, nargs="+", default=STRENGTHS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    train, val = digits()
    torch.manual_seed(0)
    baseline = BaseNet(1, 8, 10, channels=(32, 64), hidden=(128,), batch_norm=True)
    fit(baseline, train, val, TrainConfig(epochs=10, lr=0.05, device="cpu"), seed=0)
    print(f"baseline: {evaluate(baseline, val):.2f}% on validation after 10 epochs at lr 0.05")
    phase = TrainConfig(epochs=args.epochs, lr=args.lr, device="cpu")
    tune = TrainConfig(epochs=3, lr=args.lr, device="cpu")
    calibration = (train[0][:64], train[1][:64])
    print(
        f"sparsity phase: {args.epochs} epochs at lr {args.lr} (cosine, SGD momentum 0.9, wd 5e-4);"
        f" slim at ratio {args.ratio}, global; fine-tune 3 epochs\n"
    )
    print(
        "| strength | abs(gamma) < 1e-2 | min / median abs(gamma) | same pruned | phase acc | pruned acc |"
        " tuned acc |"
    )
    print("|---|---|---|---|---|---|---|")
    reference = None
    for strength in args.strengths:
        model = copy.deepcopy(baseline)
        hooks = Hooks(penalty=bn_l1_penalty(strength)) if strength else Hooks()
        fit(model, train, val, phase, seed=0, hooks=hooks)
        gammas = torch.cat(scales(model)).abs()
        phase_acc = evaluate(model, val)
        shrunk = apply_strategy("slim", copy.deepcopy(model), calibration, ratio=args.ratio)
        gone = pruned_channels(model, shrunk)
        reference = gone if reference is None else reference
        pruned_acc = evaluate(shrunk, val)
        fit(shrunk, train, val, tune, seed=0)
        print(
            f"| {strength:g} | {(gammas < 1e-2).float().mean():.1%} |"
            f" {gammas.min():.2e} / {gammas.median():.2e} | {len(gone & reference) / len(gone):.0%} |"
            f" {phase_acc:.2f} | {pruned_acc:.2f} | {evaluate(shrunk, val):.2f} |"
        )


if __name__ == "__main__":
    main()
