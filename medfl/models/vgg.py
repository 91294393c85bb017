"""Slim VGG-16 with BatchNorm: the reference classification network of the dermoscopy experiments.

The reference network has no biases anywhere. A classifier bias is a class prior: averaging it across
sites with very different class mixes is a deviation, so ``bias=False`` is the default and the biased
linear layers stay an option.
"""

from __future__ import annotations

import torch
from monai.networks.layers.factories import Conv, Norm, Pool
from torch import nn

from medfl.models.base import FeatureNet, scale_channels

# Output channels of the 13 convolutions, block by block; a 2x max-pool follows every block.
VGG16_BLOCKS: tuple[tuple[int, ...], ...] = (
    (32, 32),
    (64, 64),
    (128, 128, 128),
    (128, 128, 128),
    (256, 256, 256),
)
FEATURE_DIM = 64


class SlimVGG16(FeatureNet):
    """13 bias-free 3x3 convs (BN + ReLU each, max-pool per block), global average pool, fc -> 64 + BN + ReLU.

    The final classifier is fc(64 -> classes); the 64-d vector before it are the features. `width` scales
    every channel count, the 64-d feature layer included. `bias` gives both linear layers a bias (the
    reference has none).
    """

    def __init__(
        self, num_classes: int, in_channels: int, width: float = 1.0, spatial_dims: int = 2, bias: bool = False
    ):
        super().__init__()
        conv, norm, pool = (
            Conv[Conv.CONV, spatial_dims],
            Norm[Norm.BATCH, spatial_dims],
            Pool[Pool.MAX, spatial_dims],
        )
        layers: list[nn.Module] = []
        channels = in_channels
        for block in VGG16_BLOCKS:
            for out in block:
                out = scale_channels(out, width)
                layers += [conv(channels, out, 3, padding=1, bias=False), norm(out), nn.ReLU(inplace=True)]
                channels = out
            layers.append(pool(2))
        self.features = nn.Sequential(*layers)
        self.pool = Pool[Pool.ADAPTIVEAVG, spatial_dims](1)
        feature_dim = scale_channels(FEATURE_DIM, width)
        self.embedding = nn.Sequential(
            nn.Linear(channels, feature_dim, bias=bias), nn.BatchNorm1d(feature_dim), nn.ReLU(inplace=True)
        )
        self.final_classifier = nn.Linear(feature_dim, num_classes, bias=bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding(torch.flatten(self.pool(self.features(x)), 1))
