"""The MLflow pyfunc model every registered version carries (logged as "models from code").

It rebuilds the network from the shrinkflow checkpoint logged beside it, through the same safe
loader the pipeline uses, so loading a registered model never unpickles anything. Input: float32
images ``N x C x H x W`` normalised as in the manifest; output: class probabilities ``N x K``.
"""

from __future__ import annotations

import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel

from models.checkpoint import load_checkpoint


class ShrinkflowClassifier(PythonModel):
    def load_context(self, context) -> None:
        self.model, self.meta = load_checkpoint(context.artifacts["checkpoint"])

    def predict(self, context, model_input, params=None) -> np.ndarray:
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.inference_mode():
            return self.model(x).softmax(dim=1).numpy()


mlflow.models.set_model(ShrinkflowClassifier())
