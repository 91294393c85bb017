"""Metrics against values computed by hand."""

from __future__ import annotations

import math
import random
import warnings

import numpy as np
import pytest
import torch

from medfl.metrics import (
    classification_metrics,
    confusion_matrix,
    curve_dips,
    reassemble_volumes,
    retrogress,
    segmentation_case_metrics,
    summarize_cases,
)

CLASSES = ["nv", "bkl", "mel"]


def one_hot_scores(predictions: list[int], num_classes: int = 3) -> np.ndarray:
    """Probabilities whose argmax is `predictions`."""
    scores = np.full((len(predictions), num_classes), 0.1)
    scores[np.arange(len(predictions)), predictions] = 0.8
    return scores


# Hand example: per class TP/FP/FN = nv 2/1/2, bkl 2/2/1, mel 2/1/1.
LABELS = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
PREDICTIONS = [0, 0, 1, 2, 1, 1, 0, 2, 2, 1]


def test_three_class_f1_accuracy_balanced_accuracy_by_hand():
    result = classification_metrics(LABELS, one_hot_scores(PREDICTIONS), CLASSES)
    assert result["f1_nv"] == pytest.approx(4 / 7)
    assert result["f1_bkl"] == pytest.approx(4 / 7)
    assert result["f1_mel"] == pytest.approx(2 / 3)
    assert result["macro_f1"] == pytest.approx(38 / 63)
    assert result["accuracy"] == pytest.approx(6 / 10)
    assert result["balanced_accuracy"] == pytest.approx((2 / 4 + 2 / 3 + 2 / 3) / 3)
    assert set(result) == {"macro_f1", "f1_nv", "f1_bkl", "f1_mel", "auc", "accuracy", "balanced_accuracy"}


def test_confusion_matrix_rows_are_truth_and_absent_classes_kept():
    np.testing.assert_array_equal(confusion_matrix(LABELS, PREDICTIONS, 3), [[2, 1, 1], [1, 2, 0], [0, 1, 2]])
    np.testing.assert_array_equal(confusion_matrix([0, 1], [1, 1], 4)[2:], np.zeros((2, 4)))
    with pytest.raises(ValueError, match="predictions"):
        confusion_matrix([0, 1], [0, 3], 3)


def test_macro_f1_counts_a_class_absent_from_the_split_as_zero():
    # mel absent from the labels but predicted once; balanced accuracy over nv and bkl only.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = classification_metrics([0, 0, 1, 1], one_hot_scores([0, 2, 1, 1]), CLASSES)
    assert result["f1_nv"] == pytest.approx(2 / 3)
    assert result["f1_bkl"] == pytest.approx(1.0)
    assert result["f1_mel"] == 0.0
    assert result["macro_f1"] == pytest.approx(5 / 9)
    assert result["balanced_accuracy"] == pytest.approx(3 / 4)
    assert result["accuracy"] == pytest.approx(3 / 4)


