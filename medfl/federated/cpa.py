"""CPA, the conjoint prototype-aligned loss: mitigation factors, prototypes and refinement weights.

The global class counts give mitigation factors s_ij that stop head-class samples from pushing the
logits of rarer classes down as hard as plain cross-entropy does. Prototypes (mean penultimate features
per class) are accumulated at each site and averaged by the server; a site whose prototype of a class
disagrees with the federation's gets a larger weight gamma_c on that class. Pure tensor code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import Tensor, nn


def mitigation_factors(class_counts: Tensor, beta: float) -> Tensor:
    """Matrix s (C, C) with s[i, j] = (N_j / N_i) ** beta if N_i > N_j else 1, in float64.

    Row i belongs to the target class i. A class with count 0 never divides (it is never the larger of a
    pair), and a zero count as N_j gives s = 0: that class's logit does not enter row i at all.
    """
    if not beta >= 0:
        raise ValueError(f"CPA beta must be >= 0, got {beta}")
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    if counts.ndim != 1 or counts.numel() == 0:
        raise ValueError(f"class counts must be a non-empty vector, got shape {tuple(counts.shape)}")
    if not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()):
        raise ValueError(f"class counts must be finite and >= 0, got {counts.tolist()}")
    n_i, n_j = counts[:, None], counts[None, :]
    larger = n_i > n_j
    ratio = n_j / torch.where(larger, n_i, torch.ones_like(n_i))
    return torch.where(larger, ratio.pow(beta), torch.ones_like(ratio))


def _flatten_logits(logits: Tensor) -> Tensor:
    """(N, C) or (N, C, *spatial) -> (M, C), one row per sample or pixel."""
    if logits.ndim < 2:
        raise ValueError(f"logits need a class dimension 1, got shape {tuple(logits.shape)}")
    return logits.movedim(1, -1).reshape(-1, logits.shape[1])


def _flatten_target(target: Tensor, logits: Tensor) -> Tensor:
    """Class indices (N,), (N, *spatial) or (N, 1, *spatial) -> (M,) long, checked against the logits."""
    expected = (logits.shape[0], *logits.shape[2:])
    if tuple(target.shape) != expected:
        if target.ndim == logits.ndim and target.shape[1] == 1:
            target = target.squeeze(1)
        if tuple(target.shape) != expected:
            raise ValueError(
                f"target shape {tuple(target.shape)} does not fit logits shape {tuple(logits.shape)}"
            )
    return target.reshape(-1).long()


class CPALoss(nn.Module):
    """Mean over samples (pixels) of -gamma_y * log p_hat_y, the conjoint prototype-aligned loss.

    p_hat_y = exp(z_y) / (exp(z_y) + sum_{j != y} s_yj exp(z_j)), computed in log space as
    z_y - logsumexp_j(z_j + log s_yj) so that large logits and zero factors stay finite. With equal class
    counts and gamma = 1 it is exactly cross-entropy.
    """

    log_factors: Tensor

    def __init__(self, class_counts: Tensor, beta: float):
        super().__init__()
        self.beta = beta
        self.register_buffer("log_factors", torch.empty(0), persistent=False)
        self.set_class_counts(class_counts)

    @property
    def num_classes(self) -> int:
        return int(self.log_factors.shape[0])

    def set_class_counts(self, class_counts: Tensor) -> None:
        """Replace the global class counts (the server sends new ones each round)."""
        device = self.log_factors.device
        self.log_factors = mitigation_factors(class_counts, self.beta).log().to(device=device)

    def forward(self, logits: Tensor, target: Tensor, gamma: Tensor | None = None) -> Tensor:
        z = _flatten_logits(logits)
        y = _flatten_target(target, logits)
        if z.shape[1] != self.num_classes:
            raise ValueError(f"logits have {z.shape[1]} classes, the class counts {self.num_classes}")
        log_s = self.log_factors.to(device=z.device, dtype=z.dtype)[y]
        log_p_hat = z.gather(1, y[:, None]).squeeze(1) - torch.logsumexp(z + log_s, dim=1)
        if gamma is None:
            return -log_p_hat.mean()
        gamma = gamma.detach().to(device=z.device, dtype=z.dtype)
        if gamma.shape != (self.num_classes,):
            raise ValueError(f"gamma must have shape ({self.num_classes},), got {tuple(gamma.shape)}")
        return -(gamma[y] * log_p_hat).mean()


def foreground_target(target: Tensor) -> Tensor:
    """Binary class indices of a segmentation mask: every value > 0 (all zones merged) is foreground."""
    return (target > 0).long()


class SegmentationCPALoss(nn.Module):
    """0.5 * CPA + 0.5 * cross-entropy + 1.0 * soft Dice on the foreground, for background/foreground logits.

    Targets are masks (N, *spatial) or (N, 1, *spatial); values > 0 are foreground. The Dice term is
    MONAI's DiceLoss over the batch as one volume (``batch=True``) so that slices without foreground do
    not each count as a failed Dice.
    """

    def __init__(self, class_counts: Tensor, beta: float):
        super().__init__()
        self.cpa = CPALoss(class_counts, beta)
        if self.cpa.num_classes != 2:
            raise ValueError(
                f"segmentation CPA expects 2 classes (background, foreground), got {self.cpa.num_classes}"
            )
        # MONAI's DiceCELoss(lambda_ce=0.5) sums the same terms in another order: the loss differs in its last
        # bits and training drifts by ~1e-5 in Dice within two rounds, so the terms are added as before.
        self.dice = DiceLoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)

    def set_class_counts(self, class_counts: Tensor) -> None:
        """Replace the global (pixel) class counts."""
        self.cpa.set_class_counts(class_counts)

    def forward(self, logits: Tensor, target: Tensor, gamma: Tensor | None = None) -> Tensor:
        if logits.ndim < 3:
            raise ValueError(f"segmentation logits need spatial dimensions, got shape {tuple(logits.shape)}")
        binary = foreground_target(target)
        if binary.ndim == logits.ndim - 1:
            binary = binary.unsqueeze(1)
        cpa = self.cpa(logits, binary, gamma)
        ce = F.cross_entropy(logits, binary.squeeze(1))
        return 0.5 * cpa + 0.5 * ce + self.dice(logits, binary)


class PrototypeAccumulator:
    """Per-class sums and counts of detached features over one epoch, giving a site's local prototypes.

    Classification: features (N, F) with labels (N,). Segmentation: feature maps (N, F, *spatial) with
    masks of class indices (N, *spatial) or (N, 1, *spatial) at any resolution, resized by nearest
    neighbour to the feature map, counted per pixel. Sums are kept in float64.
    """

    def __init__(self, num_classes: int):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self._sums: Tensor | None = None
        self._counts: Tensor | None = None

    def reset(self) -> None:
        """Forget everything accumulated (call at the start of each epoch whose prototypes count)."""
        self._sums = None
        self._counts = None

    def update(self, features: Tensor, labels: Tensor) -> None:
        """Add a batch of features with their class labels (or masks)."""
        features = features.detach()
        if features.ndim < 2:
            raise ValueError(f"features need shape (N, F[, *spatial]), got {tuple(features.shape)}")
        labels = labels.detach()
        if features.ndim > 2:
            labels = self._resize_mask(labels, features)
        elif tuple(labels.shape) != (features.shape[0],):
            raise ValueError(
                f"labels shape {tuple(labels.shape)} does not fit features {tuple(features.shape)}"
            )
        flat_features = features.movedim(1, -1).reshape(-1, features.shape[1]).to(torch.float64)
        flat_labels = labels.reshape(-1).long().to(features.device)
        if flat_labels.numel() and (flat_labels.min() < 0 or flat_labels.max() >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got values outside")
        if self._sums is None or self._counts is None:
            self._sums = torch.zeros(
                self.num_classes, features.shape[1], dtype=torch.float64, device=features.device
            )
            self._counts = torch.zeros(self.num_classes, dtype=torch.int64, device=features.device)
        if self._sums.shape[1] != features.shape[1]:
            raise ValueError(f"feature size changed from {self._sums.shape[1]} to {features.shape[1]}")
        self._sums.index_add_(0, flat_labels, flat_features)
        self._counts += torch.bincount(flat_labels, minlength=self.num_classes)

    @staticmethod
    def _resize_mask(mask: Tensor, features: Tensor) -> Tensor:
        spatial = tuple(features.shape[2:])
        if mask.ndim == features.ndim - 1:
            mask = mask.unsqueeze(1)
        if mask.ndim != features.ndim or mask.shape[0] != features.shape[0] or mask.shape[1] != 1:
            raise ValueError(
                f"mask shape {tuple(mask.shape)} does not fit feature maps {tuple(features.shape)}"
            )
        if tuple(mask.shape[2:]) != spatial:
            mask = F.interpolate(mask.float(), size=spatial, mode="nearest")
        return mask.squeeze(1)

    def prototypes(self) -> tuple[Tensor, Tensor]:
        """(prototypes (C, F) float32, counts (C,) int64); an absent class has count 0 and a zero row."""
        if self._sums is None or self._counts is None:
            raise RuntimeError("no features accumulated")
        means = self._sums / self._counts.clamp(min=1)[:, None]
        return means.to(torch.float32), self._counts.clone()


def global_prototypes(
    prototypes: Sequence[Tensor],
    counts: Sequence[Tensor],
    mode: str = "mean",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Count-weighted mean of the sites' prototypes: (global (C, F), present (C,) bool).

    A class absent at a site (count 0) contributes nothing; a class absent everywhere is not present
    and has a zero row. Mode "gaussian" adds N(0, I) noise scaled per dimension by the standard deviation
    of the present sites' prototypes, that deviation clamped at >= 1 (the reference's choice). The noise
    is drawn on the CPU from ``generator`` so that a saved generator state reproduces it.
    """
    if mode not in ("mean", "gaussian"):
        raise ValueError(f"prototype mode must be 'mean' or 'gaussian', got '{mode}'")
    if len(prototypes) == 0 or len(prototypes) != len(counts):
        raise ValueError(
            f"need one count vector per prototype matrix, got {len(prototypes)} and {len(counts)}"
        )
    shapes = {tuple(p.shape) for p in prototypes}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"site prototypes must share one (C, F) shape, got {sorted(shapes)}")
    device, dtype = prototypes[0].device, prototypes[0].dtype
    stacked = torch.stack([p.to(device=device, dtype=torch.float64) for p in prototypes])  # (K, C, F)
    weights = torch.stack([torch.as_tensor(c, device=device, dtype=torch.float64) for c in counts])  # (K, C)
    if weights.shape != stacked.shape[:2]:
        raise ValueError(
            f"counts shape {tuple(weights.shape)} does not fit prototypes {tuple(stacked.shape)}"
        )
    if bool((weights < 0).any()):
        raise ValueError("prototype counts must be >= 0")
    stacked = torch.where(weights[..., None] > 0, stacked, torch.zeros_like(stacked))
    total = weights.sum(0)  # (C,)
    present = total > 0
    mean = (weights[..., None] * stacked).sum(0) / total.clamp(min=1e-300)[:, None]
    mean = torch.where(present[:, None], mean, torch.zeros_like(mean))
    if mode == "gaussian":
        mean = mean + _gaussian_noise(stacked, weights > 0, generator) * present[:, None]
    return mean.to(dtype), present


