"""Prediction in chunks bounded by bytes (models/footprint.py, engine.predict), and glibc's
process-wide settings kept out of another thread's training."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from shrinkflow.models.footprint import CHUNK_BYTES, WORKSPACE, chunked_forward, measured_forward, rows_within
from shrinkflow.models.registry import build_model
from shrinkflow.tasks.training.engine import predict


def test_the_estimate_is_the_largest_set_of_tensors_alive_at_once():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    x = torch.zeros(2, 1, 8, 8)
    with torch.inference_mode():
        out, peak = measured_forward(model, x)
    # at the ReLU: the input the Sequential still holds, the conv's output (2 x 4 x 8 x 8 floats)
    # and the ReLU's own; Flatten's view of it is the same storage, counted once
    assert out.shape == (2, 10)
    assert peak == (2 * 1 * 8 * 8 + 2 * (2 * 4 * 8 * 8)) * 4
    with torch.inference_mode():  # a slice of a larger batch counts only its own rows
        assert measured_forward(model, torch.zeros(1000, 1, 8, 8)[:2])[1] == peak


def test_pipeline_prediction_runs_in_chunks_bounded_by_bytes():
    torch.manual_seed(0)
    spec = {"arch": "basenet", "in_channels": 3, "image_size": 96, "num_classes": 10}
    model = build_model(spec | {"channels": (16, 16), "hidden": (16,)}).eval()
    x = torch.randn(64, 3, 96, 96)  # 37 MB of activations in one pass: many chunks
    read: list[slice] = []

    def rows(chunk: slice) -> torch.Tensor:
        read.append(chunk)
        return x[chunk]

    with torch.inference_mode():
        _, peak = measured_forward(model, x[:2])
        whole = model(x).argmax(1)
        chunks = list(chunked_forward(model, len(x), rows))
    size = rows_within(CHUNK_BYTES, WORKSPACE * peak // 2, 1024)
    assert 1 < size < 32, "the bound leaves more than one row and fewer than the whole batch"
    assert [c.stop - c.start for c in read[1:-1]] == [size] * (len(read) - 2), "every inner chunk is full"
    assert torch.equal(torch.cat(chunks).argmax(1), whole)
    assert torch.equal(predict(model, x), whole)
    assert len(predict(model, x[:0])) == 0


_HEAP = """
import sys, threading
import torch
from shrinkflow.tasks.training.engine import batches_given_back, trains_here
def anon():
    return int(next(l for l in open("/proc/self/status") if l.startswith("RssAnon")).split()[1]) << 10
held, done = threading.Event(), threading.Event()
@trains_here
def training():  # another candidate's fit, in another thread of the same process
    held.set()
    done.wait()
if sys.argv[1] == "beside training":
    threading.Thread(target=training).start()
    held.wait()
first = torch.ones(30 << 18)  # 30 MiB, freed: glibc's default raises its threshold to this size
del first
before = anon()
with batches_given_back():  # as predict
    batches, kept = [], []
    for _ in range(10):
        batches.append(torch.ones(20 << 18))
        kept.append(bytearray(200_000))
    del batches
done.set()
print(anon() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_allocator_settings_apply_only_while_no_other_thread_trains():
    """Alone, a prediction's freed batches go back to the system (tests/test_training.py); beside
    another thread's training, glibc is left as it is (the batches stay, as with its default)."""
    kept = {
        mode: int(
            subprocess.run(
                [sys.executable, "-c", _HEAP, mode], capture_output=True, text=True, check=True
            ).stdout
        )
        for mode in ("alone", "beside training")
    }
    assert kept["alone"] < 20 << 20, kept
    assert kept["beside training"] > 150 << 20, kept
