"""Does rounding pruned channel counts to multiples of 8 or 16 (``round_to``) lower CPU latency?

The seed BaseNet (3x32x32, channels (64, 128), hidden (1000,), BatchNorm) pruned by prune_l1 at
several ratios with round_to None / 8 / 16; each model's float32 eval-mode forward pass timed on
one thread, batch 1 and batch 64, configurations interleaved round by round so that load from
other processes on a shared machine falls on all of them alike. Prints a Markdown table.

    python -m benchmarks.round_to [--rounds 7]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from shrinkflow.models import apply_strategy
from shrinkflow.models.arch.basenet import BaseNet
from shrinkflow.tasks.measurement.evaluate import count_flops
from shrinkflow.tasks.promotion.reproduce import cpu_model

RATIOS = (0.6, 0.7, 0.8)
ROUND_TO = (None, 8, 16)


def _models() -> dict[tuple[float, int | None], torch.nn.Module]:
    torch.manual_seed(0)
    seed = BaseNet(3, 32, 10, channels=(64, 128), hidden=(1000,), batch_norm=True).eval()
    g = torch.Generator().manual_seed(0)
    batch = torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g)
    models = {(0.0, None): seed}
    for ratio in RATIOS:
        for multiple in ROUND_TO:
            models[ratio, multiple] = apply_strategy(
                "prune_l1", copy.deepcopy(seed), batch, ratio=ratio, round_to=multiple
            )
    return models


@torch.inference_mode()
def _time(model: torch.nn.Module, x: torch.Tensor, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        model(x)
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    models = _models()
    x1, x64 = torch.randn(1, 3, 32, 32), torch.randn(64, 3, 32, 32)
    times: dict[tuple, dict[int, list[float]]] = {k: {1: [], 64: []} for k in models}
    for model in models.values():  # warm-up
        _time(model, x1, 20), _time(model, x64, 3)
    for _ in range(args.rounds):
        for key, model in models.items():
            times[key][1] += _time(model, x1, 100)
            times[key][64] += _time(model, x64, 10)
    base = {b: statistics.median(times[0.0, None][b]) for b in (1, 64)}
    print(f"CPU: {cpu_model()}; torch {torch.__version__}; 1 thread; float32 eval; {args.rounds} rounds")
    print("(100 batch-1 and 10 batch-64 passes per model per round; medians)\n")
    print(
        "| ratio | round_to | channels | hidden | MFLOPs/image | batch 1 (ms) | batch 64 (ms)"
        " | b64 ms per GFLOP |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for (ratio, multiple), model in models.items():
        spec = model.spec()
        flops = count_flops(model, x1)
        b1, b64 = (1e3 * statistics.median(times[ratio, multiple][b]) for b in (1, 64))
        print(
            f"| {ratio:.1f} | {multiple or '-'} | {spec['channels']} | {spec['hidden']} | {flops / 1e6:.1f} |"
            f" {b1:.3f} | {b64:.2f} | {b64 / (64 * flops / 1e9):.2f} |"
        )
    print(f"\nseed: batch 1 {1e3 * base[1]:.3f} ms, batch 64 {1e3 * base[64]:.2f} ms")


if __name__ == "__main__":
    main()
