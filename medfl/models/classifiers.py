"""MONAI classification networks rewired to return (logits, pooled features).

Each MONAI net keeps its body; its own last linear layer is replaced by an identity, and a separate
nn.Linear(features, classes) becomes the final classifier, so PFA can aggregate it class by class.
`width` scales the channel counts where MONAI allows it, so that tests can use tiny networks.
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.nets import DenseNet, EfficientNet, ResNet
from monai.networks.nets.efficientnet import efficientnet_params
from monai.networks.nets.resnet import get_inplanes
from torch import nn

from medfl.models.base import FeatureNet, scale_channels

# EfficientNet-B0's block definitions, as monai.networks.nets.EfficientNetBN writes them.
EFFICIENTNET_B0_BLOCKS: tuple[str, ...] = (
    "r1_k3_s11_e1_i32_o16_se0.25",
    "r2_k3_s22_e6_i16_o24_se0.25",
    "r2_k5_s22_e6_i24_o40_se0.25",
    "r3_k3_s22_e6_i40_o80_se0.25",
    "r3_k5_s11_e6_i80_o112_se0.25",
    "r4_k5_s22_e6_i112_o192_se0.25",
    "r1_k3_s11_e6_i192_o320_se0.25",
)


class DenseNet121Net(FeatureNet):
    """monai DenseNet121 (block config 6-12-24-16); width scales init_features (64) and growth_rate (32)."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        width: float = 1.0,
        spatial_dims: int = 2,
        dropout_prob: float = 0.0,
    ):
        super().__init__()
        self.body = DenseNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=num_classes,
            init_features=scale_channels(64, width),
            growth_rate=scale_channels(32, width),
            block_config=(6, 12, 24, 16),
            dropout_prob=dropout_prob,
        )
        feature_dim = self.body.class_layers.out.in_features
        self.body.class_layers.out = nn.Identity()
        self.final_classifier = nn.Linear(feature_dim, num_classes)


class EfficientNetB0Net(FeatureNet):
    """monai EfficientNet with B0's blocks and coefficients, not pretrained; width multiplies B0's width.

    The features are the pooled head activations after MONAI's dropout (the classifier's input).
    """

    def __init__(self, num_classes: int, in_channels: int, width: float = 1.0, spatial_dims: int = 2):
        super().__init__()
        width_coefficient, depth_coefficient, image_size, dropout_rate, drop_connect_rate = (
            efficientnet_params["efficientnet-b0"]
        )
        self.body = EfficientNet(
            blocks_args_str=list(EFFICIENTNET_B0_BLOCKS),
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            num_classes=num_classes,
            width_coefficient=width_coefficient * width,
            depth_coefficient=depth_coefficient,
            dropout_rate=dropout_rate,
            image_size=image_size,
            drop_connect_rate=drop_connect_rate,
        )
        feature_dim = self.body._fc.in_features
        self.body._fc = nn.Identity()
        self.final_classifier = nn.Linear(feature_dim, num_classes)


class ResNet18Net(FeatureNet):
    """monai ResNet with resnet18's basic blocks (2-2-2-2); width scales block_inplanes (64-128-256-512).

    The first convolution has stride `conv1_t_stride` (default 2, as in the usual 2-D ResNet-18; MONAI's
    own default of 1 comes from 3-D Med3D and quadruples the cost on 2-D images).
    """

    min_input_size = 8

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        width: float = 1.0,
        spatial_dims: int = 2,
        conv1_t_stride: int | Sequence[int] = 2,
    ):
        super().__init__()
        block_inplanes = [scale_channels(c, width) for c in get_inplanes()]
        self.body = ResNet(
            block="basic",
            layers=[2, 2, 2, 2],
            block_inplanes=block_inplanes,
            spatial_dims=spatial_dims,
            n_input_channels=in_channels,
            conv1_t_stride=conv1_t_stride,
            feed_forward=False,
        )
        self.final_classifier = nn.Linear(block_inplanes[-1], num_classes)