def _gaussian_noise(stacked: Tensor, site_has_class: Tensor, generator: torch.Generator | None) -> Tensor:
    """N(0, I) noise (C, F) scaled by the per-dimension std over the sites holding each class, at least 1."""
    mask = site_has_class[..., None].to(stacked.dtype)  # (K, C, 1)
    n = mask.sum(0).clamp(min=1)  # (C, 1)
    centre = (mask * stacked).sum(0) / n
    std = ((mask * (stacked - centre) ** 2).sum(0) / n).sqrt().clamp(min=1.0)
    noise = torch.randn(std.shape, generator=generator, dtype=torch.float64)
    return noise.to(stacked.device) * std


def refinement_weights(
    local: Tensor,
    local_counts: Tensor,
    global_: Tensor,
    global_present: Tensor,
    tau: float,
    gamma_max: float,
) -> Tensor:
    """gamma_c = (1 + tau) / (cos(mu_c, mu^g_c) + tau) per class, without gradient, in [1, gamma_max].

    gamma_c = 1 where either prototype is missing (count 0, not present) or zero. A denominator <= 0 (it
    can reach 0 with tau = 1 and signed features) means the strongest disagreement: gamma_max.
    """
    if not tau >= 0:
        raise ValueError(f"CPA tau must be >= 0, got {tau}")
    if not gamma_max >= 1:
        raise ValueError(f"CPA gamma_max must be >= 1, got {gamma_max}")
    if local.shape != global_.shape or local.ndim != 2:
        raise ValueError(
            f"local and global prototypes must share one (C, F) shape: {tuple(local.shape)}, "
            f"{tuple(global_.shape)}"
        )
    with torch.no_grad():
        mu = local.detach().to(torch.float64)
        mu_g = global_.detach().to(device=mu.device, dtype=torch.float64)
        norm, norm_g = mu.norm(dim=1), mu_g.norm(dim=1)
        valid = (
            (local_counts.to(mu.device) > 0)
            & global_present.to(mu.device).bool()
            & (norm > 0)
            & (norm_g > 0)
            & torch.isfinite(norm)
            & torch.isfinite(norm_g)
        )
        cos = (mu * mu_g).sum(1) / (norm * norm_g).clamp(min=1e-300)
        denominator = cos.clamp(-1.0, 1.0) + tau
        gamma = torch.where(
            denominator > 0, (1.0 + tau) / denominator.clamp(min=1e-300), torch.full_like(cos, gamma_max)
        )
        gamma = gamma.clamp(min=1.0, max=gamma_max)
        gamma = torch.where(valid, gamma, torch.ones_like(gamma))
    return gamma.to(local.dtype)
