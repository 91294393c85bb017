"""Dermoscopy sites: read the label table of a layout (ham10000, isic2019, csv) into source rows.

A source row is one image as the site describes it: its id, its source label (before the label map), the
image file, and its lesion id when the site has one. Mapping labels to classes, splitting and checking the
image files happen in `medfl.data.classification`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from medfl.config import SiteConfig
from medfl.data.images import index_images
from medfl.data.problems import ProblemLog
from medfl.data.tables import read_table

HAM10000_LABELS = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
ISIC_DOWNSAMPLED = "_downsampled"


@dataclass(frozen=True)
class SourceRow:
    """One image of a classification site before its label is mapped (`missing`: why `path` is None)."""

    id: str
    label: str
    path: Path | None
    lesion_id: str | None
    missing: str | None = None


@dataclass
class SourceTable:
    """A site's rows after the row filter, and how many rows the filter removed."""

    rows: list[SourceRow]
    filtered_out: int = 0


def read_source_rows(site: SiteConfig, log: ProblemLog) -> SourceTable | None:
    """Read the site's table per its layout and apply its row filter; None when the table is unusable."""
    readers = {"ham10000": _read_ham10000, "isic2019": _read_isic2019, "csv": _read_csv}
    return readers[site.layout](site, log)


def _apply_filter(site: SiteConfig, rows: list[dict[str, str]], table: Path, log: ProblemLog) -> list[dict[str, str]] | None:
    if site.filter is None:
        return rows
    column = site.filter.column
    if rows and column not in rows[0]:
        log.error(f"filter column '{column}' is not a column of the table", table)
        return None
    wanted = set(site.filter.values)
    kept = [row for row in rows if row.get(column, "") in wanted]
    present = sorted({row.get(column, "") for row in rows})
    unmatched = [value for value in site.filter.values if value not in present]
    if unmatched:
        shown = ", ".join(f"'{v}'" for v in present[:20]) + (f" and {len(present) - 20} more" if len(present) > 20 else "")
        message = (f"filter value(s) {', '.join(repr(v) for v in unmatched)} match no row of column '{column}' "
                   f"(its values: {shown or 'none'})")
        if kept:
            log.warning(message, table)
        else:
            log.error(f"the table has no rows after the filter: {message}", table)
    return kept


def _find(index: dict[str, list[Path]], stems: list[str]) -> tuple[Path | None, str | None]:
    """The one file named after the first stem found (any supported extension), or why there is none."""
    for stem in stems:
        found = index.get(stem, [])
        if len(found) > 1:
            names = ", ".join(str(p) for p in found[:3])
            return None, f"image '{stem}' exists {len(found)} times under data_root ({names})"
        if found:
            return found[0], None
    return None, f"image '{stems[0]}' listed in the table is not under data_root"


def _lesion(value: str | None) -> str | None:
    return value if value else None


def _filtered_table(site: SiteConfig, required: list[str], log: ProblemLog) -> tuple[list[dict[str, str]], int] | None:
    """The table rows that pass the site's filter and how many it removed; None when the table is unusable."""
    table = site.table_path
    assert table is not None
    raw = read_table(table, required, log)
    if raw is None:
        return None
    kept = _apply_filter(site, raw, table, log)
    if kept is None:
        return None
    return kept, len(raw) - len(kept)


def _read_ham10000(site: SiteConfig, log: ProblemLog) -> SourceTable | None:
    filtered = _filtered_table(site, ["image_id", "dx"], log)
    if filtered is None:
        return None
    kept, removed = filtered
    index = index_images(site.data_root)
    rows = []
    for row in kept:
        path, missing = _find(index, [row["image_id"]])
        rows.append(SourceRow(row["image_id"], row["dx"], path, _lesion(row.get("lesion_id")), missing))
    return SourceTable(rows, removed)


def _isic_label(row: dict[str, str], columns: list[str], table: Path, log: ProblemLog) -> str | None:
    """The one column holding 1.0 in an ISIC one-hot ground-truth row."""
    hot = []
    for column in columns:
        try:
            value = float(row[column] or "nan")
        except ValueError:
            log.error(f"image '{row['image']}': value '{row[column]}' in column {column} is not a number", table,
                      kind="non-numeric ground truth")
            return None
        if value != value:
            log.error(f"image '{row['image']}': column {column} is empty", table, kind="non-numeric ground truth")
            return None
        if value >= 0.5:
            hot.append(column)
    if len(hot) != 1:
        what = "no label column holds 1.0" if not hot else f"several labels ({', '.join(hot)})"
        log.error(f"image '{row['image']}': {what}", table, kind="ground truth row without one label")
        return None
    return hot[0]


def _read_isic2019(site: SiteConfig, log: ProblemLog) -> SourceTable | None:
    table = site.table_path
    assert table is not None
    raw = read_table(table, ["image"], log)
    if raw is None:
        return None
    label_columns = [c for c in (raw[0] if raw else {}) if c and c != "image"]
    lesions: dict[str, str | None] = {}
    metadata_path = site.metadata_path
    if metadata_path is not None:
        metadata = read_table(metadata_path, ["image"], log, what="metadata table")
        if metadata is None:
            return None
        lesions = {row["image"]: _lesion(row.get("lesion_id")) for row in metadata}
        if site.filter is not None:
            extra = {row["image"]: row for row in metadata}
            raw = [{**extra.get(row["image"], {}), **row} for row in raw]
    kept = _apply_filter(site, raw, table, log)
    if kept is None:
        return None
    index = index_images(site.data_root)
    rows = []
    for row in kept:
        label = _isic_label(row, label_columns, table, log)
        if label is None:
            continue
        image_id = row["image"]
        # The table and the files disagree on the "_downsampled" suffix in some releases.
        other = image_id.removesuffix(ISIC_DOWNSAMPLED) if image_id.endswith(ISIC_DOWNSAMPLED) else image_id + ISIC_DOWNSAMPLED
        path, missing = _find(index, [image_id, other])
        rows.append(SourceRow(image_id, label, path, lesions.get(image_id), missing))
    return SourceTable(rows, len(raw) - len(kept))


def _read_csv(site: SiteConfig, log: ProblemLog) -> SourceTable | None:
    filtered = _filtered_table(site, ["image", "label"], log)
    if filtered is None:
        return None
    kept, removed = filtered
    rows = []
    for row in kept:
        path: Path | None = site.data_root / row["image"]
        missing = None
        if not row["image"] or not path.is_file():
            path, missing = None, f"image '{row['image']}' listed in the table is not under data_root"
        rows.append(SourceRow(row["image"], row["label"], path, _lesion(row.get("lesion_id")), missing))
    return SourceTable(rows, removed)


def duplicate_ids(rows: list[SourceRow]) -> list[str]:
    """Image ids that appear on more than one row."""
    counts = Counter(row.id for row in rows)
    return sorted(i for i, n in counts.items() if n > 1)
