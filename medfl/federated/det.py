"""DET, deputy-enhanced transfer: the per-epoch state machine and the per-batch losses of P and D.

Each site trains a personalized model P and a deputy D. At the start of every local epoch a state is
chosen from the validation metric of both (``next_state``); the state decides which model distils from
which (``det_losses``). Pure tensor code: no files, configs or engines.
"""

from __future__ import annotations

import math
from enum import Enum

import torch.nn.functional as F
from torch import Tensor


class DetState(str, Enum):
    """The DET state of one site for one local epoch (START only precedes a round's first epoch)."""

    START = "start"
    RECOVER = "recover"
    EXCHANGE = "exchange"
    SUBLIMATE = "sublimate"


def check_thresholds(lambda1: float, lambda2: float) -> None:
    """Raise ValueError unless 0 < lambda1 < lambda2 < 1."""
    if not 0.0 < lambda1 < lambda2 < 1.0:
        raise ValueError(
            f"DET thresholds must satisfy 0 < lambda1 < lambda2 < 1, got {lambda1} and {lambda2}"
        )


def _nan_to_zero(value: float) -> float:
    value = float(value)
    return 0.0 if math.isnan(value) else value


def next_state(
    previous: DetState, phi_p: float, phi_d: float, lambda1: float, lambda2: float
) -> DetState:
    """The state of the coming epoch from the previous one and the validation metrics of P and D.

    1. previous is START, or phi_d < lambda1 * phi_p: RECOVER.
    2. else previous is RECOVER, or phi_d < lambda2 * phi_p: EXCHANGE.
    3. else SUBLIMATE (only reachable from EXCHANGE or SUBLIMATE).
    A NaN metric counts as 0; equality passes a threshold.
    """
    check_thresholds(lambda1, lambda2)
    previous = DetState(previous)
    phi_p, phi_d = _nan_to_zero(phi_p), _nan_to_zero(phi_d)
    if previous is DetState.START or phi_d < lambda1 * phi_p:
        return DetState.RECOVER
    if previous is DetState.RECOVER or phi_d < lambda2 * phi_p:
        return DetState.EXCHANGE
    return DetState.SUBLIMATE


def distillation_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(teacher || student) over the class dimension 1, with the teacher detached.

    Summed over classes and averaged over everything else: batchmean for (N, C) logits, the mean over
    batch and pixels for segmentation logits (N, C, *spatial). With a temperature other than 1 both
    distributions are softened by it and the result is scaled by temperature**2 (Hinton et al.), so that
    gradient magnitudes stay comparable across temperatures.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits differ in shape: {tuple(student_logits.shape)} "
            f"vs {tuple(teacher_logits.shape)}"
        )
    if student_logits.ndim < 2:
        raise ValueError(f"logits need a class dimension 1, got shape {tuple(student_logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"distillation temperature must be > 0, got {temperature}")
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    per_element = F.kl_div(log_student, log_teacher, reduction="none", log_target=True)
    kl = per_element.sum(dim=1).mean()
    if temperature != 1.0:
        kl = kl * temperature**2
    return kl


def det_losses(
    state: DetState,
    logits_p: Tensor,
    logits_d: Tensor,
    loss_p: Tensor,
    loss_d: Tensor,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """The losses of P and of D for one batch in ``state`` (``loss_p``/``loss_d`` are the supervised losses).

    RECOVER: D learns from P. EXCHANGE: each learns from the other. SUBLIMATE: P learns from D.
    The teacher of each KL term is detached, so no gradient crosses from one model's loss into the other.
    """
    state = DetState(state)
    if state is DetState.START:
        raise ValueError("START is not a training state: call next_state first")
    total_p, total_d = loss_p, loss_d
    if state in (DetState.EXCHANGE, DetState.SUBLIMATE):
        total_p = loss_p + distillation_kl(logits_p, logits_d, temperature)
    if state in (DetState.RECOVER, DetState.EXCHANGE):
        total_d = loss_d + distillation_kl(logits_d, logits_p, temperature)
    return total_p, total_d
