"""One local epoch for every method: the supervised loss, DET or mutual distillation, FedProx and FedProto terms.

The site decides *what* to train (which models, which DET state, which extra terms); this module does
the batch loop. It reads no files and knows no engine.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from monai.data import get_track_meta, set_track_meta
from monai.losses import DiceLoss
from torch import Tensor, nn

from medfl.errors import MedflError
from medfl.federated.cpa import CPALoss, PrototypeAccumulator, SegmentationCPALoss, foreground_target
from medfl.federated.det import DetState, det_losses


@contextmanager
def plain_tensors() -> Iterator[None]:
    """Run the random tail of MONAI transforms on plain tensors, without MetaTensor bookkeeping.

    The cached head of a recipe needs metadata (channel-first detection), the per-batch tail does not;
    dropping it there makes data loading about three times faster.
    """
    previous = get_track_meta()
    set_track_meta(False)
    try:
        yield
    finally:
        set_track_meta(previous)


class TrainingDiverged(MedflError):
    """A loss became NaN or infinite: the run stops and keeps its last good checkpoint."""


class SupervisedLoss(nn.Module):
    """The supervised loss l of algorithm.md: CPA or cross-entropy; segmentation adds soft Dice.

    Classification: CPA (``kind="cpa"``) or CE. Segmentation: 0.5 CPA + 0.5 CE + Dice, or CE + Dice for
    ``kind="ce"`` (CPA's half replaced by CE), on background/prostate logits.
    """

    def __init__(self, task: str, kind: str, class_counts: Tensor, beta: float = 0.8):
        super().__init__()
        if kind not in ("cpa", "ce"):
            raise ValueError(f"loss kind must be 'cpa' or 'ce', got '{kind}'")
        self.task, self.kind = task, kind
        if kind == "cpa":
            self.cpa = SegmentationCPALoss(class_counts, beta) if task == "segmentation" else CPALoss(class_counts, beta)
        elif task == "segmentation":
            self.dice = DiceLoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)

    def set_class_counts(self, class_counts: Tensor) -> None:
        """The server's global class counts (CPA's mitigation factors); CE ignores them."""
        if self.kind == "cpa":
            self.cpa.set_class_counts(class_counts)

    def forward(self, logits: Tensor, target: Tensor, gamma: Tensor | None = None) -> Tensor:
        if self.kind == "cpa":
            return self.cpa(logits, target, gamma)
        if self.task == "classification":
            return F.cross_entropy(logits, target)
        binary = foreground_target(target)
        if binary.ndim == logits.ndim:
            binary = binary[:, 0]
        return F.cross_entropy(logits, binary) + self.dice(logits, binary.unsqueeze(1))


@dataclass
class EpochPlan:
    """What one local epoch does, decided by the site from the method's switches and the round."""

    state: DetState | None = None  # two-model methods: DET state (FML: always EXCHANGE)
    gamma: Tensor | None = None  # CPA refinement weights, None during warm-up
    temperature: float = 1.0
    proximal_mu: float = 0.0  # FedProx: mu/2 ||w - w_received||^2
    received: Mapping[str, Tensor] | None = None  # FedProx: the weights received this round
    prototype_weight: float = 0.0  # FedProto: weight of the distance to the global prototypes
    global_prototypes: Tensor | None = None
    global_present: Tensor | None = None
    trainable: Iterable[str] | None = None  # FedRep: names of the parameters that learn (None: all)
    accumulator: PrototypeAccumulator | None = None  # collects the used model's features this epoch
    losses: dict[str, float] = field(default_factory=dict)


def batch_labels(batch: Mapping[str, Tensor], task: str, device: torch.device) -> Tensor:
    """Class indices: (N,) for classification, (N, *spatial) binary masks for segmentation."""
    label = torch.as_tensor(batch["label"]).to(device)
    if task == "classification":
        return label.reshape(-1).long()
    if label.ndim >= 4 and label.shape[1] == 1:
        label = label[:, 0]
    return foreground_target(label)


