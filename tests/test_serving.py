"""The served model's bounds: images of a size it never saw are refused unless its data was
resized, and a long request runs in chunks bounded by bytes (real registry on sqlite, a real
registered version loaded in a fresh process)."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import mlflow
import numpy as np
import pytest
import torch

from shrinkflow.models.checkpoint import load_checkpoint
from shrinkflow.models.footprint import CHUNK_BYTES, measured_forward
from shrinkflow.tasks.data.prepare import load_raw_split, load_split
from shrinkflow.tasks.io import read_json, write_json
from shrinkflow.tasks.store.registry import register_model
from shrinkflow.tasks.store.tracking import Tracker, tracking_uri
from tests.conftest import copy_project

MODEL = "baseline"


def _register(layout, root, manifest) -> str:
    tracker = Tracker(tracking_uri(root), "serving", artifact_root=root / "mlartifacts")
    run = tracker.start_run("promote")
    name = f"serving-{uuid.uuid4().hex[:8]}"
    raw, _ = load_raw_split(layout, "test")
    version = register_model(
        tracker,
        run,
        layout.checkpoint(MODEL),
        name,
        manifest=manifest,
        onnx="not exported here",
        raw_example=raw[:2].numpy(),
        tags={},
        description="",
    )
    tracker.end_run(run)
    return f"models:/{name}/{version}"


@pytest.fixture(scope="module")
def served(evaluated, tmp_path_factory):
    """The baseline registered twice: with its own manifest (8x8 digits, never resized) and with
    one saying its data was resized; (uris, layout, tracking uri)."""
    root = tmp_path_factory.mktemp("serving")
    _, layout = copy_project(evaluated, root)
    resized = root / "resized-manifest.json"
    write_json(resized, read_json(layout.manifest) | {"resizes": True})
    uris = {"own size": _register(layout, root, layout.manifest), "resizes": _register(layout, root, resized)}
    return uris, layout, tracking_uri(root)


def _load(uri: str, tracking: str):
    mlflow.set_tracking_uri(tracking)
    return mlflow.pyfunc.load_model(uri)


@pytest.mark.slow
def test_images_of_another_size_are_refused_unless_the_data_was_resized(served):
    uris, layout, tracking = served
    assert read_json(layout.manifest)["resizes"] is False  # digits, prepared at their own 8x8
    own, resizing = _load(uris["own size"], tracking), _load(uris["resizes"], tracking)
    for side in (1, 4000):
        images = np.zeros((1, 1, side, side), dtype=np.uint8)
        with pytest.raises(mlflow.exceptions.MlflowException) as refused:
            own.predict(images)
        assert str(refused.value) == (
            f"images must be 8x8 for this model (the size of its training images, which were not "
            f"resized); got {side}x{side}"
        )
        assert resizing.predict(images)["label"].size == 1  # resized, as its training images were
    x = load_raw_split(layout, "test")[0][:20].numpy()
    assert (own.predict(x)["label"] == resizing.predict(x)["label"]).all()


# Run in a fresh process: the peak resident size before and after one request of 20,000 images.
_GROWTH = """
import json, resource, sys
import mlflow, numpy as np
mlflow.set_tracking_uri(sys.argv[2])
model = mlflow.pyfunc.load_model(sys.argv[1])
images = np.random.default_rng(0).integers(0, 17, (20_000, 1, 8, 8), dtype=np.uint8)
model.predict(images[:10])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
table = model.predict(images)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"growth": (after - before) * 1024, "rows": len(table)}))
"""


@pytest.mark.slow
def test_twenty_thousand_served_images_grow_the_process_by_less_than_one_chunk(served):
    uris, layout, tracking = served
    out = subprocess.run(
        [sys.executable, "-c", _GROWTH, uris["own size"], tracking],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["rows"] == 20_000
    # What one forward pass of the whole request would hold, at the measured bytes per image: the
    # bound is real (the request is many chunks), and the process stays within one of them.
    model = load_checkpoint(layout.checkpoint(MODEL))[0].eval()
    with torch.inference_mode():
        _, peak = measured_forward(model, load_split(layout, "test")[0][:2])
    assert peak // 2 * 20_000 > 4 * CHUNK_BYTES
    assert found["growth"] < CHUNK_BYTES, f"grew {found['growth'] / 2**20:.0f} MiB"
