"""Classification sites: map source labels to classes, prove the images decode, split by lesion.

Rules: a source label missing from the label map is an error; a known label mapped to null, or to a class
the experiment leaves out, is dropped and counted per source label. Images of one lesion stay on one side
of the split; images without a lesion id are their own group. Groups are stratified by class.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from medfl.config import DataSettings, SiteConfig
from medfl.data.containment import admitted
from medfl.data.dermoscopy import SourceRow, duplicate_ids, read_source_rows
from medfl.data.images import read_images
from medfl.data.problems import ProblemLog
from medfl.data.records import SiteContent
from medfl.data.shift import DERMOSCOPY, SampleStatistics
from medfl.data.splits import assign_splits


def site_classes(site: SiteConfig, settings: DataSettings) -> list[str]:
    """The experiment's classes, or (when it names none) the site's label-map targets in first-seen order."""
    return list(settings.classes) if settings.classes else site.label_targets()


def read_classification_site(site: SiteConfig, settings: DataSettings, log: ProblemLog) -> SiteContent:
    """Records of a classification site, split; every problem goes to `log`."""
    classes = site_classes(site, settings)
    content = SiteContent(classes)
    table = site.table_path
    for name in classes:
        if name not in site.label_targets():
            log.warning(f"class '{name}' is not a target of this site's label_map: the site has none", site.source_path)
    source = read_source_rows(site, log)
    if source is None:
        return content
    content.filtered_out = source.filtered_out
    if not source.rows:
        if site.filter is None:  # with a filter, the reader has said which filter values match nothing
            log.error("the table has no rows", table)
        return content
    rows = _known_rows(source.rows, site, log, table)
    kept, statistics, digests = _select_rows(rows, site, classes, content.dropped, log, table, settings.num_workers)
    content.statistics = SampleStatistics.from_rows(DERMOSCOPY, statistics)
    records = [
        {"image": str(row.path), "label": classes.index(_target(site, row)), "id": row.id,
         "lesion_id": row.lesion_id, "site": site.name}
        for row in kept
    ]
    labels: dict[str, Counter[int]] = {}
    for record in records:
        labels.setdefault(_group(record), Counter())[record["label"]] += 1
    assignment = assign_splits({r["id"]: _group(r) for r in records},
                               {group: str(counts.most_common(1)[0][0]) for group, counts in labels.items()},
                               site.split_path, settings.split_fractions, settings.split_seed, log)
    lesion_splits: dict[str, set[str]] = {}
    for record in records:
        split = assignment.get(record["id"])
        if split is not None:
            content.splits[split].append(record)
            content.file_digests[record["image"]] = digests[record["image"]]
            lesion_splits.setdefault(_group(record), set()).add(split)
    for group, splits in lesion_splits.items():
        for split in splits:
            content.groups[split] += 1
        if len(splits) > 1:
            log.warning(f"{group} has images in {' and '.join(sorted(splits))}", site.split_path, kind="lesion split")
    return content


def _target(site: SiteConfig, row: SourceRow) -> str | None:
    return (site.label_map or {}).get(row.label)


def _known_rows(rows: list[SourceRow], site: SiteConfig, log: ProblemLog, table: Path | None) -> list[SourceRow]:
    """Rows with a unique id and a label the map knows; one error per duplicate id and per unknown label."""
    duplicates = set(duplicate_ids(rows))
    for item in sorted(duplicates):
        log.error(f"image id '{item}' appears on {sum(r.id == item for r in rows)} rows", table, kind="duplicate image id")
    unknown = Counter(r.label for r in rows if r.label not in (site.label_map or {}))
    for label, count in sorted(unknown.items()):
        example = next(r.id for r in rows if r.label == label)
        known = ", ".join(site.label_map or {})
        log.error(f"label '{label}' ({count} rows, e.g. image '{example}') is not in the label_map (known: {known})",
                  table)
    return [r for r in rows if r.id not in duplicates and r.label not in unknown]


def _select_rows(rows: list[SourceRow], site: SiteConfig, classes: list[str], dropped: Counter[str], log: ProblemLog,
                 table: Path | None, workers: int) -> tuple[list[SourceRow], list[np.ndarray], dict[str, str]]:
    """Rows of the experiment's classes whose image exists inside the site's folders and decodes, with their
    images' colour statistics and the sha256 of each image file (by path); others dropped or reported."""
    wanted = []
    for row in rows:
        if _target(site, row) in classes:
            wanted.append(row)
        else:
            dropped[row.label] += 1
    present = []
    for row in wanted:
        if row.path is None:
            log.error(row.missing or f"image '{row.id}' not found", table, kind="image listed but absent")
        elif admitted(site, row.path, log, f"image '{row.id}'", kind="image outside the site's folders"):
            present.append(row)
    results = read_images([row.path for row in present if row.path is not None], workers)
    good, statistics, digests = [], [], {}
    for row, facts in zip(present, results, strict=True):
        if facts.verdict is None:
            good.append(row)
            statistics.append(facts.statistics)
            digests[str(row.path)] = facts.sha256
        else:
            log.error(facts.verdict, row.path, kind="unreadable image")
    return good, statistics, digests


def _group(record: dict) -> str:
    return f"lesion '{record['lesion_id']}'" if record["lesion_id"] else f"image '{record['id']}'"

