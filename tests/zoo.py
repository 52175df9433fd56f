"""What the zoo tests share (tests/test_zoo*.py): a 32-px digits image folder, a user's own
training script for any torchvision classifier (torch and torchvision only, no shrinkflow), and
one family's whole way through the pipeline: baseline as given, candidates, evaluate (ONNX
parity), promotion into the registry, and the registered version serving raw images in a fresh
process."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from PIL import Image

from shrinkflow.tasks.config import load_params
from shrinkflow.tasks.data.prepare import load_raw_split, prepare
from shrinkflow.tasks.layout import Layout
from shrinkflow.tasks.measurement.evaluate import evaluate_models, load_table
from shrinkflow.tasks.pipeline.stages import Context, run_promote
from shrinkflow.tasks.records import ModelRecord, load_manifest, load_record
from shrinkflow.tasks.store.tracking import Tracker, tracking_uri
from shrinkflow.tasks.training.train import shrink_candidate, train_baseline

SIZE = 32
SEEN, UNSEEN = 400, 250  # images the user trained on; images for val, gate and test
MEAN, STD = 0.5, 0.5  # the user's normalisation, declared as model.input


def write_digits(root: Path) -> Path:
    """``root/images/{train,test}/<digit>/<n>.png``: scikit-learn's digits, grey, at 32 px."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images).float()[:, None] * (255 / 16)
    x = torch.nn.functional.interpolate(x, size=SIZE, mode="bilinear").round().clamp(0, 255)
    images = x[:, 0].to(torch.uint8).numpy()
    for split, rows in (("train", range(SEEN)), ("test", range(SEEN, SEEN + UNSEEN))):
        for i in rows:
            folder = root / "images" / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i], mode="L").save(folder / f"{i:04d}.png")
    return root / "images"


def user_trains(name: str, kwargs: dict, images: Path, out: Path, epochs: int, lr: float) -> None:
    """A user's own script: torchvision's ``name`` trained on ``images/train`` (RGB, normalised
    by MEAN and STD), its BatchNorm statistics recomputed (``torch.optim.swa_utils.update_bn``:
    a few dozen steps leave the running ones far off), the plain state dict saved to ``out``."""
    import torchvision

    files = sorted((images / "train").glob("*/*.png"))
    x = np.stack([np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255 for f in files])
    x = (torch.from_numpy(x).permute(0, 3, 1, 2) - MEAN) / STD
    y = torch.tensor([int(f.parent.name) for f in files])
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(x)).split(32):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            opt.step()
    torch.optim.swa_utils.update_bn([x[i : i + 64] for i in range(0, len(x), 64)], model)
    torch.save(model.state_dict(), out)


@dataclass
class Family:
    """One family's smallest member and what the test asks of it."""

    name: str
    kwargs: dict
    candidates: dict
    epochs: int = 2  # of the user's training
    lr: float = 3e-3


@dataclass
class Ran:
    """One family's run: its project, records, table and decision."""

    layout: Layout
    baseline: ModelRecord
    records: dict[str, ModelRecord]
    failures: dict[str, str]
    table: pd.DataFrame
    decision: object


def params_for(family: Family, project: Path) -> Path:
    raw = {
        "seed": 0,
        "data": {"source": "imagefolder", "root": "images", "val_fraction": 0.2, "gate_fraction": 0.4},
        "model": {
            "arch": "torchvision",
            "name": family.name,
            "kwargs": family.kwargs,
            "weights": "weights.pt",
            "input": {"mean": [MEAN] * 3, "std": [STD] * 3},
        },
        "train": {"batch_size": 32, "optimizer": "adamw", "lr": 0.0003},
        "shrink": {"workers": 1, "epochs": 1, "candidates": family.candidates},
        "evaluate": {"latency_warmup": 0, "latency_repeats": 1},
        # The path is what is tested, not the accuracy: the smaller model wins whatever it scores.
        "promote": {
            "tolerance": 100,
            "confidence": None,
            "max_class_drop": None,
            "model_name": f"zoo-{family.name}-{uuid.uuid4().hex[:6]}",
        },
    }
    path = project / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run_family(family: Family, images: Path, project: Path) -> Ran:
    """The user's training, then shrinkflow's stages in this process, as the flow runs them: a
    candidate that fails is recorded and the others go on."""
    project.mkdir(parents=True, exist_ok=True)
    (project / "images").symlink_to(images)
    user_trains(family.name, family.kwargs, images, project / "weights.pt", family.epochs, family.lr)
    params = load_params(params_for(family, project))
    layout = Layout.from_params(params, project)
    prepare(params, layout)
    baseline = train_baseline(params, layout)
    failures = {}
    for name in params.shrink.candidates:
        try:
            shrink_candidate(params, layout, name)
        except Exception as exc:
            failures[name] = str(exc)
    records = {name: load_record(layout, name) for name in params.shrink.candidates}
    evaluate_models(params, layout)
    ctx = Context(params, layout, Tracker(tracking_uri(layout.root), params.tracking.experiment))
    decision = run_promote(ctx)
    table = load_table(layout.candidates_csv).set_index("name")
    return Ran(layout, baseline, records, failures, table, decision)


# A fresh process, elsewhere, with no shrinkflow checkout on its path: raw images in, names out,
# for each registered version named (one process for a file's families: its start is the cost).
_SERVE = """
import json, sys
import mlflow, numpy as np
labels = {}
for uri, images in json.loads(sys.argv[1]).items():
    labels[uri] = mlflow.pyfunc.load_model(uri).predict(np.load(images))["label"].tolist()
print(json.dumps(labels))
"""


def registered_uri(ran: Ran) -> str:
    return f"models:/{ran.decision.registry.model_name}/{ran.decision.registry.version}"


def served_labels(runs: dict[str, Ran], tmp: Path) -> dict[str, tuple[list[str], list[str]]]:
    """Each run's registered version's labels for its raw test images (uint8, 32 px, as stored),
    from one fresh process, beside the labels the pipeline predicted for the same images with
    the same model: ``{family: (served, pipeline)}``."""
    requests = {}
    for family, ran in runs.items():
        np.save(tmp / f"{family}.npy", load_raw_split(ran.layout, "test")[0].numpy())
        requests[registered_uri(ran)] = str(tmp / f"{family}.npy")
    out = subprocess.run(
        [sys.executable, "-c", _SERVE, json.dumps(requests)],
        capture_output=True,
        text=True,
        cwd="/",
        timeout=600,
        check=True,
    )
    served = json.loads(out.stdout.strip().splitlines()[-1])
    return {family: (served[registered_uri(ran)], pipeline_labels(ran)) for family, ran in runs.items()}


def pipeline_labels(ran: Ran) -> list[str]:
    """The class names the pipeline predicted for the test images with the registered model."""
    frame = pd.read_csv(ran.layout.predictions_csv)
    test = frame[frame["split"] == "test"].sort_values("index")
    classes = load_manifest(ran.layout).classes
    return [classes[i] for i in test[ran.decision.winner]]


class Runs(dict):
    """Each family's run, made the first time a test asks for it (a file's tests share them)."""

    def __init__(self, families: list[Family], images: Path, root: Path) -> None:
        super().__init__()
        self.families, self.images, self.root = {f.name: f for f in families}, images, root

    def __missing__(self, name: str) -> Ran:
        self[name] = run_family(self.families[name], self.images, self.root / name)
        return self[name]
