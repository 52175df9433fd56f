"""What a user deploys: the registered pyfunc on raw images (in process and behind a real
`mlflow models serve`), and the ONNX export checked in onnxruntime against PyTorch."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import mlflow
import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import torch

from shrinkflow.models import apply_strategy
from shrinkflow.models.checkpoint import load_checkpoint
from shrinkflow.tasks.data.prepare import load_raw_split, load_split
from shrinkflow.tasks.layout import Layout
from shrinkflow.tasks.measurement.evaluate import load_table
from shrinkflow.tasks.measurement.export import PARITY_ATOL, PARITY_RTOL, check_onnx, export_onnx
from shrinkflow.tasks.records import load_manifest
from shrinkflow.tasks.store.registry import register_model
from shrinkflow.tasks.store.serving import probability_columns
from shrinkflow.tasks.store.tracking import Tracker, tracking_uri
from shrinkflow.tasks.training.engine import accuracy
from tests.conftest import BIN, copy_project, free_port, wait_http

MODEL = "w50"


@pytest.fixture(scope="module")
def registered(evaluated, tmp_path_factory):
    """``w50`` registered the way promotion does it, in its own sqlite registry."""
    root = tmp_path_factory.mktemp("deploy")
    params, layout = copy_project(evaluated, root)
    uri = tracking_uri(root)
    tracker = Tracker(uri, "deploy", artifact_root=root / "mlartifacts")
    run = tracker.start_run("promote")
    name = f"deploy-{uuid.uuid4().hex[:8]}"
    raw, _ = load_raw_split(layout, "test")
    version = register_model(
        tracker,
        run,
        layout.checkpoint(MODEL),
        name,
        manifest=layout.manifest,
        onnx=layout.onnx(MODEL),
        raw_example=raw[:2].numpy(),
        tags={},
        description="",
    )
    tracker.end_run(run)
    return uri, name, version, layout


def _raw_test(layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    """The prepared test split as a user holds it: uint8 pixels, N x C x H x W, and labels."""
    x, y = load_raw_split(layout, "test")
    return x.numpy(), y.numpy()


def _test_acc(layout: Layout, name: str) -> float:
    return float(load_table(layout.candidates_csv).set_index("name").loc[name, "test_acc"])


def _label_accuracy(labels, layout: Layout, y: np.ndarray) -> float:
    classes = load_manifest(layout).classes
    return accuracy(torch.tensor([classes.index(str(label)) for label in labels]), torch.from_numpy(y))


def test_registered_model_takes_raw_images_in_either_layout(registered):
    uri, name, version, layout = registered
    with _fluent(uri):
        model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    x, y = _raw_test(layout)
    classes = load_manifest(layout).classes
    nchw = model.predict(x)
    assert list(nchw.columns) == ["label", *probability_columns(classes)]
    assert np.allclose(nchw[probability_columns(classes)].sum(axis=1), 1.0, atol=1e-5)
    assert _label_accuracy(nchw["label"], layout, y) == _test_acc(layout, MODEL)
    nhwc = model.predict(np.ascontiguousarray(x.transpose(0, 2, 3, 1)))
    pd.testing.assert_frame_equal(nhwc, nchw)
    # Three channels: converted back to what the model takes. Another size is refused: the model
    # saw 8x8 images only (a model whose data was resized takes any size: tests/test_serving.py).
    rgb = np.repeat(x, 3, axis=1)
    assert _label_accuracy(model.predict(rgb)["label"], layout, y) >= _test_acc(layout, MODEL) - 10
    big = np.repeat(np.repeat(rgb, 2, axis=2), 2, axis=3)
    with pytest.raises(mlflow.exceptions.MlflowException, match=r"must be 8x8 for this model .*got 16x16$"):
        model.predict(big)
    signature = model.metadata.signature
    assert signature.inputs.to_dict()[0]["tensor-spec"]["dtype"] == "uint8"
    assert signature.outputs.input_names()[0] == "label"
    with pytest.raises(mlflow.exceptions.MlflowException):  # normalised floats are refused
        model.predict(load_split(layout, "test")[0][:].numpy())


def test_registered_version_carries_an_onnx_model_that_matches_pytorch(registered):
    uri, name, version, layout = registered
    client = mlflow.MlflowClient(uri)
    assert client.get_model_version(name, version).tags["onnx"] == "model.onnx"
    with _fluent(uri):
        local = mlflow.artifacts.download_artifacts(f"models:/{name}/{version}")
    onnx_file = next(Path(local).rglob("*.onnx"))
    assert onnx_file.read_bytes() == layout.onnx(MODEL).read_bytes(), "evaluate's checked export, reused"
    sess = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    x = load_split(layout, "test")[0][:]
    with torch.inference_mode():
        expected = load_checkpoint(layout.checkpoint(MODEL))[0](x).numpy()
    actual = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(actual, expected, rtol=PARITY_RTOL, atol=PARITY_ATOL)


def test_evaluate_reports_onnx_parity_and_ort_latency(evaluated, tmp_path):
    table = load_table(evaluated / "reports/candidates.csv").set_index("name")
    assert set(table["onnx"]) == {"ok"}, table["onnx"]
    assert (table["ort_latency_ms"] > 0).all()
    # An int8 graph has no ONNX export: reported, not raised.
    params, layout = copy_project(evaluated, tmp_path)
    x, y = load_split(layout, "train")
    int8 = apply_strategy("int8", load_checkpoint(layout.checkpoint("baseline"))[0], (x[:64], y[:64]))
    check = check_onnx(int8, load_split(layout, "test")[0], warmup=1, repeats=2)
    assert check.status.startswith("failed: int8") and np.isnan(check.ort_latency_ms)


def test_onnx_export_agrees_with_pytorch_on_test_images(evaluated, tmp_path):
    layout = Layout.from_params(copy_project(evaluated, tmp_path)[0], tmp_path)
    model = load_checkpoint(layout.checkpoint("l1-50"))[0]
    x = load_split(layout, "test")[0][:]
    path = export_onnx(model, x[:2], tmp_path / "l1-50.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        expected = model(x).numpy()
    actual = sess.run(None, {"images": x.numpy()})[0]  # a batch other than the exported one
    np.testing.assert_allclose(actual, expected, rtol=PARITY_RTOL, atol=PARITY_ATOL)
    assert (actual.argmax(1) == expected.argmax(1)).all()


@pytest.mark.slow
def test_mlflow_models_serve_answers_raw_images_over_rest(registered, tmp_path):
    uri, name, version, layout = registered
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{BIN}:{os.environ['PATH']}"}
    cmd = [
        str(BIN / "mlflow"),
        "models",
        "serve",
        "-m",
        f"models:/{name}/{version}",
        "--env-manager",
        "local",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    with (tmp_path / "serve.log").open("w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_http(f"http://127.0.0.1:{port}/ping", proc, timeout=180)
            x, y = _raw_test(layout)
            body = json.dumps({"inputs": x.transpose(0, 2, 3, 1).tolist()}).encode()  # N x H x W x C
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=60) as response:
                predictions = json.loads(response.read())["predictions"]
            refused = _post_error(
                port, np.minimum(x[:2].astype(np.int64) + 255, 255)
            )  # 0-255 to a 0-16 model
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    assert len(predictions) == len(y)
    assert set(predictions[0]) == {"label", *probability_columns(load_manifest(layout).classes)}
    served = _label_accuracy([p["label"] for p in predictions], layout, y)
    assert served >= _test_acc(layout, MODEL), (served, (tmp_path / "serve.log").read_text()[-3000:])
    scale = load_manifest(layout).scale
    status, message = refused
    assert status == 400 and f"pixel values must lie in [0, {scale:g}]" in message, (status, message)
    assert "Traceback" not in message and "site-packages" not in message, message


def _post_error(port: int, images: np.ndarray) -> tuple[int, str]:
    """The HTTP status and body of a request the server refuses (N x C x H x W sent as N x H x W x C)."""
    body = json.dumps({"inputs": images.transpose(0, 2, 3, 1).tolist()}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _fluent(uri: str):
    from shrinkflow.tasks.store.registry import _tracking

    return _tracking(uri)
