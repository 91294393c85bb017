"""One site's data, ready for an experiment: records per split, counts, report, case geometry.

`inspect_site` finds, validates and splits a site and never raises for bad data: problems land in the
report. `load_site` raises one DataError listing every error; `validate_site` returns the problems only.

Errors (the site cannot be used): missing folder or table, image listed but absent, unreadable image or
volume, an image volume that is blank or holds a mask's few values, a file outside data_root and the site
config's folder (never opened), unknown label, mask shape/geometry mismatch, mask with negative or
non-integer values, duplicate ids, no samples, empty train or validation split (DET measures on validation), ids missing from an
official split file. Warnings (reported, the site is still used): a class absent from train, validation or
test (CPA and the metrics tolerate it), an empty test split although its fraction is above zero, a lesion
spread over several splits by an official split file, an experiment class the site's label map never
produces, a split file that lists unknown cases.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from medfl.config import DataSettings, SiteConfig
from medfl.data.containment import named_files_admitted
from medfl.data.problems import Problem, ProblemLog
from medfl.data.records import SiteContent
from medfl.data.shift import SampleStatistics
from medfl.data.splits import SPLITS
from medfl.data.volumes import CaseGeometry, OriginalMask
from medfl.errors import DataError


class SiteReader(Protocol):
    """What reading a site needs of its task (a medfl.tasks.Task is one): the caller hands it in."""

    def read_site(self, site: SiteConfig, settings: DataSettings, log: ProblemLog) -> SiteContent: ...

    def empty_classes(self, site: SiteConfig, settings: DataSettings) -> list[str]: ...

    def split_counts(self, classes: Sequence[str], records: Sequence[Mapping[str, Any]]
                     ) -> tuple[list[int], int | None]: ...


@dataclass
class SiteReport:
    """Counts and problems of one site, as `medfl check` prints them.

    counts[split][c]: images of class c (classification) or pixels of class c at input size (segmentation).
    samples[split]: images or slices. groups[split]: lesions (images without lesion id count as their own)
    or cases. foreground_slices[split]: slices showing prostate (segmentation). dropped: rows left out per
    source label (null in the label map or a class the experiment does not use). filtered_out: rows the
    site's row filter removed. statistics: per-image or per-case statistics for site shift (medfl.data.shift).
    """

    site: str
    task: str
    classes: list[str]
    counts: dict[str, list[int]]
    samples: dict[str, int]
    groups: dict[str, int]
    foreground_slices: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    filtered_out: int = 0
    problems: list[Problem] = field(default_factory=list)
    statistics: SampleStatistics | None = None

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]


@dataclass
class SiteData:
    """A site's split records with its classes, report, (segmentation) per-case geometry, and the sha256 of
    every file its records were read from (medfl.data.fingerprint)."""

    name: str
    task: str
    classes: list[str]
    splits: dict[str, list[dict[str, Any]]]
    report: SiteReport
    geometry: dict[str, CaseGeometry] = field(default_factory=dict)
    config: SiteConfig | None = None
    file_digests: dict[str, str] = field(default_factory=dict)  # path -> sha256 of every file the records read
    # slice-wise segmentation: val and test cases' masks on their own grid, for scores there (not fingerprinted:
    # the masks' files are, in file_digests)
    original_masks: dict[str, OriginalMask] = field(default_factory=dict)

    def class_counts(self, split: str = "train") -> list[int]:
        """Per-class counts of a split, in class order (images, or pixels for segmentation)."""
        return list(self.report.counts[split])


def _check_splits(site: SiteConfig, settings: DataSettings, report: SiteReport, log: ProblemLog) -> None:
    """Problems of the split as a whole: empty sides, classes missing from a side."""
    if sum(report.samples.values()) == 0:
        if not log.has_errors:
            log.error("the site has no samples", site.data_root)
        return
    for split, fraction in zip(SPLITS, settings.split_fractions, strict=True):
        if report.samples[split] == 0:
            if split in ("train", "val"):
                log.error(f"the {split} split is empty ({report.groups[split]} groups)", site.source_path)
            elif fraction > 0:
                log.warning("the test split is empty", site.source_path)
    for split in SPLITS:
        if report.samples[split] == 0:
            continue
        for name, count in zip(report.classes, report.counts[split], strict=True):
            if count == 0:
                log.warning(f"class '{name}' is absent from the {split} split", site.source_path,
                            kind=f"class absent from {split}")


def inspect_site(site: SiteConfig, settings: DataSettings | None = None, *, task: SiteReader) -> SiteData:
    """Find, validate and split one site with its task (the caller hands it in); data problems are collected in
    `report.problems`, not raised."""
    settings = settings or DataSettings()
    log = ProblemLog(site.name)
    if not site.data_root.is_dir():
        log.error("data_root folder not found", site.data_root)
        content = SiteContent(task.empty_classes(site, settings))
    elif not named_files_admitted(site, log):
        content = SiteContent(task.empty_classes(site, settings))
    else:
        content = task.read_site(site, settings, log)
    counts, foreground = {}, {}
    for split in SPLITS:
        counts[split], foreground[split] = task.split_counts(content.classes, content.splits[split])
    report = SiteReport(
        site=site.name,
        task=site.task,
        classes=content.classes,
        counts=counts,
        samples={split: len(content.splits[split]) for split in SPLITS},
        groups=dict(content.groups),
        foreground_slices={} if None in foreground.values() else foreground,
        dropped=dict(sorted(content.dropped.items())),
        filtered_out=content.filtered_out,
        statistics=content.statistics,
    )
    _check_splits(site, settings, report, log)
    report.problems = log.problems()
    return SiteData(site.name, site.task, content.classes, content.splits, report, content.geometry, site,
                    content.file_digests, content.original_masks)


def validate_site(site: SiteConfig, settings: DataSettings | None = None, *, task: SiteReader) -> list[Problem]:
    """Every problem (errors and warnings) of one site."""
    return inspect_site(site, settings, task=task).report.problems


def load_site(site: SiteConfig, settings: DataSettings | None = None, *, task: SiteReader) -> SiteData:
    """A site's data for training; raises one DataError listing every error (one line each)."""
    data = inspect_site(site, settings, task=task)
    errors = data.report.errors
    if errors:
        lines = "\n".join(f"  {problem}" for problem in errors)
        raise DataError(f"site '{site.name}' has {len(errors)} data problem(s):\n{lines}")
    return data
