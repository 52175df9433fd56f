"""Pure-torch building blocks: architectures and shrink strategies."""

from shrinkflow.models.registry import ARCHITECTURES, build_model, model_spec
from shrinkflow.models.strategies import STRATEGIES, apply_strategy

__all__ = ["ARCHITECTURES", "STRATEGIES", "apply_strategy", "build_model", "model_spec"]
