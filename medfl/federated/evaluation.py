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
) -> dict[str, float]:
    """The task's metrics of ``model`` (in eval mode) on every batch of ``loader``; its mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with plain_tensors():
            return task.evaluate(model, loader, classes, device, spacing_of, distances)
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


def score_segmenter(model: nn.Module, loader, device: torch.device, spacing_of, distances: bool) -> dict[str, float]:
    """Slices predicted, reassembled into volumes by (case_id, slice_index) and scored per case: Dice, and
    unless ``distances`` is False HD95 with ``spacing_of(case_id)`` in physical units; the split's means."""
    case_ids: list[str] = []
    indices: list[int] = []
    predictions: list[np.ndarray] = []
    truths: list[np.ndarray] = []
    for batch in loader:
        logits, _ = model(plain(batch["image"]).to(device))
        # max(...).indices is argmax (the first maximal index) and, over the class axis, about 10x faster.
        predictions.extend(logits.max(dim=1).indices.to(torch.uint8).cpu().numpy())
        label = torch.as_tensor(batch["label"])
        if label.ndim == logits.ndim:
            label = label[:, 0]
        truths.extend((label > 0).to(torch.uint8).cpu().numpy())
        case_ids.extend(str(c) for c in _as_list(batch["case_id"]))
        indices.extend(int(i) for i in _as_list(batch["slice_index"]))
    predicted = reassemble_volumes(case_ids, indices, predictions)
    truth = reassemble_volumes(case_ids, indices, truths)
    per_case = {
        case: segmentation_case_metrics(predicted[case], truth[case], spacing_of(case) if spacing_of else None,
                                        distances=distances)
        for case in predicted
    }
    return dict(summarize_cases(per_case))


def sliding_window_logits(model: nn.Module, images: Tensor, roi_size: Sequence[int], overlap: float, mode: str,
                          sw_batch_size: int) -> Tensor:
    """`model`'s logits over whole volumes (batch, channel, x, y, z) with MONAI's sliding-window inference: windows
    of `roi_size`, blended by `mode` with `overlap`."""
    from monai.inferers import sliding_window_inference

    def logits_of(inputs: Tensor) -> Tensor:
        return model(inputs)[0]

    return sliding_window_inference(images, list(roi_size), sw_batch_size, logits_of, overlap=overlap, mode=mode)


def score_volumes(model: nn.Module, loader, device: torch.device, spacing_of, distances: bool, roi_size: Sequence[int],
                  overlap: float, mode: str, sw_batch_size: int) -> dict[str, float]:
    """Whole volumes predicted with MONAI's sliding-window inference (windows of `roi_size`, blended by `mode`
    with `overlap`) and scored per case with the same metrics as slices reassembled into volumes: Dice, and
    unless ``distances`` is False HD95 with ``spacing_of(case_id)``; the split's means."""
    per_case = {}
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
    return dict(summarize_cases(per_case))
