"""What a modality reader hands to `load_site`: the split records and the facts for the report.

Classification record: {"image": str path, "label": int, "id": image id, "lesion_id": str | None, "site": name}.
Segmentation record (one per kept axial slice): {"image": float32 (C, H, W), "label": uint8 (1, H, W) in {0, 1},
"case_id": str, "slice_index": int, "num_slices": int, "site": name}.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from medfl.data.shift import SampleStatistics
from medfl.data.splits import SPLITS


def empty_splits() -> dict[str, list[dict[str, Any]]]:
    """{"train": [], "val": [], "test": []}."""
    return {split: [] for split in SPLITS}


@dataclass
class SiteContent:
    """Records per split plus the counts that only the reader knows (groups, dropped and filtered rows)."""

    classes: list[str]
    splits: dict[str, list[dict[str, Any]]] = field(default_factory=empty_splits)
    groups: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    dropped: Counter[str] = field(default_factory=Counter)
    filtered_out: int = 0
    geometry: dict[str, Any] = field(default_factory=dict)
    statistics: SampleStatistics | None = None  # per-sample statistics for site shift (medfl.data.shift)
    file_digests: dict[str, str] = field(default_factory=dict)  # sha256 of every file the split records read
    # slice-wise segmentation: the val and test cases' masks on their own grid (medfl.data.volumes.OriginalMask)
    original_masks: dict[str, Any] = field(default_factory=dict)
