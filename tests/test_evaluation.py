"""Scoring a model on a split: classification metrics and per-case segmentation metrics on reassembled volumes."""

import pytest
import torch
from torch import nn

from medfl.federated.evaluation import evaluate_model
from medfl.metrics import classification_metrics
from medfl.tasks import task_for


class Fixed(nn.Module):
    """Returns the logits stored in each input row: lets a test choose the predictions."""

    def forward(self, x):
        return x, x


def test_classification_matches_the_metrics_of_the_same_predictions():
    logits = torch.tensor([[2.0, 0.1, 0.0], [0.0, 3.0, 0.1], [0.0, 0.1, 1.0], [1.0, 0.0, 0.2], [0.0, 0.2, 0.1]])
    labels = torch.tensor([0, 1, 2, 2, 1])
    loader = [{"image": logits[:3], "label": labels[:3]}, {"image": logits[3:], "label": labels[3:]}]
    result = evaluate_model(Fixed(), loader, task_for("classification"), ["a", "b", "c"], torch.device("cpu"))
    expected = classification_metrics(labels, torch.softmax(logits, 1), ["a", "b", "c"])
    assert result == pytest.approx(expected, nan_ok=True)


def test_segmentation_reassembles_cases_and_scores_them_with_spacing():
    # Two cases of 2 slices each, delivered out of order; the prediction misses one foreground slice of case x.
    truth = {("x", 0): 1, ("x", 1): 1, ("y", 0): 0, ("y", 1): 1}
    predicted = {("x", 0): 1, ("x", 1): 0, ("y", 0): 0, ("y", 1): 1}
    order = [("y", 1), ("x", 1), ("x", 0), ("y", 0)]
    batches = []
    for case, index in order:
        logits = torch.zeros(1, 2, 4, 4)
        logits[0, predicted[(case, index)], 1:3, 1:3] = 1.0
        logits[0, 0] += 0.5 * (1 - predicted[(case, index)])
        label = torch.zeros(1, 1, 4, 4)
        label[0, 0, 1:3, 1:3] = truth[(case, index)]
        batches.append({"image": logits, "label": label, "case_id": [case], "slice_index": torch.tensor([index])})
    result = evaluate_model(Fixed(), batches, task_for("segmentation"), ["background", "prostate"], torch.device("cpu"),
                            spacing_of=lambda case: (1.0, 1.0, 2.0))
    assert result["num_cases"] == 2
    assert result["dice"] == pytest.approx((2 * 4 / (8 + 4) + 1.0) / 2)
    assert result["hd95_missing"] == 0

