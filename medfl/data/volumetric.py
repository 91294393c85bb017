"""Prostate MRI sites read as whole volumes (data.dims 3): one record per case, holding its files' paths.

Cases are found and paired as the slice-wise reader finds them (`medfl.data.prostate.find_cases`: the same
layouts, mask suffix, containment checks) and checked as it checks them (`medfl.data.volumes.check_case`: the
same errors for people). A record names the case's image and mask files; the recipe (transforms/prostate3d_*.yaml)
loads them with MONAI, reorients to RAS, clips and z-scores as the 2-D pipeline does, and resamples to
`data.spacing`. Each record also carries what reading the case learnt at no extra cost: the volume's shape once
resampled (x, y, z, what `medfl check` compares with the patch) and its voxels and prostate voxels at the target
spacing, estimated from the original grid (the class counts CPA and `medfl check` use).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from medfl.config import DataSettings, SiteConfig
from medfl.data.problems import ProblemLog
from medfl.data.prostate import CaseFiles, add_case, find_cases, read_cases, split_by_case
from medfl.data.records import SiteContent
from medfl.data.shift import PROSTATE, SampleStatistics, grid_statistics, intensity_statistics
from medfl.data.volumes import CaseGeometry, CheckedCase, check_case

VOLUME_ORIENTATION = "RAS"  # MONAI's Orientationd axcodes in the 3-D recipes: array axes (x, y, z)


def resampled_shape(geometry: CaseGeometry, spacing: Sequence[float]) -> tuple[int, int, int]:
    """A volume's shape (x, y, z) in RAS orientation once resampled to `spacing` (mm), as MONAI's Spacingd makes
    it: the extent between the first and last voxel centres in new voxels, plus one, rounded (half to even)."""
    size, original = geometry.oriented_grid
    return tuple(int(np.round((n - 1) * s / t + 1.0)) for n, s, t in zip(size, original, spacing, strict=True))


def volume_record(checked: CheckedCase, files: CaseFiles, site: str, spacing: Sequence[float]) -> dict[str, Any]:
    """The record of one case: its files, and its resampled shape and (estimated) voxel counts at `spacing`."""
    original = checked.geometry.oriented_grid[1]
    scale = math.prod(original) / math.prod(spacing)  # target voxels per original voxel
    shape = resampled_shape(checked.geometry, spacing)
    return {
        "image": str(files.image),
        "label": str(files.mask),
        "case_id": checked.case_id,
        "site": site,
        "shape": list(shape),
        "voxels": math.prod(shape),
        "foreground_voxels": min(math.prod(shape), int(round(np.count_nonzero(checked.labels) * scale))),
    }


def _normalised(checked: CheckedCase) -> np.ndarray:
    """The case's intensities clipped and z-scored as the recipes do it (for site-shift statistics)."""
    low, high = checked.clip
    clipped = np.clip(checked.volume, low, high)
    spread = float(clipped.std())
    return (clipped - float(clipped.mean())) / (spread if spread > 0 else 1.0)


def read_volumetric_site(site: SiteConfig, settings: DataSettings, log: ProblemLog) -> SiteContent:
    """One record per case of a segmentation site, split by case; every problem goes to `log`."""
    content = SiteContent(["background", "prostate"])
    spacing = settings.spacing or (1.0, 1.0, 1.0)
    files = {case.case_id: case for case in find_cases(site, log)}
    read, digests = read_cases(list(files.values()), lambda case: check_case(case.case_id, case.image, case.mask),
                               settings.num_workers, log)
    checked_cases = [checked for _, checked in read]
    assignment = split_by_case([case.case_id for case in checked_cases], site, settings, log)
    statistics: list[np.ndarray] = []
    for checked in checked_cases:
        split = assignment.get(checked.case_id)
        if split is None:
            continue
        grid = checked.geometry
        add_case(content, checked.case_id, split, grid, digests[checked.case_id], statistics,
                 np.concatenate([intensity_statistics(_normalised(checked), checked.labels),
                                 grid_statistics(grid.size, grid.spacing, grid.direction, checked.clip[1])]))
        content.splits[split].append(volume_record(checked, files[checked.case_id], site.name, spacing))
    content.statistics = SampleStatistics.from_rows(PROSTATE, statistics)
    return content


def volume_counts(records: Sequence[dict[str, Any]]) -> tuple[list[int], int]:
    """([background, prostate] voxels at the target spacing, cases showing prostate) of a split's records."""
    foreground = sum(int(record["foreground_voxels"]) for record in records)
    total = sum(int(record["voxels"]) for record in records)
    return [total - foreground, foreground], sum(int(record["foreground_voxels"]) > 0 for record in records)
