"""DET: state transitions of algorithm.md's rules 1-3 and the losses of P and D per state."""

from __future__ import annotations

import math

import pytest
import torch

from medfl.federated.det import DetState, det_losses, distillation_kl, next_state

S, R, X, U = DetState.START, DetState.RECOVER, DetState.EXCHANGE, DetState.SUBLIMATE


@pytest.mark.parametrize(
    ("previous", "phi_p", "phi_d", "expected"),
    [
        # START always gives Recover, whatever the metrics.
        (S, 0.5, 0.9, R),
        (S, 0.0, 0.0, R),
        (S, 0.8, 0.1, R),
        # Rule 1: D far behind P -> Recover, from any state (fall-backs included).
        (R, 1.0, 0.69, R),
        (X, 1.0, 0.69, R),
        (U, 1.0, 0.69, R),
        # Rule 2: from Recover, D past lambda1 -> Exchange, even when it is past lambda2.
        (R, 1.0, 0.70, X),
        (R, 1.0, 0.95, X),
        # Rule 2: from Exchange/Sublimate, between the thresholds -> Exchange (Sublimate falls back).
        (X, 1.0, 0.80, X),
        (U, 1.0, 0.80, X),
        # Rule 3: past lambda2 from Exchange/Sublimate -> Sublimate; equality passes.
        (X, 1.0, 0.90, U),
        (U, 1.0, 0.95, U),
        (X, 0.5, 0.45, U),
    ],
)
def test_transition_table(previous: DetState, phi_p: float, phi_d: float, expected: DetState) -> None:
    assert next_state(previous, phi_p, phi_d, 0.7, 0.9) is expected


def test_equality_at_lambda1_passes() -> None:
    assert next_state(R, 0.5, 0.35, 0.7, 0.9) is X
    assert next_state(X, 0.5, 0.35, 0.7, 0.9) is X


def test_phi_p_zero_lets_d_pass_every_threshold() -> None:
    assert next_state(R, 0.0, 0.0, 0.7, 0.9) is X
    assert next_state(X, 0.0, 0.0, 0.7, 0.9) is U


def test_nan_counts_as_zero() -> None:
    assert next_state(X, math.nan, 0.3, 0.7, 0.9) is U
    assert next_state(X, 0.8, math.nan, 0.7, 0.9) is R
    assert next_state(R, math.nan, math.nan, 0.7, 0.9) is X


def test_custom_thresholds_and_string_states() -> None:
    assert next_state("exchange", 1.0, 0.55, lambda1=0.5, lambda2=0.6) is X
    assert next_state("exchange", 1.0, 0.6, lambda1=0.5, lambda2=0.6) is U
    assert DetState("sublimate") is U and U.value == "sublimate"


@pytest.mark.parametrize(("lambda1", "lambda2"), [(0.9, 0.7), (0.7, 0.7), (0.0, 0.5), (0.5, 1.0)])
def test_invalid_thresholds(lambda1: float, lambda2: float) -> None:
    with pytest.raises(ValueError, match="lambda1"):
        next_state(R, 1.0, 1.0, lambda1=lambda1, lambda2=lambda2)


def test_kl_of_identical_predictions_is_zero() -> None:
    logits = torch.randn(4, 3)
    assert distillation_kl(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-7)
    seg = torch.randn(2, 2, 5, 5)
    assert distillation_kl(seg, seg.clone(), temperature=2.0).item() == pytest.approx(0.0, abs=1e-7)


def test_kl_matches_hand_formula_classification() -> None:
    student, teacher = torch.randn(5, 3), torch.randn(5, 3)
    t, s = teacher.softmax(1), student.softmax(1)
    expected = (t * (t.log() - s.log())).sum() / 5
    assert distillation_kl(student, teacher).item() == pytest.approx(expected.item(), rel=1e-5)


def test_kl_segmentation_is_per_pixel_mean() -> None:
    student, teacher = torch.randn(2, 3, 4, 6), torch.randn(2, 3, 4, 6)
    flat_s = student.movedim(1, -1).reshape(-1, 3)
    flat_t = teacher.movedim(1, -1).reshape(-1, 3)
    assert distillation_kl(student, teacher).item() == pytest.approx(
        distillation_kl(flat_s, flat_t).item(), rel=1e-5
    )


def test_temperature_scaling() -> None:
    student, teacher = torch.randn(6, 4), torch.randn(6, 4)
    expected = distillation_kl(student / 3.0, teacher / 3.0) * 9.0
    assert distillation_kl(student, teacher, temperature=3.0).item() == pytest.approx(
        expected.item(), rel=1e-5
    )


def test_kl_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="shape"):
        distillation_kl(torch.randn(2, 3), torch.randn(2, 4))


def _two_models() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    p_params = torch.randn(4, 3, requires_grad=True)
    d_params = torch.randn(4, 3, requires_grad=True)
    return p_params, d_params, p_params * 1.0, d_params * 1.0


@pytest.mark.parametrize(
    ("state", "p_gets_kl", "d_gets_kl"),
    [(R, False, True), (X, True, True), (U, True, False)],
)
def test_loss_table_and_gradient_flow(state: DetState, p_gets_kl: bool, d_gets_kl: bool) -> None:
    p_params, d_params, logits_p, logits_d = _two_models()
    zero = torch.zeros(())
    loss_p, loss_d = det_losses(state, logits_p, logits_d, zero, zero)
    kl_p = distillation_kl(logits_p, logits_d).item()
    kl_d = distillation_kl(logits_d, logits_p).item()
    assert loss_p.item() == pytest.approx(kl_p if p_gets_kl else 0.0)
    assert loss_d.item() == pytest.approx(kl_d if d_gets_kl else 0.0)
    # P's loss never reaches D and D's loss never reaches P: each teacher is detached.
    if loss_p.requires_grad:
        loss_p.backward()
        assert d_params.grad is None
        assert p_params.grad is not None and p_params.grad.abs().sum() > 0
    else:
        assert not p_gets_kl
    p_params.grad = None
    if loss_d.requires_grad:
        loss_d.backward()
        assert p_params.grad is None
        assert d_params.grad is not None and d_params.grad.abs().sum() > 0
    else:
        assert not d_gets_kl


def test_supervised_losses_are_kept() -> None:
    _, _, logits_p, logits_d = _two_models()
    loss_p, loss_d = det_losses(R, logits_p, logits_d, torch.tensor(1.5), torch.tensor(2.0))
    assert loss_p.item() == pytest.approx(1.5)
    assert loss_d.item() == pytest.approx(2.0 + distillation_kl(logits_d, logits_p).item())
    loss_p, loss_d = det_losses(U, logits_p, logits_d, torch.tensor(1.5), torch.tensor(2.0))
    assert loss_p.item() == pytest.approx(1.5 + distillation_kl(logits_p, logits_d).item())
    assert loss_d.item() == pytest.approx(2.0)


def test_segmentation_losses_shapes() -> None:
    logits_p = torch.randn(2, 2, 8, 8, requires_grad=True)
    logits_d = torch.randn(2, 2, 8, 8, requires_grad=True)
    loss_p, loss_d = det_losses(X, logits_p, logits_d, torch.zeros(()), torch.zeros(()))
    assert loss_p.ndim == 0 and loss_d.ndim == 0
    assert loss_p.item() > 0 and loss_d.item() > 0


def test_start_is_not_a_training_state() -> None:
    with pytest.raises(ValueError, match="START"):
        det_losses(S, torch.randn(2, 3), torch.randn(2, 3), torch.zeros(()), torch.zeros(()))
