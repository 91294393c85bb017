"""Scoring a model on one split (the task decides how: `Task.evaluate` calls the scorers below), and the
BatchNorm re-estimation diagnostic."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from medfl.data.tensors import plain, plain_tensors
from medfl.metrics import (
    classification_metrics,
    reassemble_volumes,
    segmentation_case_metrics,
    summarize_cases,
    summarize_original_cases,
)

if TYPE_CHECKING:
    from medfl.tasks import Task


def _as_list(values: object) -> list:
    if isinstance(values, Tensor):
        return values.reshape(-1).tolist()
    return list(values)  # type: ignore[arg-type]


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    loader: Iterable[Mapping[str, object]],
    task: Task,
    classes: Sequence[str],
    device: torch.device,
    spacing_of: Callable[[str], Sequence[float] | None] | None = None,
    distances: bool = True,
    originals: Callable[[str], object | None] | None = None,
    whole_cases: bool = True,
) -> dict[str, float]:
    """The task's metrics of ``model`` (in eval mode) on every batch of ``loader``; its mode is restored.
    ``originals`` (segmentation): a case's mask on its own voxel grid (what the task's `original_case` gives), to
    score there too; None scores only as the run has always scored. ``whole_cases=False`` (slice-wise
    segmentation): the loader may hold a selection of each case's slices (the training split), each case is
    scored on the slices it has (Dice only: ``distances`` must be False)."""
    was_training = model.training
    model.eval()
    try:
        with plain_tensors():
            return task.evaluate(model, loader, classes, device, spacing_of, distances, originals, whole_cases)
    finally:
        model.train(was_training)


def reestimate_batchnorm(model: nn.Module, loader: Iterable[Mapping[str, object]], device: torch.device) -> bool:
    """Replace ``model``'s BatchNorm running statistics by those of ``loader``'s images (no weight change).

    A diagnostic: after a communication, how much of the received model's drop comes from normalisation
    statistics averaged over other sites. Returns False (model untouched) when it has no BatchNorm layer.
    """
    if not any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in model.modules()):
        return False
    with plain_tensors():
        torch.optim.swa_utils.update_bn((torch.as_tensor(batch["image"]) for batch in loader), model, device)
    return True


def score_classifier(model: nn.Module, loader, classes: Sequence[str], device: torch.device) -> dict[str, float]:
    """Macro-F1, per-class F1, AUC, accuracy and balanced accuracy of a classifier on every batch."""
    probabilities, labels = [], []
    for batch in loader:
        logits, _ = model(plain(batch["image"]).to(device))
        probabilities.append(torch.softmax(logits.float(), dim=1).cpu())
        labels.append(torch.as_tensor(batch["label"]).reshape(-1).cpu())
    return classification_metrics(torch.cat(labels), torch.cat(probabilities), classes)


def score_segmenter(model: nn.Module, loader, device: torch.device, spacing_of, distances: bool,
                    originals: Callable[[str], object | None] | None = None,
                    whole_cases: bool = True) -> dict[str, float]:
    """Slices predicted, reassembled into volumes by (case_id, slice_index) and scored per case: Dice, and
    unless ``distances`` is False HD95 with ``spacing_of(case_id)`` in physical units; the split's means.

    With ``originals`` (case id -> its `OriginalMask`, or None), each case is also scored on its own voxel grid
    as `medfl predict` delivers it: the slice logits upsampled bilinearly to the original in-plane size, their
    argmax against the original mask, HD95 with the original spacing (`dice_original`, `hd95_original`,
    `hd95_original_missing`); left out when a case has no original mask.

    ``whole_cases=False``: each case may come as a selection of its slices (the training split with
    `data.slices: foreground`), scored on the slices it has; Dice only (distances need whole volumes)."""
    if not whole_cases and (distances or originals is not None):
        raise ValueError("a selection of each case's slices is scored by Dice only: no distances, no original grid")
    case_ids: list[str] = []
    indices: list[int] = []
    predictions: list[np.ndarray] = []
    truths: list[np.ndarray] = []
    on_original = _OriginalSlices(originals) if originals is not None else None
    for batch in loader:
        logits, _ = model(plain(batch["image"]).to(device))
        # max(...).indices is argmax (the first maximal index) and, over the class axis, about 10x faster.
        predictions.extend(logits.max(dim=1).indices.to(torch.uint8).cpu().numpy())
        label = torch.as_tensor(batch["label"])
        if label.ndim == logits.ndim:
            label = label[:, 0]
        truths.extend((label > 0).to(torch.uint8).cpu().numpy())
        batch_cases = [str(c) for c in _as_list(batch["case_id"])]
        batch_indices = [int(i) for i in _as_list(batch["slice_index"])]
        case_ids.extend(batch_cases)
        indices.extend(batch_indices)
        if on_original is not None:
            depths = _as_list(batch["num_slices"]) if "num_slices" in batch else [None] * len(batch_cases)
            on_original.add(batch_cases, batch_indices, depths, logits)
    predicted = reassemble_volumes(case_ids, indices, predictions, whole_cases)
    truth = reassemble_volumes(case_ids, indices, truths, whole_cases)
    per_case = {
        case: segmentation_case_metrics(predicted[case], truth[case], spacing_of(case) if spacing_of else None,
                                        distances=distances)
        for case in predicted
    }
    result = dict(summarize_cases(per_case))
    if on_original is not None:
        result.update(on_original.summary())
    return result


UPSAMPLE_SLICES = 16  # slices upsampled at once to a case's original in-plane size (bounds the memory it takes)


class _OriginalSlices:
    """Slice logits gathered per case; once a case is whole (its num_slices seen, or at the end), brought back to
    its original in-plane size and scored against its original mask. At most one unfinished case's logits are
    held when the slices come in case order, as the evaluation loaders deliver them."""

    def __init__(self, originals: Callable[[str], object | None]):
        self.originals = originals
        self.pending: dict[str, dict[int, Tensor]] = {}
        self.depth: dict[str, int] = {}
        self.per_case: dict[str, dict[str, float]] = {}
        self.unscored = 0

    def add(self, cases: Sequence[str], indices: Sequence[int], depths: Sequence[object], logits: Tensor) -> None:
        host = logits.detach().float().cpu()
        for row, (case, index, depth) in enumerate(zip(cases, indices, depths, strict=True)):
            self.pending.setdefault(case, {})[index] = host[row]
            if depth is not None:
                self.depth[case] = int(depth)
            if len(self.pending[case]) == self.depth.get(case):
                self._score(case)

    def _score(self, case: str) -> None:
        slices = self.pending.pop(case)
        original = self.originals(case)
        if original is None:
            self.unscored += 1
            return
        mask = original.mask  # (Z, Y, X), working orientation
        if sorted(slices) != list(range(mask.shape[0])):
            raise ValueError(f"case '{case}': {len(slices)} slices scored, its original volume has {mask.shape[0]}")
        predicted = np.empty(mask.shape, dtype=bool)
        for start in range(0, mask.shape[0], UPSAMPLE_SLICES):
            stop = min(start + UPSAMPLE_SLICES, mask.shape[0])
            logits = torch.stack([slices[i] for i in range(start, stop)])
            upsampled = torch.nn.functional.interpolate(logits, size=mask.shape[1:], mode="bilinear",
                                                        align_corners=False)
            predicted[start:stop] = (upsampled.argmax(dim=1) > 0).numpy()
        self.per_case[case] = segmentation_case_metrics(predicted, mask, original.spacing)

    def summary(self) -> dict[str, float]:
        for case in list(self.pending):
            self._score(case)
        if self.unscored:
            return {}
        return dict(summarize_original_cases(self.per_case))


def sliding_window_logits(model: nn.Module, images: Tensor, roi_size: Sequence[int], overlap: float, mode: str,
                          sw_batch_size: int) -> Tensor:
    """`model`'s logits over whole volumes (batch, channel, x, y, z) with MONAI's sliding-window inference: windows
    of `roi_size`, blended by `mode` with `overlap`."""
    from monai.inferers import sliding_window_inference

    def logits_of(inputs: Tensor) -> Tensor:
        return model(inputs)[0]

    return sliding_window_inference(images, list(roi_size), sw_batch_size, logits_of, overlap=overlap, mode=mode)


def score_volumes(model: nn.Module, loader, device: torch.device, spacing_of, distances: bool, roi_size: Sequence[int],
                  overlap: float, mode: str, sw_batch_size: int, originals: Callable[[str], object | None] | None = None,
                  target_spacing: Sequence[float] | None = None) -> dict[str, float]:
    """Whole volumes predicted with MONAI's sliding-window inference (windows of `roi_size`, blended by `mode`
    with `overlap`) and scored per case with the same metrics as slices reassembled into volumes: Dice, and
    unless ``distances`` is False HD95 with ``spacing_of(case_id)``; the split's means.

    With ``originals`` (case id -> its mask file, or None) and the recipe's ``target_spacing``, each case's
    prediction is also brought back to the case's own voxel grid (MONAI's inverse of the recipe's resampling,
    nearest neighbour) and scored there against the mask as read (`dice_original`, `hd95_original` in mm,
    `hd95_original_missing`); left out when a case has no mask file."""
    per_case, on_original, unscored = {}, {}, 0
    for batch in loader:
        images = plain(batch["image"]).to(device)
        logits = sliding_window_logits(model, images, roi_size, overlap, mode, sw_batch_size)
        predictions = logits.max(dim=1).indices.to(torch.uint8).cpu().numpy()
        label = torch.as_tensor(batch["label"])
        if label.ndim == logits.ndim:
            label = label[:, 0]
        truths = (label > 0).to(torch.uint8).cpu().numpy()
        for case, predicted, truth in zip(_as_list(batch["case_id"]), predictions, truths, strict=True):
            per_case[str(case)] = segmentation_case_metrics(predicted, truth, spacing_of(str(case)) if spacing_of
                                                            else None, distances=distances)
            if originals is None:
                continue
            mask_file = originals(str(case))
            if mask_file is None or target_spacing is None:
                unscored += 1
                continue
            on_original[str(case)] = segmentation_case_metrics(
                *volume_on_original_grid(predicted, str(mask_file), target_spacing, str(case)))
    result = dict(summarize_cases(per_case))
    if originals is not None and not unscored:
        result.update(summarize_original_cases(on_original))
    return result


def volume_on_original_grid(predicted: np.ndarray, mask_file: str, target_spacing: Sequence[float],
                            case: str) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """(prediction, mask, spacing in mm) on a case's own voxel grid (RAS orientation, (x, y, z)): the mask read as
    the 3-D recipes read it (ITK, channel first, RAS), and a prediction made at `target_spacing` taken back there
    by inverting MONAI's Spacingd (nearest neighbour), as `Invertd` inverts it for a bundle."""
    from monai.data import MetaTensor, get_track_meta, set_track_meta
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd, Spacingd

    previous = get_track_meta()
    set_track_meta(True)  # the inverse needs the resampling's record; scoring runs without it otherwise
    try:
        read = Compose([LoadImaged(keys="label", reader="ITKReader", image_only=True),
                        EnsureChannelFirstd(keys="label"),
                        Orientationd(keys="label", axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))])
        original = read({"label": mask_file})["label"]
        resample = Spacingd(keys="label", pixdim=list(target_spacing), mode="nearest")
        resampled = resample({"label": original})["label"]
        if tuple(resampled.shape[1:]) != tuple(predicted.shape):
            raise ValueError(f"case '{case}': prediction of shape {tuple(predicted.shape)}, but its mask resampled to "
                             f"{list(target_spacing)} mm has shape {tuple(resampled.shape[1:])} (an evaluation recipe "
                             "whose geometry differs from Orientationd RAS + Spacingd cannot be scored on the original grid)")
        prediction = MetaTensor(torch.as_tensor(predicted, dtype=torch.float32)[None], meta=dict(resampled.meta),
                                applied_operations=list(resampled.applied_operations))
        restored = resample.inverse({"label": prediction})["label"]
        spacing = tuple(float(s) for s in original.pixdim)
        return (np.asarray(restored.as_tensor()[0]) > 0, np.asarray(original.as_tensor()[0]) > 0, spacing)
    finally:
        set_track_meta(previous)
