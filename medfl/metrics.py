"""The run's metrics: classification scores, per-case segmentation scores, retrogress.

Pure functions on arrays, no I/O: the site evaluation loop, DET's phi, model selection and the report all call
these, so that every number in a run is computed one way. Classification scores come from scikit-learn and
MONAI; Dice and HD95 from MONAI.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from itertools import pairwise

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_roc_auc
from monai.utils import convert_to_numpy
from sklearn.metrics import accuracy_score, f1_score
from sklearn.metrics import confusion_matrix as sklearn_confusion_matrix


def reference_window_start(rounds: int) -> int:
    """First 0-based round of the reference protocol's selection window: rounds >= 0.8 T (the last round
    when T < 5), as the reference code selects its model."""
    return (4 * rounds) // 5


def _labels_array(labels: object, num_classes: int, what: str = "labels") -> np.ndarray:
    array = np.asarray(convert_to_numpy(labels)).reshape(-1)
    if array.size and not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.equal(np.mod(array, 1), 0)):
            raise ValueError(f"{what} must be integer class indices")
        array = array.astype(np.int64)
    if array.size and (array.min() < 0 or array.max() >= num_classes):
        raise ValueError(f"{what} must lie in [0, {num_classes}), got values {sorted(set(array.tolist()))}")
    return array


def confusion_matrix(labels: object, predictions: object, num_classes: int) -> np.ndarray:
    """Counts (num_classes, num_classes): row = true class, column = predicted class, all classes kept."""
    truth = _labels_array(labels, num_classes)
    predicted = _labels_array(predictions, num_classes, "predictions")
    if truth.shape != predicted.shape:
        raise ValueError(f"{truth.size} labels but {predicted.size} predictions")
    return sklearn_confusion_matrix(truth, predicted, labels=list(range(num_classes)))


def _macro_auc(truth: np.ndarray, scores: np.ndarray) -> float:
    """One-vs-rest AUC averaged over the classes that have both positives and negatives here; else nan."""
    onehot = np.eye(scores.shape[1], dtype=np.int64)[truth]
    defined = [c for c in range(scores.shape[1]) if 0 < onehot[:, c].sum() < len(truth)]
    if not defined:
        return math.nan
    per_class = compute_roc_auc(
        torch.as_tensor(scores[:, defined], dtype=torch.float64),
        torch.as_tensor(onehot[:, defined]),
        average="none",
    )
    return float(np.mean(per_class))


def classification_metrics(labels: object, probabilities: object, classes: Sequence[str]) -> dict[str, float]:
    """Scores of one split: macro_f1, f1_<class>, auc, accuracy, balanced_accuracy.

    labels: (N,) class indices into `classes`; probabilities: (N, C) per-class scores (probabilities or
    logits: the prediction is their argmax and AUC depends only on their ranking).
    F1 is computed over all C classes of the experiment, a class absent from this split scoring 0
    (zero_division=0), so that macro-F1 is comparable between sites. AUC is one-vs-rest, macro over the
    classes that have positives and negatives in this split (nan when none has). Balanced accuracy is the
    mean recall over the classes present in the labels.
    """
    num_classes = len(classes)
    scores = np.asarray(convert_to_numpy(probabilities), dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] != num_classes:
        raise ValueError(f"probabilities must have shape (N, {num_classes}), got {scores.shape}")
    truth = _labels_array(labels, num_classes)
    if truth.size != scores.shape[0]:
        raise ValueError(f"{truth.size} labels but {scores.shape[0]} rows of probabilities")
    if truth.size == 0:
        raise ValueError("no samples to score")
    predicted = scores.argmax(axis=1)
    per_class_f1 = f1_score(truth, predicted, labels=list(range(num_classes)), average=None, zero_division=0)
    result = {"macro_f1": float(np.mean(per_class_f1))}
    result.update({f"f1_{name}": float(value) for name, value in zip(classes, per_class_f1, strict=True)})
    result["auc"] = _macro_auc(truth, scores)
    result["accuracy"] = float(accuracy_score(truth, predicted))
    result["balanced_accuracy"] = balanced_accuracy(truth, predicted, num_classes)
    return result


def balanced_accuracy(truth: np.ndarray, predicted: np.ndarray, num_classes: int) -> float:
    """Mean recall over the classes present in `truth` (scikit-learn's balanced_accuracy_score), from a
    confusion matrix over all classes: sklearn's own function builds one without `labels` and warns "A single
    label was found" whenever a split and its predictions hold one class."""
    matrix = sklearn_confusion_matrix(truth, predicted, labels=list(range(num_classes)))
    support = matrix.sum(axis=1)
    present = support > 0
    return float(np.mean(np.diag(matrix)[present] / support[present]))


def reassemble_volumes(
    case_ids: Sequence[str],
    slice_indices: Sequence[int],
    slices: Sequence[np.ndarray | torch.Tensor],
    whole_cases: bool = True,
) -> dict[str, np.ndarray]:
    """Stack each case's 2-D slices into a volume, ordered by slice index, whatever order they came in.

    The slice axis is the LAST axis: slices of shape (x, y) give a volume (x, y, z), so a spacing for
    `segmentation_case_metrics` is given in that order too. A case's indices must be exactly 0..n-1 (the
    volume's slices, none lost, none twice); otherwise ValueError naming the case. `whole_cases=False`: a case
    may hold a selection of its slices (the training split keeps the foreground slices and a share of the empty
    ones, `data.slices: foreground`); they are stacked in index order, gaps closed: a stack that Dice can score,
    not a volume for distances. A slice given twice is still an error.
    """
    if not len(case_ids) == len(slice_indices) == len(slices):
        raise ValueError(
            f"{len(case_ids)} case ids, {len(slice_indices)} slice indices and {len(slices)} slices: must match"
        )
    by_case: dict[str, dict[int, np.ndarray]] = {}
    for case, index, image in zip(case_ids, slice_indices, slices, strict=True):
        case_slices = by_case.setdefault(str(case), {})
        index = int(index)
        if index in case_slices:
            raise ValueError(f"case '{case}': slice {index} appears twice")
        case_slices[index] = np.asarray(convert_to_numpy(image))
    volumes = {}
    for case, case_slices in by_case.items():
        missing = sorted(set(range(len(case_slices))) - set(case_slices))
        if missing and whole_cases:
            raise ValueError(
                f"case '{case}': slices {missing} are missing (has {len(case_slices)} slices, "
                f"indices {min(case_slices)}..{max(case_slices)})"
            )
        shapes = {image.shape for image in case_slices.values()}
        if len(shapes) > 1:
            raise ValueError(f"case '{case}': slices of different shapes {sorted(shapes)}")
        volumes[case] = np.stack([case_slices[i] for i in sorted(case_slices)], axis=-1)
    return volumes


def segmentation_case_metrics(
    prediction: np.ndarray, truth: np.ndarray, spacing: Sequence[float] | None = None, distances: bool = True
) -> dict[str, float]:
    """Foreground Dice and HD95 of one case; foreground = values > 0 (zones merged).

    Dice is 1 when both are empty and 0 when only one is. HD95 is MONAI's symmetric 95th-percentile Hausdorff
    distance between the masks' surfaces (the larger of the two directed 95th percentiles), in physical
    units when `spacing` (one value per axis, same axis order as the arrays) is given, else in voxels; it is
    nan when either mask is empty, i.e. missing rather than infinite. `distances=False` skips HD95 (about half
    the cost of scoring a case) where only Dice is needed, as for DET's phi on validation.
    """
    predicted_mask = np.asarray(convert_to_numpy(prediction)) > 0
    truth_mask = np.asarray(convert_to_numpy(truth)) > 0
    if predicted_mask.shape != truth_mask.shape:
        raise ValueError(
            f"prediction shape {predicted_mask.shape} differs from truth shape {truth_mask.shape}"
        )
    if spacing is not None and len(spacing) != truth_mask.ndim:
        raise ValueError(
            f"spacing {tuple(spacing)} must have one value per axis of a {truth_mask.ndim}-D volume"
        )
    y_pred = torch.as_tensor(predicted_mask, dtype=torch.float32)[None, None]
    y = torch.as_tensor(truth_mask, dtype=torch.float32)[None, None]
    dice = float(compute_dice(y_pred, y, include_background=True, ignore_empty=False)[0, 0])
    if not distances:
        return {"dice": dice}
    if not (predicted_mask.any() and truth_mask.any()):
        return {"dice": dice, "hd95": math.nan}
    with warnings.catch_warnings():
        # MONAI 1.5+ passes a deprecated argument to itself inside compute_hausdorff_distance.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
        hd95 = compute_hausdorff_distance(
            y_pred,
            y,
            include_background=True,
            percentile=95,
            spacing=None if spacing is None else [float(s) for s in spacing],
        )
    return {"dice": dice, "hd95": float(hd95[0, 0])}


def summarize_cases(per_case: Mapping[str, Mapping[str, float]]) -> dict[str, float | int]:
    """Mean Dice over all cases; mean HD95 over the cases where it is finite, the others counted as missing
    (no HD95 entries when the cases were scored without distances)."""
    dice = [float(scores["dice"]) for scores in per_case.values()]
    summary: dict[str, float | int] = {"dice": float(np.mean(dice)) if dice else math.nan}
    if all("hd95" in scores for scores in per_case.values()):
        hd95 = [float(scores["hd95"]) for scores in per_case.values()]
        defined = [value for value in hd95 if math.isfinite(value)]
        summary["hd95"] = float(np.mean(defined)) if defined else math.nan
        summary["hd95_missing"] = len(hd95) - len(defined)
    summary["num_cases"] = len(per_case)
    return summary


ORIGINAL_GRID_KEYS = {"dice": "dice_original", "hd95": "hd95_original", "hd95_missing": "hd95_original_missing"}


def summarize_original_cases(per_case: Mapping[str, Mapping[str, float]]) -> dict[str, float | int]:
    """`summarize_cases` of cases scored on their original voxel grids, under the keys of ORIGINAL_GRID_KEYS:
    mean Dice over all cases; mean HD95 (mm) over the cases where it is finite, the others counted as missing."""
    summary = summarize_cases(per_case)
    return {name: summary[key] for key, name in ORIGINAL_GRID_KEYS.items()}


def running_best(values: Sequence[float]) -> int:
    """Index of the round a running selection keeps: the first, replaced by every later value strictly above
    the kept one (NaN never replaces; ties keep the earlier round)."""
    kept = 0
    for index, value in enumerate(values):
        if index and not math.isnan(value) and value > values[kept]:
            kept = index
    return kept


def retrogress(before: float, after: float, after_first_epoch: float) -> dict[str, float]:
    """Retrogress (drop caused by communication) and recovery (regained in the first local epoch) of phi."""
    return {"retrogress": float(before) - float(after), "recovery": float(after_first_epoch) - float(after)}


def curve_dips(values: Sequence[float]) -> float:
    """Sum of the drops of a per-epoch curve: sum over e of max(0, v[e-1] - v[e]).

    NaN entries (epochs not measured) are skipped: each defined value is compared with the previous defined
    one, so a drop across a gap still counts. Fewer than two defined values give 0.
    """
    defined = [float(v) for v in values if not math.isnan(float(v))]
    return float(sum(max(0.0, previous - current) for previous, current in pairwise(defined)))
