"""MONAI segmentation networks as feature bodies with a separate 1x1 convolution head.

The head nn.Conv{n}d(feature_channels, num_classes, 1) is the final classifier (PFA aggregates it class by
class); the feature map it reads is what CPA averages into per-class prototypes, pixel by pixel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from monai.networks.layers.factories import Conv
from monai.networks.nets import BasicUNet, UNet
from torch import nn

from medfl.models.base import FeatureNet, scale_channels

UNET_CHANNELS: tuple[int, ...] = (16, 32, 64, 128, 256)
UNET_STRIDES: tuple[int, ...] = (2, 2, 2, 2)
BASICUNET_FEATURES: tuple[int, ...] = (32, 32, 64, 128, 256, 32)
AFFINE_INSTANCE_NORM: tuple[str, dict[str, Any]] = ("instance", {"affine": True})


def _monai_layer_args(layer: str | Sequence[Any]) -> str | tuple[str, dict[str, Any]]:
    """A layer spec from a config (where YAML and JSON give lists) in the form MONAI factories take."""
    return layer if isinstance(layer, str) else (layer[0], dict(layer[1]))


class UNetNet(FeatureNet):
    """monai UNet whose last layer outputs `channels[0]` feature channels, followed by a 1x1 conv head.

    `channels` are scaled by `width`. MONAI's UNet ends in a plain convolution (no norm or activation), so
    the feature map is that convolution's output and can be negative. `norm` defaults to affine instance
    norm (MONAI's default has no weights), so that FedBN-style methods have site-local norm weights to keep.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        width: float = 1.0,
        spatial_dims: int = 2,
        channels: Sequence[int] = UNET_CHANNELS,
        strides: Sequence[int] = UNET_STRIDES,
        num_res_units: int = 2,
        dropout: float = 0.0,
        norm: str | Sequence[Any] = AFFINE_INSTANCE_NORM,
    ):
        super().__init__()
        scaled = [scale_channels(c, width) for c in channels]
        self.body = UNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=scaled[0],
            channels=scaled,
            strides=list(strides),
            num_res_units=num_res_units,
            dropout=dropout,
            norm=_monai_layer_args(norm),
        )
        self.final_classifier = Conv[Conv.CONV, spatial_dims](scaled[0], num_classes, 1)
        # Each stride halves the size and the transposed convs must restore it exactly; the bottom
        # (instance-normalised) map needs more than one element.
        self.input_size_multiple = math.prod(strides)
        self.min_input_size = 2 * self.input_size_multiple


class BasicUNetNet(FeatureNet):
    """monai BasicUNet without its own 1x1 output conv: the last decoder output is the feature map.

    `features` (six counts, the last one the decoder output) are scaled by `width`.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        width: float = 1.0,
        spatial_dims: int = 2,
        features: Sequence[int] = BASICUNET_FEATURES,
        dropout: float = 0.0,
        norm: str | Sequence[Any] = AFFINE_INSTANCE_NORM,
    ):
        super().__init__()
        scaled = [scale_channels(c, width) for c in features]
        self.body = BasicUNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=num_classes,
            features=scaled,
            dropout=dropout,
            norm=_monai_layer_args(norm),
        )
        self.body.final_conv = nn.Identity()
        self.final_classifier = Conv[Conv.CONV, spatial_dims](scaled[-1], num_classes, 1)