def proximal_term(model: nn.Module, received: Mapping[str, Tensor]) -> Tensor:
    """sum ||w - w_received||^2 over the model's parameters that were received."""
    terms = [
        (param - received[name].to(param.device, param.dtype)).pow(2).sum()
        for name, param in model.named_parameters()
        if name in received
    ]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def prototype_distance(features: Tensor, labels: Tensor, prototypes: Tensor, present: Tensor) -> Tensor:
    """FedProto's regulariser: mean squared distance of features to their class's global prototype.

    Segmentation feature maps are compared per pixel, with the mask resized by nearest neighbour.
    Classes without a global prototype contribute nothing.
    """
    if features.ndim > 2:
        if labels.shape[1:] != features.shape[2:]:
            labels = F.interpolate(labels[:, None].float(), size=features.shape[2:], mode="nearest")[:, 0].long()
        features = features.movedim(1, -1).reshape(-1, features.shape[1])
        labels = labels.reshape(-1)
    keep = present.to(labels.device)[labels]
    if not bool(keep.any()):
        return features.sum() * 0.0
    target = prototypes.to(features.device, features.dtype)[labels[keep]]
    return F.mse_loss(features[keep], target)


def _check_finite(loss: Tensor, what: str) -> None:
    if not math.isfinite(float(loss.detach())):
        raise TrainingDiverged(f"{what} loss is {float(loss.detach())}")


def _batch_losses(
    models: Mapping[str, nn.Module],
    outputs: Mapping[str, tuple[Tensor, Tensor]],
    labels: Tensor,
    loss_fn: SupervisedLoss,
    plan: EpochPlan,
    used: str,
) -> dict[str, Tensor]:
    """Each model's loss on one batch: supervised, plus DET's KL terms, FedProx's and FedProto's terms."""
    losses = {name: loss_fn(logits.float(), labels, plan.gamma) for name, (logits, _) in outputs.items()}
    if len(models) == 2:
        losses["P"], losses["D"] = det_losses(
            plan.state or DetState.EXCHANGE, outputs["P"][0].float(), outputs["D"][0].float(),
            losses["P"], losses["D"], plan.temperature,
        )
    if plan.proximal_mu and plan.received is not None:
        losses[used] = losses[used] + 0.5 * plan.proximal_mu * proximal_term(models[used], plan.received)
    if plan.prototype_weight and plan.global_prototypes is not None:
        losses[used] = losses[used] + plan.prototype_weight * prototype_distance(
            outputs[used][1].float(), labels, plan.global_prototypes, plan.global_present
        )
    return losses


def train_epoch(
    models: Mapping[str, nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer],
    loader: Iterable[Mapping[str, Tensor]],
    loss_fn: SupervisedLoss,
    plan: EpochPlan,
    task: str,
    device: torch.device,
    mixed_precision: bool = False,
) -> dict[str, float]:
    """Train ``models`` ({"P": p, "D": d} or {"M": m}) for one pass over ``loader``; mean loss per model.

    Two models step on the same batch with the losses of DET's table for ``plan.state``; the teacher of
    each KL term is detached, so one backward pass over the sum trains each model on its own loss only.
    The used model (P, or M) feeds ``plan.accumulator`` with detached features for CPA's prototypes.
    """
    used = "P" if "P" in models else "M"
    for model in models.values():
        model.train()
    trainable = set(plan.trainable) if plan.trainable is not None else None
    if trainable is not None:
        for name, param in models[used].named_parameters():
            param.requires_grad_(name in trainable)
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if mixed_precision and device.type == "cuda" else nullcontext()
    totals = dict.fromkeys(models, 0.0)
    batches = 0
    try:
        with plain_tensors():
            for batch in loader:
                images = torch.as_tensor(batch["image"]).to(device, non_blocking=True)
                labels = batch_labels(batch, task, device)
                with autocast:
                    outputs = {name: model(images) for name, model in models.items()}
                    losses = _batch_losses(models, outputs, labels, loss_fn, plan, used)
                for name, loss in losses.items():
                    _check_finite(loss, f"model {name}")
                for optimizer in optimizers.values():
                    optimizer.zero_grad(set_to_none=True)
                sum(losses.values()).backward()
                for optimizer in optimizers.values():
                    optimizer.step()
                if plan.accumulator is not None:
                    plan.accumulator.update(outputs[used][1].float(), labels)
                for name, loss in losses.items():
                    totals[name] += float(loss.detach())
                batches += 1
    finally:
        if trainable is not None:
            for param in models[used].parameters():
                param.requires_grad_(True)
    if batches == 0:
        raise TrainingDiverged("the training split gave no batch")
    return {name: total / batches for name, total in totals.items()}
