"""Networks by name: `build_model` turns a name and a few numbers (from a config or a manifest) into a net."""

from __future__ import annotations

import inspect
from typing import Any

from medfl.errors import ConfigError
from medfl.models.base import TASKS, FeatureNet
from medfl.models.classifiers import DenseNet121Net, EfficientNetB0Net, ResNet18Net
from medfl.models.segmentation import BasicUNetNet, UNetNet
from medfl.models.vgg import SlimVGG16

NETWORKS: dict[str, dict[str, type[FeatureNet]]] = {
    "classification": {
        "slim_vgg16": SlimVGG16,
        "densenet121": DenseNet121Net,
        "efficientnet-b0": EfficientNetB0Net,
        "resnet18": ResNet18Net,
    },
    "segmentation": {
        "unet": UNetNet,
        "basicunet": BasicUNetNet,
    },
}

MODEL_NAMES: dict[str, tuple[str, ...]] = {task: tuple(nets) for task, nets in NETWORKS.items()}

_BASE_ARGUMENTS = ("num_classes", "in_channels", "width", "spatial_dims")


def build_model(
    name: str,
    task: str,
    num_classes: int,
    in_channels: int,
    width: float = 1.0,
    spatial_dims: int = 2,
    **kwargs: Any,
) -> FeatureNet:
    """Build network `name` for `task`; kwargs are the network's own options (e.g. UNet `channels`).

    Initialisation draws from torch's global RNG, so a seeded experiment gets the same weights everywhere.
    Bad names, numbers or options raise ConfigError.
    """
    if task not in NETWORKS:
        raise ConfigError(f"unknown task '{task}'; valid tasks: {', '.join(TASKS)}")
    networks = NETWORKS[task]
    if name not in networks:
        raise ConfigError(f"unknown {task} model '{name}'; valid names: {', '.join(MODEL_NAMES[task])}")
    for label, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"model '{name}': {label} must be a positive integer, got {value!r}")
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
        raise ConfigError(f"model '{name}': width must be a positive number, got {width!r}")
    if spatial_dims not in (2, 3):
        raise ConfigError(f"model '{name}': spatial_dims must be 2 or 3, got {spatial_dims!r}")
    network = networks[name]
    options = [p for p in inspect.signature(network).parameters if p not in _BASE_ARGUMENTS]
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        valid = ", ".join(options) or "none"
        raise ConfigError(f"model '{name}': unknown option(s) {', '.join(unknown)}; valid options: {valid}")
    return network(
        num_classes=num_classes, in_channels=in_channels, width=width, spatial_dims=spatial_dims, **kwargs
    )
