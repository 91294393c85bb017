"""The supervised losses without CPA: cross-entropy, and MONAI's Dice + cross-entropy for segmentation.

Every loss module takes (logits, target, gamma=None); gamma (CPA's refinement weights) only concerns CPA.
"""

from __future__ import annotations

import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import Tensor, nn

from medfl.federated.cpa import foreground_target


def dice_ce(ce_weight: float = 1.0) -> DiceCELoss:
    """Soft Dice on the foreground (the batch as one volume, so slices without prostate do not each count as
    a failed Dice) plus `ce_weight` x cross-entropy, on background/foreground logits."""
    return DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True, lambda_ce=ce_weight)


class CrossEntropy(nn.Module):
    """Classification: plain cross-entropy (the baselines' loss and the CE ablation of the method)."""

    def set_class_counts(self, class_counts: Tensor) -> None:
        """Cross-entropy does not weigh classes: the federation's counts change nothing."""

    def forward(self, logits: Tensor, target: Tensor, gamma: Tensor | None = None) -> Tensor:
        return F.cross_entropy(logits, target)


class CrossEntropyDice(nn.Module):
    """Segmentation without CPA: cross-entropy + soft Dice on the foreground (values > 0 of the mask)."""

    def __init__(self) -> None:
        super().__init__()
        self.loss = dice_ce()

    def set_class_counts(self, class_counts: Tensor) -> None:
        """Cross-entropy and Dice do not weigh classes: the federation's counts change nothing."""

    def forward(self, logits: Tensor, target: Tensor, gamma: Tensor | None = None) -> Tensor:
        binary = foreground_target(target)
        if binary.ndim == logits.ndim - 1:
            binary = binary.unsqueeze(1)
        return self.loss(logits, binary)