def test_one_class_splits_score_without_sklearn_warnings_and_balanced_accuracy_matches_sklearn():
    from sklearn.metrics import balanced_accuracy_score

    probabilities = np.tile([0.1, 0.8, 0.1], (5, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "A single label was found in y_true and y_pred" would raise here
        scores = classification_metrics([1] * 5, probabilities, ["a", "b", "c"])
    assert scores["balanced_accuracy"] == 1.0 and scores["accuracy"] == 1.0
    rng = np.random.default_rng(0)
    for _ in range(20):
        truth, scores_ = rng.integers(0, 4, 30), rng.random((30, 4))
        truth[truth == 3] = 2  # class 3 is predicted but never true: recall is over present classes
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sklearn says so about class 3
            expected = balanced_accuracy_score(truth, scores_.argmax(axis=1))
        assert classification_metrics(truth, scores_, list("abcd"))["balanced_accuracy"] == pytest.approx(expected)


def test_auc_one_vs_rest_skips_classes_without_positives_or_negatives():
    # nv: positives {0.9, 0.4} vs negatives {0.6, 0.2} -> 3 of 4 pairs; bkl: separable -> 1; mel: no positives.
    scores = np.array([[0.9, 0.05, 0.05], [0.4, 0.1, 0.5], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1]])
    result = classification_metrics(torch.tensor([0, 0, 1, 1]), torch.tensor(scores), CLASSES)
    assert result["auc"] == pytest.approx((0.75 + 1.0) / 2)


def test_auc_over_two_present_classes_and_nan_when_none_is_defined():
    scores = np.array([[0.9, 0.05, 0.05], [0.4, 0.1, 0.5], [0.6, 0.3, 0.1]])
    # nv: positives {0.9, 0.4} vs {0.6} -> 1 of 2 pairs; mel: {0.1} vs {0.05, 0.5} -> 1 of 2; bkl absent.
    assert classification_metrics([0, 0, 2], scores, CLASSES)["auc"] == pytest.approx(0.5)
    assert math.isnan(classification_metrics([0, 0, 0], scores, CLASSES)["auc"])


def test_classification_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="shape"):
        classification_metrics([0, 1], np.zeros((2, 2)), CLASSES)
    with pytest.raises(ValueError, match="labels"):
        classification_metrics([0, 1, 2], np.zeros((2, 3)), CLASSES)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        classification_metrics([0, 5], np.zeros((2, 3)), CLASSES)


def cube(shape: tuple[int, ...], corner: tuple[int, ...], size: int, value: int = 1) -> np.ndarray:
    volume = np.zeros(shape, dtype=np.int64)
    volume[tuple(slice(c, c + size) for c in corner)] = value
    return volume


def test_dice_of_hand_made_volumes_merges_foreground_labels():
    truth = cube((8, 8, 8), (2, 2, 2), 2)
    prediction = cube((8, 8, 8), (3, 2, 2), 2, value=2)  # half overlapping, zone label 2 counts as foreground
    assert segmentation_case_metrics(prediction, truth)["dice"] == pytest.approx(2 * 4 / (8 + 8))


def test_empty_volumes_dice_one_or_zero_and_hd95_missing():
    empty = np.zeros((6, 6, 4))
    full = cube((6, 6, 4), (1, 1, 1), 2)
    assert segmentation_case_metrics(empty, empty)["dice"] == 1.0
    assert segmentation_case_metrics(full, empty)["dice"] == 0.0
    assert segmentation_case_metrics(empty, full)["dice"] == 0.0
    for prediction, truth in [(empty, empty), (full, empty), (empty, full)]:
        assert math.isnan(segmentation_case_metrics(prediction, truth)["hd95"])


def test_hd95_of_offset_cubes_in_voxels_and_physical_units():
    # 2-voxel cubes 5 apart along one axis: surface distances are 4 (near face) and 5 (far face) -> HD95 = 5.
    first = cube((16, 8, 8), (0, 2, 2), 2)
    second = cube((16, 8, 8), (5, 2, 2), 2)
    assert segmentation_case_metrics(first, second)["hd95"] == pytest.approx(5.0)
    assert segmentation_case_metrics(first, second, spacing=(2.0, 1.0, 0.5))["hd95"] == pytest.approx(10.0)
    # Offset along the last (slice) axis: its spacing applies.
    first_z, second_z = (np.moveaxis(v, 0, -1) for v in (first, second))
    assert segmentation_case_metrics(first_z, second_z, spacing=(0.5, 0.5, 3.0))["hd95"] == pytest.approx(
        15.0
    )


def test_hd95_is_a_percentile_not_the_maximum():
    truth = cube((24, 24, 24), (2, 2, 2), 6)
    prediction = truth.copy()
    prediction[20, 20, 20] = 1  # one stray voxel among 152 surface voxels: below the 95th percentile
    assert segmentation_case_metrics(prediction, truth)["hd95"] == pytest.approx(0.0)


