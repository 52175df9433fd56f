"""The one latency timer: median single-thread CPU time of a forward pass, after warm-up. The
evaluate stage times every model with it, and the sensitivity tables of budget allocation too."""

from __future__ import annotations

import statistics
import time

import torch
from torch import Tensor, nn


@torch.inference_mode()
def median_latency_ms(model: nn.Module, example: Tensor, warmup: int, repeats: int) -> float:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(warmup):
            model(example)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(example)
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times) * 1000
