"""The audit log says what left a site, and docs/run-folder.md says what the audit log holds: tensors by name,
shape, dtype and bytes, with their values when small (counts, and the prototypes of small networks)."""

from __future__ import annotations

from pathlib import Path

import torch

from medfl.federated.audit import SMALL_TENSOR, describe_values
from medfl.models import build_model

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _prototypes(width: float) -> torch.Tensor:
    """Three classes' prototypes of slim VGG-16 at `width`: one vector of the network's features per class."""
    network = build_model("slim_vgg16", "classification", num_classes=3, in_channels=3, width=width)
    return torch.zeros(3, network.final_classifier.in_features)


def test_prototypes_are_logged_as_vectors_up_to_the_documented_size_and_the_docs_say_so() -> None:
    described = {entry["name"]: entry for entry in describe_values(
        {"class_counts": torch.tensor([5.0, 3.0, 1.0]), "prototypes": _prototypes(0.25), "num_samples": 9})["statistics"]}
    assert described["class_counts"]["value"] == [5.0, 3.0, 1.0]
    assert described["prototypes"]["shape"] == [3, 16] and described["prototypes"]["value"] == [[0.0] * 16] * 3
    wide = describe_values({"prototypes": _prototypes(0.5)})["statistics"][0]
    assert wide["shape"] == [3, 32] and "value" not in wide
    text = " ".join((DOCS / "run-folder.md").read_text(encoding="utf-8").split())
    assert f"`value` too when it holds at most {SMALL_TENSOR} numbers" in text
    assert "slim VGG-16 up to width 0.25 (16 features) logs the vectors themselves" in text
    assert "from width 0.5 (32 features) only their shape and bytes" in text