def test_segmentation_rejects_bad_shapes_and_spacing():
    with pytest.raises(ValueError, match="shape"):
        segmentation_case_metrics(np.zeros((4, 4, 2)), np.zeros((4, 4, 3)))
    with pytest.raises(ValueError, match="spacing"):
        segmentation_case_metrics(np.ones((4, 4, 2)), np.ones((4, 4, 2)), spacing=(1.0, 1.0))


def test_summary_averages_defined_hd95_and_counts_missing():
    per_case = {
        "a": {"dice": 0.8, "hd95": 2.0},
        "b": {"dice": 0.6, "hd95": math.nan},
        "c": {"dice": 1.0, "hd95": math.inf},
        "d": {"dice": 0.2, "hd95": 4.0},
    }
    assert summarize_cases(per_case) == {
        "dice": pytest.approx(0.65),
        "hd95": pytest.approx(3.0),
        "hd95_missing": 2,
        "num_cases": 4,
    }
    empty = summarize_cases({})
    assert empty["num_cases"] == 0 and empty["hd95_missing"] == 0 and math.isnan(empty["dice"])


def test_reassembly_orders_slices_by_index_on_the_last_axis():
    rng = np.random.default_rng(0)
    cases = {"p1": rng.random((4, 5, 3)), "p2": rng.random((4, 5, 2))}
    items = [(case, k, volume[..., k]) for case, volume in cases.items() for k in range(volume.shape[-1])]
    random.Random(1).shuffle(items)
    case_ids, indices, slices = zip(*items, strict=True)
    slices = [torch.from_numpy(s) if i % 2 else s for i, s in enumerate(slices)]  # tensors and arrays mixed
    volumes = reassemble_volumes(case_ids, indices, slices)
    assert set(volumes) == {"p1", "p2"}
    for case, volume in cases.items():
        np.testing.assert_array_equal(volumes[case], volume)


def test_reassembly_of_a_selection_of_slices_closes_the_gaps_in_index_order():
    """The training split of `data.slices: foreground` keeps some of a case's slices: stacked in index order."""
    volume = np.random.default_rng(0).random((4, 5, 6))
    kept = [5, 0, 3, 1]
    stacked = reassemble_volumes(["p1"] * 4, kept, [volume[..., k] for k in kept], whole_cases=False)
    np.testing.assert_array_equal(stacked["p1"], volume[..., [0, 1, 3, 5]])
    with pytest.raises(ValueError, match="case 'p1'.*missing"):
        reassemble_volumes(["p1"] * 4, kept, [volume[..., k] for k in kept])
    with pytest.raises(ValueError, match="case 'p1'.*twice"):
        reassemble_volumes(["p1"] * 2, [3, 3], [volume[..., 3]] * 2, whole_cases=False)


def test_reassembly_errors_name_the_case():
    image = np.zeros((4, 4))
    with pytest.raises(ValueError, match="case 'p7'.*missing"):
        reassemble_volumes(["p1", "p7", "p7"], [0, 0, 2], [image] * 3)
    with pytest.raises(ValueError, match="case 'p7'.*twice"):
        reassemble_volumes(["p7", "p7"], [0, 0], [image] * 2)
    with pytest.raises(ValueError, match="case 'p7'.*shapes"):
        reassemble_volumes(["p7", "p7"], [0, 1], [image, np.zeros((3, 4))])
    with pytest.raises(ValueError, match="must match"):
        reassemble_volumes(["p7"], [0, 1], [image])


def test_retrogress_and_recovery_by_hand():
    result = retrogress(before=0.8, after=0.5, after_first_epoch=0.7)
    assert result == {"retrogress": pytest.approx(0.3), "recovery": pytest.approx(0.2)}


def test_curve_dips_by_hand_and_with_gaps():
    assert curve_dips([0.5, 0.7, 0.6, 0.65, 0.4]) == pytest.approx(0.1 + 0.25)
    assert curve_dips([0.1, 0.2, 0.3]) == 0.0
    assert curve_dips([0.7, math.nan, 0.5, 0.6]) == pytest.approx(0.2)
    assert curve_dips([math.nan]) == 0.0 and curve_dips([]) == 0.0
