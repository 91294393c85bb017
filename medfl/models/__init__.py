"""Networks that return (logits, features), features being the input of their final classifier."""

from medfl.models.base import FeatureNet
from medfl.models.registry import MODEL_NAMES, build_model

__all__ = ["MODEL_NAMES", "FeatureNet", "build_model"]
