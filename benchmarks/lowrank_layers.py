"""What low-rank factorisation saves on the seed CIFAR BaseNet's two costly layers.

fc1 (8192 -> 1000, 8.19 M of the network's 8.28 M params) factorised by truncated SVD at several
ranks, and conv2 (64 -> 128, 3x3 at 16x16) by Tucker-2 at half ranks, each against the whole
layer: params and FLOPs (exact, :func:`shrinkflow.models.lowrank.layer_cost`) and batch-1
single-thread latency (``median_latency_ms``, the evaluate stage's timer). Random weights: the
cost of a layer does not depend on them. The variants are timed in interleaved rounds and each
keeps its fastest round, so load from other processes falls on all of them alike; on a shared
machine the milliseconds are still rough. Prints a Markdown table.

    python -m benchmarks.lowrank_layers [--rounds 5]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from shrinkflow.models.arch.basenet import BaseNet
from shrinkflow.models.lowrank import Factorisable, factorised, layer_cost, survey
from shrinkflow.models.timing import median_latency_ms

FC1_RANKS = ((32,), (64,), (128,), (256,))
CONV2_RANKS = ((32, 64),)  # half of (Cin, Cout)


Variant = tuple[str, tuple[int, ...] | None, nn.Module, torch.Tensor]  # label, ranks, module, input


def _variants() -> tuple[list[Variant], dict[str, Factorisable]]:
    torch.manual_seed(0)
    model = BaseNet(3, 32, 10, channels=(64, 128), hidden=(1000,)).eval()
    layers = {layer.name: layer for layer in survey(model, torch.zeros(1, 3, 32, 32)).layers}
    found = []
    for name, label, ranks, x in (
        ("classifier.1", "fc1", FC1_RANKS, torch.randn(1, 8192)),
        ("features.3", "conv2", CONV2_RANKS, torch.randn(1, 64, 16, 16)),
    ):
        module, layer = model.get_submodule(name), layers[name]
        found.append((label, None, module, x))
        found += [(label, r, factorised(module, layer.kind, r).eval(), x) for r in ranks]
    return found, layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    variants, layers = _variants()
    best = [float("inf")] * len(variants)
    for _ in range(args.rounds):
        for i, (_, _, module, x) in enumerate(variants):
            best[i] = min(best[i], median_latency_ms(module, x, 20, args.repeats))
    names = {"fc1": "classifier.1", "conv2": "features.3"}
    print("| layer | ranks | params | FLOPs | batch-1 ms (1 thread) | params x | FLOPs x | latency x |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    whole: dict[str, tuple] = {}
    for (label, ranks, _, _), ms in zip(variants, best, strict=True):
        cost = layer_cost(layers[names[label]], ranks)
        if ranks is None:
            whole[label] = (cost, ms)
        base, base_ms = whole[label]
        shown = "whole" if ranks is None else str(list(ranks))
        print(
            f"| {label} | {shown} | {cost.params:,} | {cost.flops:,} | {ms:.3f} | "
            f"{base.params / cost.params:.2f} | {base.flops / cost.flops:.2f} | {base_ms / ms:.2f} |"
        )


if __name__ == "__main__":
    main()
