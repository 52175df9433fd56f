"""Pure-torch building blocks: architectures and shrink strategies."""

from models.registry import ARCHITECTURES, build_model, model_spec
from models.strategies import STRATEGIES, WARM_START, apply_strategy

__all__ = ["ARCHITECTURES", "STRATEGIES", "WARM_START", "apply_strategy", "build_model", "model_spec"]
