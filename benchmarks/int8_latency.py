"""Single-thread CPU latency of float vs int8 forms of three BaseNets; prints a markdown table.

Forms: float eager; the retired FX int8 (``torch.ao.quantization.quantize_fx``); the PT2E converted
q/dq graph run as is; the PT2E graph lowered to oneDNN int8 kernels (what ``Int8Net`` runs); and
with ``--compile``, float and PT2E int8 under ``torch.compile`` (inductor, freezing on), with
compile time. Median of ``--repeats`` batch-1 calls and ``--repeats // 5`` batch-64 calls after
warm-up; ratios are against float eager measured in the same run.

    python benchmarks/int8_latency.py --compile > benchmarks/results/int8-latency-YYYY-MM-DD.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings

import torch

from shrinkflow.models.arch.basenet import BaseNet
from shrinkflow.models.quantize import Int8Net, inlined, quantize_int8
from shrinkflow.models.registry import model_spec
from shrinkflow.tasks.promotion.reproduce import cpu_model

MODELS = {
    "digits BaseNet (1x8x8, 32-64, 128)": dict(in_channels=1, image_size=8, channels=(32, 64), hidden=(128,)),
    "seed BaseNet (3x32x32, 64-128, 1000, BN)": dict(
        in_channels=3, image_size=32, channels=(64, 128), hidden=(1000,), batch_norm=True
    ),
    "pruned BaseNet (3x32x32, 16-32, 250, BN)": dict(
        in_channels=3, image_size=32, channels=(16, 32), hidden=(250,), batch_norm=True
    ),
}


@torch.inference_mode()
def median_ms(fn, x: torch.Tensor, repeats: int, warmup: int = 10) -> float:
    for _ in range(warmup):
        fn(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def fx_int8(model: torch.nn.Module, calibration: torch.Tensor) -> torch.nn.Module:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    prepared = prepare_fx(model, get_default_qconfig_mapping("x86"), (calibration[:1],))
    with torch.inference_mode():
        prepared(calibration)
    return convert_fx(prepared)


def compiled(model: torch.nn.Module, xs: list[torch.Tensor]) -> tuple[list, float]:
    """One static-shape compile per batch size; returns the callables and total compile seconds."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    fns, seconds = [], 0.0
    for x in xs:
        torch._dynamo.reset()
        fn = torch.compile(model, dynamic=False)
        start = time.perf_counter()
        with torch.inference_mode():
            fn(x)
        seconds += time.perf_counter() - start
        fns.append(fn)
    return fns, seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    cpu = cpu_model()
    print(
        f"torch {torch.__version__}, torchao {__import__('torchao').__version__}, {cpu}, "
        f"{platform.machine()}, 1 thread; median ms (ratio to float eager, <1 is faster)\n"
    )
    head = "| model | batch | float | FX int8 | PT2E q/dq graph | PT2E oneDNN (Int8Net) |"
    if args.compile:
        head += " float compiled | PT2E int8 compiled | compile s (float / int8) |"
    print(head)
    print("|" + "---|" * head.count(" | ") + "---|")
    for name, kwargs in MODELS.items():
        torch.manual_seed(0)
        model = BaseNet(num_classes=10, **kwargs).eval()
        size = (kwargs["in_channels"], kwargs["image_size"], kwargs["image_size"])
        calibration = torch.rand(64, *size)
        spec = model_spec(model)
        fx = fx_int8(BaseNet(num_classes=10, **kwargs).eval().requires_grad_(False), calibration)
        fx.load_state_dict(fx.state_dict())
        int8 = Int8Net(spec, qmodel=quantize_int8(model, spec, calibration))
        xs = [torch.rand(1, *size), torch.rand(64, *size)]
        if args.compile:
            float_fns, float_s = compiled(model, xs)
            int8_fns, int8_s = compiled(inlined(int8.qmodel), xs)  # inductor wants literal qparams
        for i, x in enumerate(xs):
            reps = args.repeats if len(x) == 1 else max(args.repeats // 5, 10)
            base = median_ms(model, x, reps)
            cells = [median_ms(f, x, reps) for f in (fx, int8.reference, int8)]
            if args.compile:
                cells += [median_ms(float_fns[i], x, reps), median_ms(int8_fns[i], x, reps)]
            row = f"| {name} | {len(x)} | {base:.3f} | " + " | ".join(
                f"{c:.3f} ({c / base:.2f}x)" for c in cells
            )
            if args.compile:
                row += f" | {float_s:.1f} / {int8_s:.1f}" if i == 0 else " | "
            print(row + " |", flush=True)


if __name__ == "__main__":
    main()
