"""How prepare and training scale with the data: a synthetic folder of 96x96 RGB JPEGs at 1x, 4x
and 16x (16x is over 2 GB as uint8) through prepare, one baseline epoch and one candidate epoch
with two workers (two width candidates in threads, as the thread runner trains them), on a
small BaseNet; per size and stage: wall time, images per second and peak anonymous memory
(RssAnon, which the memory maps of the prepared files do not inflate).

    python -m benchmarks.scaling [--base 4900] [--scales 1 4 16] [--old-scales 1 4] [--out FILE]

Each stage runs in its own process, sampled every 10 ms from here; "own" is its peak minus what it
held when the stage began (the imports: torch, MLflow, ...). The same runs with the code before
the memory maps (``--old-commit``, unpacked with ``git archive``) on the sizes it survives; and on
real CIFAR-10 (``../shared/data``), training throughput from the maps against the same split held
in memory as float tensors.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CIFAR_TAR = REPO.parent / "shared" / "data" / "cifar10-jpg.tar.gz"
SIZE, CLASSES = 96, 10
STAGES = ("prepare", "baseline", "candidates")
SETTINGS = {
    "data": {"source": "imagefolder", "root": "images"},
    "model": {"arch": "basenet", "channels": [8, 16], "hidden": [32]},
    "train": {"epochs": 1, "batch_size": 64},
    "shrink": {
        "epochs": 1,
        "workers": 2,
        "candidates": {
            "w50": {"strategy": "width", "ratio": 0.5},
            "w75": {"strategy": "width", "ratio": 0.75},
        },
    },
}
# One stage in a fresh interpreter, whichever shrinkflow is first on its path (old or new).
CHILD = """
import json, sys, time
from concurrent.futures import ThreadPoolExecutor
import torch
from shrinkflow.tasks.config import load_params
from shrinkflow.tasks.layout import Layout
from shrinkflow.tasks.data.prepare import prepare
from shrinkflow.tasks.training.train import shrink_candidate, threads_per_worker, train_baseline

def anon():
    return int(next(l for l in open("/proc/self/status") if l.startswith("RssAnon")).split()[1]) * 1024

params = load_params("params.yaml")
layout = Layout.from_params(params, ".")
stage, start_anon, start = sys.argv[1], anon(), time.perf_counter()
if stage == "prepare":
    prepare(params, layout)
elif stage == "baseline":
    train_baseline(params, layout)
else:
    torch.set_num_threads(threads_per_worker(params.shrink.workers))
    with ThreadPoolExecutor(params.shrink.workers) as pool:
        list(pool.map(lambda name: shrink_candidate(params, layout, name), params.shrink.candidates))
