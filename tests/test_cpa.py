"""CPA: mitigation factors, the loss, the segmentation loss, prototypes and refinement weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medfl.federated.cpa import (
    CPALoss,
    PrototypeAccumulator,
    SegmentationCPALoss,
    foreground_target,
    global_prototypes,
    mitigation_factors,
    refinement_weights,
)

# Global train counts (nv, bkl, mel) of the reference dermoscopy federation.
COUNTS = torch.tensor([5408, 941, 994])


def test_mitigation_factors_hand_values() -> None:
    s = mitigation_factors(COUNTS, beta=0.8)
    nv, bkl, mel = 0, 1, 2
    assert s[nv, bkl].item() == pytest.approx((941 / 5408) ** 0.8, rel=1e-12)
    assert s[nv, bkl].item() == pytest.approx(0.2469, abs=1e-4)
    assert s[nv, mel].item() == pytest.approx((994 / 5408) ** 0.8, rel=1e-12)
    assert s[mel, bkl].item() == pytest.approx((941 / 994) ** 0.8, rel=1e-12)
    for i, j in [(bkl, nv), (bkl, mel), (mel, nv), (nv, nv), (bkl, bkl), (mel, mel)]:
        assert s[i, j].item() == 1.0


def test_mitigation_factors_zero_counts_are_finite() -> None:
    s = mitigation_factors(torch.tensor([10, 0, 0]), 0.8)
    assert torch.isfinite(s).all()
    assert s[0, 1].item() == 0.0 and s[1, 0].item() == 1.0 and s[1, 2].item() == 1.0


def test_mitigation_factors_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="beta"):
        mitigation_factors(COUNTS, beta=-1.0)
    with pytest.raises(ValueError, match=">= 0"):
        mitigation_factors(torch.tensor([3, -1]), 0.8)


def test_equal_counts_and_unit_gamma_give_cross_entropy() -> None:
    torch.manual_seed(0)
    loss = CPALoss(torch.tensor([7, 7, 7]), 0.8)
    logits, target = torch.randn(8, 3), torch.randint(0, 3, (8,))
    expected = F.cross_entropy(logits, target)
    assert loss(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)
    assert loss(logits, target, torch.ones(3)).item() == pytest.approx(expected.item(), rel=1e-6)


def test_equal_counts_segmentation_give_cross_entropy() -> None:
    torch.manual_seed(1)
    loss = CPALoss(torch.tensor([50, 50]), 0.8)
    logits, target = torch.randn(2, 2, 6, 6), torch.randint(0, 2, (2, 6, 6))
    expected = F.cross_entropy(logits, target)
    assert loss(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)
    assert loss(logits, target[:, None]).item() == pytest.approx(expected.item(), rel=1e-6)


def test_loss_matches_direct_formula() -> None:
    torch.manual_seed(2)
    logits, target = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 2, 1])
    gamma = torch.tensor([1.0, 2.0, 3.5], dtype=torch.float64)
    s = mitigation_factors(COUNTS, 0.8)
    expected = 0.0
    for z, y in zip(logits, target, strict=True):
        denominator = sum(s[y, j] * z[j].exp() for j in range(3))
        expected += -gamma[y] * (z[y].exp() / denominator).log()
    expected /= 6
    assert CPALoss(COUNTS, 0.8)(logits, target, gamma).item() == pytest.approx(expected.item(), rel=1e-9)


def test_head_class_sample_pushes_rare_logits_less_than_cross_entropy() -> None:
    logits = torch.zeros(1, 3, requires_grad=True)
    CPALoss(COUNTS, 0.8)(logits, torch.tensor([0])).backward()
    cpa_grad = logits.grad.clone()
    logits.grad = None
    F.cross_entropy(logits, torch.tensor([0])).backward()
    assert (cpa_grad[0, 1:] < logits.grad[0, 1:]).all()


def test_absent_class_gives_no_nan() -> None:
    loss = CPALoss(torch.tensor([30, 0, 5]), 0.8)
    logits = torch.randn(6, 3, requires_grad=True)
    value = loss(logits, torch.tensor([0, 1, 2, 0, 1, 2]))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()


def test_large_logits_stay_finite() -> None:
    logits = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0]], requires_grad=True)
    value = CPALoss(COUNTS, 0.8)(logits, torch.tensor([1, 0]))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()


def test_gamma_weights_samples_and_gets_no_gradient() -> None:
    loss = CPALoss(torch.tensor([4, 4]), 0.8)
    logits, target = torch.randn(4, 2), torch.tensor([0, 1, 1, 0])
    gamma = torch.tensor([1.0, 3.0], requires_grad=True)
    per_sample = F.cross_entropy(logits, target, reduction="none")
    expected = (gamma.detach()[target] * per_sample).mean()
    value = loss(logits, target, gamma)
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)
    assert not value.requires_grad


def test_set_class_counts_updates_factors() -> None:
    loss = CPALoss(torch.tensor([5, 5, 5]), 0.8)
    logits, target = torch.randn(5, 3), torch.randint(0, 3, (5,))
    before = loss(logits, target).item()
    loss.set_class_counts(COUNTS)
    assert loss(logits, target).item() != pytest.approx(before)
    assert loss(logits, target).item() == pytest.approx(CPALoss(COUNTS, 0.8)(logits, target).item())


def test_shape_errors() -> None:
    loss = CPALoss(COUNTS, 0.8)
    with pytest.raises(ValueError, match="classes"):
        loss(torch.randn(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="target shape"):
        loss(torch.randn(2, 3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="gamma"):
        loss(torch.randn(2, 3), torch.tensor([0, 1]), torch.ones(2))


def _toy_segmentation() -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.zeros(2, 1, 16, 16, dtype=torch.long)
    mask[0, :, 4:10, 4:10] = 1
    mask[1, :, 6:12, 2:8] = 2  # a second zone: merged into the foreground
    return torch.randn(2, 2, 16, 16), mask


def test_segmentation_loss_finite_and_merges_zones() -> None:
    torch.manual_seed(3)
    loss = SegmentationCPALoss(torch.tensor([400, 72]), 0.8)
    logits, mask = _toy_segmentation()
    value = loss(logits, mask, torch.tensor([1.0, 2.0]))
    assert torch.isfinite(value)
    binary = (mask > 0).long()
    assert loss(logits, binary[:, 0], torch.tensor([1.0, 2.0])).item() == pytest.approx(
        value.item(), rel=1e-6
    )


def test_segmentation_gradient_step_lowers_loss() -> None:
    torch.manual_seed(4)
    loss = SegmentationCPALoss(torch.tensor([400, 72]), 0.8)
    logits, mask = _toy_segmentation()
    logits.requires_grad_(True)
    before = loss(logits, mask)
    before.backward()
    assert torch.isfinite(logits.grad).all()
    with torch.no_grad():
        after = loss(logits - 1.0 * logits.grad, mask)
    assert after.item() < before.item()


def test_segmentation_loss_needs_two_classes() -> None:
    with pytest.raises(ValueError, match="2 classes"):
        SegmentationCPALoss(COUNTS, 0.8)


def test_prototype_accumulator_classification_hand_values() -> None:
    acc = PrototypeAccumulator(3)
    acc.update(torch.tensor([[1.0, 2.0], [3.0, 4.0], [10.0, 0.0]]), torch.tensor([0, 0, 2]))
    acc.update(torch.tensor([[5.0, 6.0]]), torch.tensor([0]))
    protos, counts = acc.prototypes()
    assert counts.tolist() == [3, 0, 1]
    torch.testing.assert_close(protos, torch.tensor([[3.0, 4.0], [0.0, 0.0], [10.0, 0.0]]))


def test_prototype_accumulator_detaches_and_resets() -> None:
    acc = PrototypeAccumulator(2)
    features = torch.randn(4, 3, requires_grad=True)
    acc.update(features, torch.tensor([0, 1, 1, 0]))
    protos, _ = acc.prototypes()
    assert not protos.requires_grad
    acc.reset()
    with pytest.raises(RuntimeError, match="no features"):
        acc.prototypes()


def test_prototype_accumulator_segmentation_nearest_mask() -> None:
    acc = PrototypeAccumulator(2)
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    mask[0, 0, 0, 0] = 1  # kept by nearest downsampling (rows/cols 0 and 2)
    mask[0, 0, 1, 1] = 1  # dropped
    mask[0, 0, 0, 2] = 1  # kept
    features = torch.arange(8, dtype=torch.float32).reshape(1, 2, 2, 2)  # channel 0: 0..3, channel 1: 4..7
    acc.update(features, mask)
    protos, counts = acc.prototypes()
    assert counts.tolist() == [2, 2]
    # foreground: feature-map pixels (0, 0) and (0, 1); background: (1, 0) and (1, 1)
    torch.testing.assert_close(protos, torch.tensor([[2.5, 6.5], [0.5, 4.5]]))
    acc.reset()
    acc.update(features, mask[:, 0, ::2, ::2])  # already at the feature size, no channel axis
    torch.testing.assert_close(acc.prototypes()[0], protos)


def test_prototype_accumulator_rejects_bad_labels() -> None:
    acc = PrototypeAccumulator(2)
    with pytest.raises(ValueError, match="labels"):
        acc.update(torch.randn(2, 3), torch.tensor([0, 2]))


def test_global_prototypes_weighted_and_absent_classes_ignored() -> None:
    a = torch.tensor([[1.0, 1.0], [float("nan"), 5.0], [0.0, 0.0]])
    b = torch.tensor([[4.0, 7.0], [2.0, 2.0], [0.0, 0.0]])
    merged, present = global_prototypes([a, b], [torch.tensor([2, 0, 0]), torch.tensor([1, 3, 0])])
    assert present.tolist() == [True, True, False]
    torch.testing.assert_close(merged, torch.tensor([[2.0, 3.0], [2.0, 2.0], [0.0, 0.0]]))


def test_global_prototypes_gaussian_noise() -> None:
    protos = [torch.tensor([[1.0, 1.0], [0.0, 0.0]]), torch.tensor([[1.0, 1.0], [0.0, 0.0]])]
    counts = [torch.tensor([1, 0]), torch.tensor([1, 0])]
    merged, present = global_prototypes(protos, counts, "gaussian", torch.Generator().manual_seed(5))
    # identical sites: std 0 clamped to 1, so the noise is exactly the generator's N(0, 1) draw
    noise = torch.randn(2, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64).float()
    torch.testing.assert_close(merged[0], torch.ones(2) + noise[0])
    assert present.tolist() == [True, False] and merged[1].tolist() == [0.0, 0.0]
    wide = [torch.tensor([[0.0, -10.0]]), torch.tensor([[0.0, 10.0]])]
    merged, _ = global_prototypes(
        wide, [torch.tensor([1]), torch.tensor([1])], "gaussian", torch.Generator().manual_seed(6)
    )
    noise = torch.randn(1, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64).float()
    torch.testing.assert_close(merged, noise * torch.tensor([[1.0, 10.0]]))


def test_global_prototypes_bad_mode() -> None:
    with pytest.raises(ValueError, match="mode"):
        global_prototypes([torch.zeros(2, 2)], [torch.ones(2)], mode="median")


def test_refinement_weights_values() -> None:
    local = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 0.0], [2.0, 2.0], [1.0, 1.0]])
    global_ = torch.tensor([[3.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    counts = torch.tensor([4, 4, 4, 4, 0, 4])
    present = torch.tensor([True, True, True, True, True, True])
    gamma = refinement_weights(local, counts, global_, present, tau=3.0, gamma_max=10.0)
    # agree -> 1; orthogonal -> 4/3; opposite -> 4/2; zero local, missing local, zero global -> 1
    torch.testing.assert_close(gamma, torch.tensor([1.0, 4 / 3, 2.0, 1.0, 1.0, 1.0]))
    not_present = refinement_weights(local, counts, global_, torch.zeros(6, dtype=torch.bool), tau=3.0, gamma_max=10.0)
    torch.testing.assert_close(not_present, torch.ones(6))


def test_refinement_weights_never_exceed_gamma_max() -> None:
    local = torch.tensor([[-1.0, 0.0], [-0.9, -0.1], [-1.0, 0.05]])
    global_ = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    counts, present = torch.ones(3), torch.ones(3, dtype=torch.bool)
    for tau in (1.0, 0.5, 0.0):
        gamma = refinement_weights(local, counts, global_, present, tau=tau, gamma_max=10.0)
        assert torch.isfinite(gamma).all() and (gamma >= 1).all() and (gamma <= 10.0).all()
    assert refinement_weights(local, counts, global_, present, tau=1.0, gamma_max=10.0)[0].item() == 10.0
    torch.manual_seed(7)
    random_gamma = refinement_weights(
        torch.randn(50, 4), torch.ones(50), torch.randn(50, 4), torch.ones(50).bool(), 1.0, gamma_max=10.0
    )
    assert (random_gamma <= 10.0).all() and (random_gamma >= 1.0).all()


def test_refinement_weights_have_no_gradient() -> None:
    local = torch.randn(3, 4, requires_grad=True)
    gamma = refinement_weights(local, torch.ones(3), torch.randn(3, 4), torch.ones(3).bool(), tau=3.0, gamma_max=10.0)
    assert not gamma.requires_grad


def test_refinement_weights_reject_bad_settings() -> None:
    with pytest.raises(ValueError, match="tau"):
        refinement_weights(torch.ones(2, 2), torch.ones(2), torch.ones(2, 2), torch.ones(2).bool(), tau=-1.0, gamma_max=10.0)
    with pytest.raises(ValueError, match="gamma_max"):
        refinement_weights(torch.ones(2, 2), torch.ones(2), torch.ones(2, 2), torch.ones(2).bool(), 3.0, 0.5)


def test_prototype_accumulator_3d_feature_map_nearest_mask() -> None:
    # a (1, 1, 4, 4, 4) mask onto a (2, 2, 2) feature map: nearest keeps voxels at even indices on every axis
    acc = PrototypeAccumulator(2)
    mask = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    mask[0, 0, 0, 0, 0] = 1  # kept -> feature voxel (0, 0, 0)
    mask[0, 0, 2, 2, 2] = 2  # kept (a second zone is prostate too) -> (1, 1, 1)
    mask[0, 0, 1, 1, 1] = 1  # dropped
    features = torch.arange(16, dtype=torch.float32).reshape(1, 2, 2, 2, 2)  # channel 0: 0..7, channel 1: 8..15
    acc.update(features, foreground_target(mask))
    protos, counts = acc.prototypes()
    assert counts.tolist() == [6, 2]
    background = [v for v in range(8) if v not in (0, 7)]
    torch.testing.assert_close(protos, torch.tensor([[sum(background) / 6, 8 + sum(background) / 6], [3.5, 11.5]],
                                                    dtype=protos.dtype))
