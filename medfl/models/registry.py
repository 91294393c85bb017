"""Networks by name: `build_model` turns a name and a few numbers (from a config or a manifest) into a net."""

from __future__ import annotations

import inspect
from typing import Any

from medfl.errors import ConfigError
from medfl.models.base import FeatureNet, network_config
from medfl.network_facts import BASE_ARGUMENTS, check_network, import_network
from medfl.task_facts import FACTS, TaskKey, facts_for

# The networks each task trains, by name (each task's facts say which: TaskFacts.network_classes, "module:Class";
# medfl.network_facts describes them from their source without torch).
MODEL_NAMES: dict[TaskKey, tuple[str, ...]] = {key: tuple(facts.network_classes) for key, facts in FACTS.items()}


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
    try:
        task = facts_for(task).key
    except ValueError as error:
        raise ConfigError(str(error)) from None
    try:
        check_network(facts_for(task), name, kwargs)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    for label, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"model '{name}': {label} must be a positive integer, got {value!r}")
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
        raise ConfigError(f"model '{name}': width must be a positive number, got {width!r}")
    if spatial_dims not in (2, 3):
        raise ConfigError(f"model '{name}': spatial_dims must be 2 or 3, got {spatial_dims!r}")
    network = import_network(facts_for(task).network_classes[name])
    model = network(
        num_classes=num_classes, in_channels=in_channels, width=width, spatial_dims=spatial_dims, **kwargs
    )
    chosen = inspect.signature(network).bind(num_classes, in_channels, width, spatial_dims, **kwargs)
    chosen.apply_defaults()
    options = {key: value for key, value in chosen.arguments.items() if key not in BASE_ARGUMENTS}
    model.config = network_config(name, task, num_classes, in_channels, width, spatial_dims, **options)
    return model