print(json.dumps({"seconds": time.perf_counter() - start, "start_anon": start_anon}))
"""


def synthetic_folder(root: Path, n: int, seed: int = 0) -> None:
    """``n`` learnable JPEGs: each class a colour gradient at its own angle, shifted and noised."""
    if sum(1 for _ in root.rglob("*.jpg")) == n:  # a --work kept from an earlier run
        return
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij")).astype(np.float32) / SIZE
    for c in range(CLASSES):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        c, angle = i % CLASSES, (i % CLASSES) * np.pi / CLASSES
        wave = np.cos(angle) * grid[0] + np.sin(angle) * grid[1] + rng.uniform(0, 1)
        rgb = np.stack([np.sin(6 * wave + k) for k in range(3)], -1) * 100 + 128
        rgb += rng.normal(0, 20, rgb.shape)
        Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(root / f"c{c}" / f"{i:06d}.jpg", quality=90)


def subset(full: Path, dst: Path, n: int) -> None:
    """The first ``n`` images of ``full`` as hard links (real files, no second copy on disk)."""
    for i, path in enumerate(sorted(full.rglob("*.jpg"), key=lambda p: p.name)):
        if i == n:
            break
        (dst / path.parent.name).mkdir(parents=True, exist_ok=True)
        os.link(path, dst / path.parent.name / path.name)


def run_stage(project: Path, stage: str, pythonpath: str) -> dict:
    """One stage in a child process; its time and its peak RssAnon, sampled from here."""
    env = {**os.environ, "PYTHONPATH": pythonpath, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, stage],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    peak = [0]

    def sample() -> None:
        status = Path(f"/proc/{proc.pid}/status")
        while proc.poll() is None:
            try:
                line = next(x for x in status.read_text().splitlines() if x.startswith("RssAnon"))
                peak[0] = max(peak[0], int(line.split()[1]) * 1024)
            except (OSError, StopIteration):
                pass
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    sampler.join()
    if proc.returncode != 0:
        tail = err.decode().strip().splitlines()[-1:] or ["?"]
        return {"failed": f"exit {proc.returncode}: {tail[0][:200]}", "peak_anon": peak[0]}
    result = json.loads(out.decode().strip().splitlines()[-1])
    return result | {"peak_anon": peak[0], "own_anon": peak[0] - result["start_anon"]}


def scale_run(work: Path, full: Path, scale: int, base: int, code: str, pythonpath: str) -> list[dict]:
    project = work / f"{code}-{scale}x"
    shutil.rmtree(project, ignore_errors=True)  # a --work kept from an earlier run
    subset(full, project / "images", scale * base)
    (project / "params.yaml").write_text(yaml.safe_dump(SETTINGS))
    rows = []
    for stage in STAGES:
        result = run_stage(project, stage, pythonpath)
        manifest = project / "data/prepared/manifest.json"  # the default paths.prepared
        sizes = json.loads(manifest.read_text())["sizes"] if manifest.is_file() else {}
        images = {
            "prepare": scale * base,
            "baseline": sizes.get("train", 0),
            "candidates": 2 * sizes.get("train", 0),
        }
        row = {"code": code, "scale": scale, "images": scale * base, "stage": stage, **result}
        if "seconds" in result:
            row["images_per_second"] = images[stage] / result["seconds"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        if "failed" in result:
            break
    return rows


def cifar_throughput(work: Path, repeats: int, per_class: int) -> dict:
    """Training images per second on real CIFAR-10 (the first ``per_class`` training images of
    each class), reading batches from the maps and from the same split held in memory as float
    tensors (what every stage did before), same seed: the loss must be the same too."""
    import torch

    from shrinkflow.models import build_model
    from shrinkflow.tasks.config import parse_params
    from shrinkflow.tasks.data.prepare import load_split, prepare
    from shrinkflow.tasks.layout import Layout
    from shrinkflow.tasks.training.engine import FP32, train_one_epoch

    root = work / "cifar"
    keep = {"train": per_class, "test": per_class // 5}
    with tarfile.open(CIFAR_TAR, "r:gz") as tar:
        for member in tar:  # streamed: only the first images of each class are written
            parts = member.name.split("/")
            if member.isfile() and len(parts) == 3 and int(Path(parts[2]).stem) < keep.get(parts[0], 0):
                tar.extract(member, root / "images", filter="data")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"] |= {"source": "imagefolder", "root": "images"}
    params = parse_params(raw)
    layout = Layout.from_params(params, root)
    start = time.perf_counter()
    manifest = prepare(params, layout)
    prepare_seconds = time.perf_counter() - start
    mapped = load_split(layout, "train")
    held = (mapped[0][:], mapped[1])
    seconds: dict[str, list[float]] = {"maps": [], "memory": []}
    losses = {}
    for _ in range(repeats):
        for name, split in (("maps", mapped), ("memory", held)):
            torch.manual_seed(0)
            spec = {"in_channels": 3, "image_size": 32, "num_classes": 10, **params.model.arch_options()}
            model = build_model(spec)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            start = time.perf_counter()
            losses[name] = train_one_epoch(
                model, split, optimizer, 64, torch.Generator().manual_seed(0), "crop_flip", precision=FP32
            )
            seconds[name].append(time.perf_counter() - start)
    n = len(mapped[1])
    best = {name: n / min(s) for name, s in seconds.items()}
    return {
        "images": n,
        "prepared_images": sum(manifest.sizes.values()),
        "prepare_seconds": prepare_seconds,
        "maps_images_per_second": best["maps"],
        "memory_images_per_second": best["memory"],
        "ratio": best["maps"] / best["memory"],
        "same_loss": losses["maps"] == losses["memory"],
        "fingerprint": manifest.fingerprint,
    }


def ratios(rows: list[dict], code: str, low: int, high: int) -> dict[str, dict[str, float]]:
    """Per stage, 16x against 1x: peak anonymous memory and time per image."""
    by = {(r["scale"], r["stage"]): r for r in rows if r["code"] == code and "seconds" in r}
    out = {}
    for stage in STAGES:
        if (low, stage) in by and (high, stage) in by:
            a, b = by[(low, stage)], by[(high, stage)]
            out[stage] = {
                "peak_anon": b["peak_anon"] / a["peak_anon"],
                "own_anon": b["own_anon"] / max(a["own_anon"], 1),
                "time_per_image": a["images_per_second"] / b["images_per_second"],
            }
    return out


def markdown(rows: list[dict], summary: dict, cifar: dict | None, base: int, scales: tuple[int, int]) -> str:
    gigabytes = base * SIZE * SIZE * 3 / 1e9
    lines = [
        f"# Scaling: {SIZE}x{SIZE} RGB JPEGs, {base} images at 1x ({gigabytes:.2f} GB as uint8)",
        "",
        f"{datetime.date.today()}, {os.cpu_count()} cores (shared with other work: wall times are noisy). "
        "Peak anon: the stage process's largest RssAnon; own: that minus what it held when the stage "
        "began (imports). Candidates: two width candidates, one epoch each, in two threads.",
        "",
        "| code | scale | images | uint8 GB | stage | seconds | images/s | peak anon MB | own MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = f"| {r['code']} | {r['scale']}x | {r['images']} | {r['images'] * SIZE * SIZE * 3 / 1e9:.2f} "
        if "failed" in r:
            lines.append(f"{head}| {r['stage']} | {r['failed']} | | {r['peak_anon'] / 2**20:.0f} | |")
            continue
        lines.append(
            f"{head}| {r['stage']} | {r['seconds']:.1f} | {r['images_per_second']:.0f} | "
            f"{r['peak_anon'] / 2**20:.0f} | {r['own_anon'] / 2**20:.0f} |"
        )
    ratio = f"{scales[1]}x / {scales[0]}x"
    lines += ["", "## Targets", "", "| figure | target | measured |", "|---|---|---|"]
    for stage, r in summary.items():
        measured = f"{r['peak_anon']:.2f} (own: {r['own_anon']:.2f})"
        lines.append(f"| peak anon memory, {stage}, {ratio} | <= 1.5 | {measured} |")
    for stage, r in summary.items():
        lines.append(f"| time per image, {stage}, {ratio} | 0.9 - 1.1 | {r['time_per_image']:.2f} |")
    if cifar:
        speeds = f"{cifar['maps_images_per_second']:.0f} vs {cifar['memory_images_per_second']:.0f} images/s"
        lines.append(
            f"| training throughput, maps / in-memory tensors, CIFAR-10 ({cifar['images']} images) | >= 0.95 "
            f"| {cifar['ratio']:.3f} ({speeds}; same loss: {cifar['same_loss']}) |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=int, default=4900, help="images at 1x")
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--old-scales", type=int, nargs="*", default=[1, 4])
    parser.add_argument("--old-commit", default="e8088da")
    parser.add_argument("--cifar-repeats", type=int, default=2, help="0: skip the CIFAR-10 throughput")
    parser.add_argument(
        "--cifar-per-class", type=int, default=1000, help="CIFAR-10 training images per class"
    )
    parser.add_argument("--work", type=Path, help="keep the data here (default: a temporary directory)")
    parser.add_argument(
        "--out", type=Path, default=REPO / f"benchmarks/results/scaling-{datetime.date.today()}.md"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="shrinkflow-scaling-") as tmp:
        work = args.work or Path(tmp)
        full = work / "full"
        synthetic_folder(full, max(args.scales + args.old_scales) * args.base)
        old = work / "old-code"
        shutil.rmtree(old, ignore_errors=True)
        (old / "shrinkflow").mkdir(parents=True)
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", args.old_commit], capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", str(old / "shrinkflow")], input=archive.stdout, check=True)
        rows = []
        for scale in args.scales:
            rows += scale_run(work, full, scale, args.base, "new", "")
        for scale in args.old_scales:
            rows += scale_run(work, full, scale, args.base, "old", str(old))
        low, high = min(args.scales), max(args.scales)
        summary = ratios(rows, "new", low, high)
        cifar = (
            cifar_throughput(work, args.cifar_repeats, args.cifar_per_class) if args.cifar_repeats else None
        )
    text = markdown(rows, summary, cifar, args.base, (low, high))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(
        json.dumps({"rows": rows, "summary": summary, "cifar": cifar}, indent=2) + "\n"
    )
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
