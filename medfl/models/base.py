"""The common shape of medfl networks: forward returns (logits, features), features feed the final classifier.

DET and CPA need the penultimate features (class prototypes), PFA needs to know which module is the final
classifier (aggregated class by class), and exports need a plain-dict description to rebuild the network.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from medfl.errors import ConfigError


def scale_channels(channels: int, width: float) -> int:
    """Scale a channel count by `width`, rounded, never below 4 (so tiny test networks stay valid)."""
    return max(4, round(channels * width))


class FeatureNet(nn.Module):
    """A network whose forward returns (logits, features), with features the input of `final_classifier`.

    Subclasses build their body (a MONAI network as `self.body`, whose output is the features, or their own
    `forward_features`) and set `self.final_classifier`. `build_model` records in `config` the keyword
    arguments that rebuild the same architecture.
    """

    final_classifier: nn.Module
    min_input_size: int = 32  # smallest edge length (pixels or voxels) the body accepts in training
    input_size_multiple: int = 1  # every edge length must be a multiple of this

    config: dict[str, Any]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the input of the final classifier: (B, F) vectors or a (B, F, *spatial) feature map."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.forward_features(x)
        return self.final_classifier(features), features

    def check_input_size(self, spatial_size: Sequence[int]) -> None:
        """Raise ConfigError when inputs of `spatial_size` cannot pass through the network (before training).

        3-D patches of a network that downsamples (a UNet) may be thin along an axis (prostate volumes have few
        slices): each edge must then be a multiple of the downsampling, and the smallest feature map hold more
        than one voxel, rather than every edge reach `min_input_size`."""
        name, multiple = self.config.get("name", type(self).__name__), self.input_size_multiple
        if len(spatial_size) != self.config["spatial_dims"]:
            raise ConfigError(
                f"model '{name}' is {self.config['spatial_dims']}-D but the input size {tuple(spatial_size)} "
                f"has {len(spatial_size)} dimensions"
            )
        if len(spatial_size) == 3 and multiple > 1:
            if any(edge < multiple or edge % multiple for edge in spatial_size) or math.prod(
                    edge // multiple for edge in spatial_size) < 2:
                raise ConfigError(
                    f"model '{name}' needs every patch edge to be a multiple of {multiple} and at least one edge "
                    f"to be {2 * multiple} or more, got {tuple(spatial_size)}"
                )
            return
        if any(edge < self.min_input_size or edge % multiple for edge in spatial_size):
            rule = f"at least {self.min_input_size}" + (
                f" and a multiple of {multiple}" if multiple > 1 else ""
            )
            raise ConfigError(
                f"model '{name}' needs every input edge to be {rule}, got {tuple(spatial_size)}"
            )


def network_config(
    name: str, task: str, num_classes: int, in_channels: int, width: float, spatial_dims: int, **options: Any
) -> dict[str, Any]:
    """The plain dict that `build_model(**config)` turns back into the same architecture."""
    return {
        "name": name,
        "task": str(task),
        "num_classes": num_classes,
        "in_channels": in_channels,
        "width": width,
        "spatial_dims": spatial_dims,
        **{key: plain_data(value) for key, value in options.items()},
    }


def plain_data(value: Any) -> Any:
    """A network option as plain data (tuples as lists), so that a config saves and loads as JSON and with
    torch.load(weights_only=True)."""
    if isinstance(value, (list, tuple)):
        return [plain_data(item) for item in value]
    if isinstance(value, dict):
        return {key: plain_data(item) for key, item in value.items()}
    return value
