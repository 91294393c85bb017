"""Networks that return (logits, features), features being the input of their final classifier."""

from medfl.models.base import TASKS, FeatureNet
from medfl.models.registry import MODEL_NAMES, build_model

__all__ = ["MODEL_NAMES", "TASKS", "FeatureNet", "build_model"]
