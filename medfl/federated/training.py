"""One local epoch for every method: the supervised loss, DET or mutual distillation, FedProx's and Ditto's proximal
terms, FedProto's term.

The site decides *what* to train (which models, which DET state, which extra terms); this module does
the batch loop. It reads no files and knows no engine.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medfl.data.tensors import plain_tensors
from medfl.errors import MedflError
from medfl.federated.cpa import PrototypeAccumulator
from medfl.federated.det import DetState, det_losses
from medfl.methods import ModelRole

if TYPE_CHECKING:
    from medfl.tasks import Task


class TrainingDiverged(MedflError):
    """A loss became NaN or infinite: the run stops and keeps its last good checkpoint."""


@dataclass
class EpochPlan:
    """What one local epoch does, decided by the site from the method's switches and the round."""

    state: DetState | None = None  # DET's state (FML: always EXCHANGE); None: P and D do not teach each other
    gamma: Tensor | None = None  # CPA refinement weights, None during warm-up
    temperature: float = 1.0
    proximal_mu: float = 0.0  # mu/2 ||w - w_received||^2 on the used model: FedProx's mu (M), Ditto's lambda (P)
    received: Mapping[str, Tensor] | None = None  # FedProx, Ditto: the weights received this round
    prototype_weight: float = 0.0  # FedProto: weight of the distance to the global prototypes
    global_prototypes: Tensor | None = None
    global_present: Tensor | None = None
    trainable: Iterable[str] | None = None  # FedRep: names of the parameters that learn (None: all)
    accumulator: PrototypeAccumulator | None = None  # collects the used model's features this epoch
    losses: dict[str, float] = field(default_factory=dict)


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
    loss_fn: nn.Module,
    plan: EpochPlan,
    used: str,
) -> dict[str, Tensor]:
    """Each model's loss on one batch: supervised, plus DET's KL terms, the proximal term (FedProx, Ditto) and
    FedProto's term."""
    losses = {name: loss_fn(logits.float(), labels, plan.gamma) for name, (logits, _) in outputs.items()}
    if len(models) == 2 and plan.state is not None:
        p, d = ModelRole.PERSONALIZED, ModelRole.DEPUTY
        losses[p], losses[d] = det_losses(
            plan.state, outputs[p][0].float(), outputs[d][0].float(),
            losses[p], losses[d], plan.temperature,
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
    loss_fn: nn.Module,
    plan: EpochPlan,
    task: Task,
    device: torch.device,
    mixed_precision: bool = False,
) -> dict[str, float]:
    """Train ``models`` ({P: p, D: d} or {M: m}, by ModelRole) for one pass over ``loader``; mean loss per model.

    Two models step on the same batch with the losses of DET's table for ``plan.state`` (none: each its own
    loss, as Ditto's); the teacher of each KL term and the proximal term's reference are detached, so one backward
    pass over the sum trains each model on its own loss only.
    The used model (P, or M) feeds ``plan.accumulator`` with detached features for CPA's prototypes.
    """
    used = ModelRole.PERSONALIZED if ModelRole.PERSONALIZED in models else ModelRole.SINGLE
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
                labels = task.batch_labels(batch, device)  # (N,) classes or (N, *spatial) masks
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
