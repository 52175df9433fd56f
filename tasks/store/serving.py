"""The MLflow pyfunc model every registered version carries (logged as "models from code").

It rebuilds the network from the shrinkflow checkpoint logged beside it, through the same safe
loader the pipeline uses, so loading a registered model never unpickles anything, and it prepares
images itself from the ``manifest.json`` logged beside the checkpoint, as ``tasks/data/sources.py`` and
``tasks/data/prepare.py`` did for the training data.

Input: uint8 images ``N x C x H x W`` or ``N x H x W x C`` (channels-first when dimension 1 is 1,
3 or 4), pixel values on the manifest's ``scale`` (0-255; 0-16 for scikit-learn's digits), 1, 3 or
4 (alpha dropped) channels, and the model's own size, or any size when its data was resized to it
(``resizes`` in the manifest): they are converted to the model's channels, resized (antialiased
bilinear) and normalised by the same functions ``prepare`` used (``models/preprocess.py``), a
chunk at a time, so that a request of any length holds at most one chunk's input and activations
(``models/footprint.py``). Output: a table with the predicted class name (``label``) and one
probability column per class (``prob_<class>``).

This file is self-contained (numpy, pandas, torch and the ``models`` package): it is what runs
inside ``mlflow models serve``.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel

from shrinkflow.models.arch.given import user_code
from shrinkflow.models.checkpoint import load_checkpoint
from shrinkflow.models.footprint import chunked_forward
from shrinkflow.models.preprocess import channels_first, to_model_input


def probability_columns(classes: list[str]) -> list[str]:
    return [f"prob_{name}" for name in classes]


def prediction_table(probs: np.ndarray, classes: list[str]) -> pd.DataFrame:
    table = pd.DataFrame(probs.astype(np.float64), columns=probability_columns(classes))
    table.insert(0, "label", [classes[i] for i in probs.argmax(1)])
    return table


class ShrinkflowClassifier(PythonModel):
    def load_context(self, context) -> None:
        code = Path(context.artifacts["checkpoint"]).resolve().parents[1] / "code"
        # A user's own network: its package travels in code/ and is imported from there while the
        # network is built (the checkpoint holds no code).
        scope = user_code(code) if code.is_dir() else contextlib.nullcontext()
        # The checkpoint's sha256 is logged beside it when the version is registered: a swapped or
        # damaged model.pt is refused here, before anything is served (older versions have none).
        expected = None
        if "checkpoint_sha256" in context.artifacts:
            with open(context.artifacts["checkpoint_sha256"]) as fh:
                expected = fh.read().strip()
        with scope:
            self.model, self.meta = load_checkpoint(context.artifacts["checkpoint"], sha256=expected)
        self.model.eval()
        with open(context.artifacts["manifest"]) as fh:
            self.manifest = json.load(fh)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities of raw uint8 ``N x C x H x W`` images, prepared and run a chunk at
        a time (a resize needs about nine bytes per raw pixel on top of the model's own)."""
        probs = np.empty((len(images), len(self.manifest["classes"])), dtype=np.float32)
        resizing = 9 * int(np.prod(images.shape[1:])) if images.shape[2:] != self.size else 0
        done = 0

        def read(rows: slice) -> torch.Tensor:
            return to_model_input(images[rows], self.manifest)

        with torch.inference_mode():
            for logits in chunked_forward(self.model, len(images), read, extra_per_row=resizing):
                probs[done : done + len(logits)] = logits.softmax(dim=1).numpy()
                done += len(logits)
        return probs

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.manifest["input_shape"][1:])

    def check_size(self, images: np.ndarray) -> None:
        """A model trained on images of one size, never resized, refuses others: resized they
        would be labelled, confidently and without meaning (1x1, 4000x4000 for 8x8 digits)."""
        got = images.shape[2:]
        if got != self.size and not self.manifest.get("resizes", True):
            raise ValueError(
                f"images must be {self.size[0]}x{self.size[1]} for this model (the size of its training "
                f"images, which were not resized); got {got[0]}x{got[1]}"
            )

    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> pd.DataFrame:
        images = np.asarray(model_input)
        scale = self.manifest["scale"]
        # uint8 cannot be negative; a value above the data's scale (255 sent to a 0-16 model) is
        # another encoding, and the model would answer it confidently and wrongly.
        if images.size and images.dtype == np.uint8 and (top := int(images.max())) > scale:
            raise mlflow.exceptions.MlflowException.invalid_parameter_value(
                f"pixel values must lie in [0, {scale:g}] for this model (the scale of its training "
                f"images); got a maximum of {top}"
            )
        # Errors reach the client as a short message: no stack trace, no server paths.
        try:
            if images.dtype != np.uint8:
                raise ValueError(f"expected uint8 pixels, got {images.dtype}")
            images = channels_first(images)
            self.check_size(images)
        except ValueError as exc:  # shape, layout, size or dtype: the client's to fix
            raise mlflow.exceptions.MlflowException.invalid_parameter_value(str(exc)[:300]) from None
        try:
            probs = self.probabilities(images)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            raise mlflow.exceptions.MlflowException(
                f"the model failed on this input ({type(exc).__name__}: {first})"
            ) from None
        return prediction_table(probs, self.manifest["classes"])


mlflow.models.set_model(ShrinkflowClassifier())
