"""Write one synthetic dermoscopy site in its source's real layout (HAM10000, ISIC 2019 or a plain CSV).

Images are grouped into lesions (most with one image, some with two or three views of the same lesion,
sharing a lesion id), get realistic ids (ISIC_0024306, HAM_0000118), and are written as RGB JPEGs with
the site's acquisition. Besides the federation's classes, a site holds a few rows of source classes the
federation leaves out (e.g. bcc), and derm_b's folder also holds rows of another HAM10000 `dataset` that its
filter leaves out, so that readers' "dropped" and "filtered" counts have something to count.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from medfl.synth.acquisition import Acquisition, acquire, random_acquisition
from medfl.synth.files import claim_folder, csv_text, prune, write_bytes, write_text
from medfl.synth.lesions import CLASSES, render_lesion, sample_lesion
from medfl.synth.rng import rng_for
from medfl.synth.sites import DermSite, Minimums

# Source label names of the federation's classes (nv, bkl, mel) in each layout, then the layout's other labels.
SOURCE_LABELS = {
    "ham10000": (("nv", "bkl", "mel"), ("akiec", "bcc", "df", "vasc")),
    "isic2019": (("NV", "BKL", "MEL"), ("BCC", "AK", "DF", "VASC", "SCC", "UNK")),
    "csv": (("nevus", "benign_keratosis", "melanoma"), ("basal_cell_carcinoma",)),
}
TABLES = {
    "ham10000": "HAM10000_metadata.csv",
    "isic2019": "ISIC_2019_Training_GroundTruth.csv",
    "csv": "labels.csv",
}
ISIC_METADATA = "ISIC_2019_Training_Metadata.csv"
ISIC_COLUMNS = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")
ID_STRIDE = 40_000  # image and lesion numbers of site i lie in [24306 + i * stride, 24306 + (i + 1) * stride)
MAX_SCALE = 5.0  # keeps every site's ids inside its own stride

_LOCALIZATIONS = (
    "back",
    "lower extremity",
    "trunk",
    "upper extremity",
    "abdomen",
    "face",
    "chest",
    "neck",
    "scalp",
)
_ANATOM_SITES = ("anterior torso", "posterior torso", "upper extremity", "lower extremity", "head/neck", "")
_FOREIGN_DATASET = "vienna_dias"


@dataclass
class Row:
    """One image of the site's table."""

    image_id: str
    lesion_id: str
    source_label: str
    label: str | None  # federation class, None for rows the federation leaves out
    dataset: str | None
    lesion_index: int  # seeds the lesion's appearance, shared by its images
    drawn_as: str  # class whose appearance the lesion has
    acquisition: Acquisition


@dataclass
class DermResult:
    """What was written for one dermoscopy site."""

    name: str
    folder: Path
    layout: str
    class_counts: dict[str, int]
    dropped: dict[str, int]
    filtered: int
    files: int
    changed: int
    records: list[dict] = field(default_factory=list)  # {"image": path, "label": class, "lesion_id": str}


def _lesion_sizes(images: int, lesions: int, rng: np.random.Generator) -> list[int]:
    """Lesions of 1 (most), 2 or 3 images: at least `images` images in total and at least `lesions` lesions."""
    sizes: list[int] = []
    while sum(sizes) < images or len(sizes) < lesions:
        size = int(rng.choice([1, 2, 3], p=[0.75, 0.17, 0.08]))
        sizes.append(size if len(sizes) < lesions else min(size, images - sum(sizes)))
    return sizes


@dataclass(frozen=True)
class _Group:
    """Rows that share a source label, a dataset and an acquisition."""

    source: str
    label: str | None
    drawn_as: str
    dataset: str | None
    acquisition: Acquisition
    images: int
    min_lesions: int = 1


def _groups(
    site: DermSite, seed: int, scale: float, minimums: Minimums, rng: np.random.Generator
) -> list[_Group]:
    """The site's federation classes, its left-out source classes and (derm_b) another dataset's rows."""
    kept, _ = SOURCE_LABELS[site.layout]
    groups = [
        _Group(source, cls, cls, site.dataset, site.acquisition, total, minimums.lesions())
        for cls, source, total in zip(CLASSES, kept, site.totals(scale), strict=True)
    ]
    for source, total in site.dropped:
        groups.append(
            _Group(source, None, str(rng.choice(["bkl", "mel"])), site.dataset, site.acquisition, total)
        )
    if site.foreign:
        foreign_acq = random_acquisition(rng_for(seed, site.name, "foreign"))
        for cls, source in zip(CLASSES, kept, strict=True):
            groups.append(
                _Group(source, cls, cls, _FOREIGN_DATASET, foreign_acq, site.foreign // len(CLASSES))
            )
    return groups


def _plan_rows(site: DermSite, index: int, seed: int, scale: float, minimums: Minimums) -> list[Row]:
    """All rows of a site, with ids; deterministic in (seed, site name, index, scale, minimums)."""
    rng = rng_for(seed, site.name, "plan")
    lesions = [
        (group, size)
        for group in _groups(site, seed, scale, minimums, rng)
        for size in _lesion_sizes(group.images, group.min_lesions, rng)
    ]
    n_images = sum(size for _, size in lesions)
    base = 24306 + index * ID_STRIDE
    image_numbers = rng.permutation(base + np.sort(rng.choice(ID_STRIDE, n_images, replace=False)))
    lesion_numbers = rng.permutation(base + np.sort(rng.choice(ID_STRIDE, len(lesions), replace=False)))
    rows: list[Row] = []
    for lesion_index, (group, size) in enumerate(lesions):
        for _ in range(size):
            rows.append(
                Row(
                    image_id=f"ISIC_{int(image_numbers[len(rows)]):07d}",
                    lesion_id=f"HAM_{int(lesion_numbers[lesion_index]):07d}",
                    source_label=group.source,
                    label=group.label,
                    dataset=group.dataset,
                    lesion_index=lesion_index,
                    drawn_as=group.drawn_as,
                    acquisition=group.acquisition,
                )
            )
    return rows


def _jpeg(row: Row, site: DermSite, seed: int) -> bytes:
    """Render, acquire and encode one image."""
    lesion = sample_lesion(row.drawn_as, rng_for(seed, site.name, "lesion", row.lesion_index), site.skin_tone)
    view = render_lesion(
        lesion, row.acquisition.resolution, rng_for(seed, site.name, "view", row.image_id),
        row.acquisition.magnification,
    )
    pixels = acquire(view, row.acquisition, rng_for(seed, site.name, "acquire", row.image_id))
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="JPEG", quality=row.acquisition.jpeg_quality)
    return buffer.getvalue()


def _demographics(row: Row, rng: np.random.Generator) -> tuple[str, str]:
    """(age, sex) as HAM10000 writes them; melanoma patients are older on average."""
    age = np.clip(rng.normal(62 if row.drawn_as == "mel" else 45, 15), 5, 85)
    sex = str(rng.choice(["male", "female", "unknown"], p=[0.5, 0.47, 0.03]))
    return f"{5 * round(age / 5):.1f}", sex


def _ham_layout(rows: list[Row], rng: np.random.Generator) -> tuple[dict[str, Row], dict[str, str]]:
    """Image paths (HAM10000_images_part_1/2) and the metadata table."""
    ordered = sorted(rows, key=lambda r: r.image_id)
    half = (len(ordered) + 1) // 2
    paths = {
        f"HAM10000_images_part_{1 if i < half else 2}/{row.image_id}.jpg": row
        for i, row in enumerate(ordered)
    }
    table_rows = []
    for row in sorted(rows, key=lambda r: (r.lesion_id, r.image_id)):
        age, sex = _demographics(row, rng)
        dx_type = (
            "histo"
            if row.drawn_as == "mel" or rng.uniform() < 0.3
            else str(rng.choice(["follow_up", "consensus"]))
        )
        localization = str(rng.choice(_LOCALIZATIONS))
        table_rows.append(
            (row.lesion_id, row.image_id, row.source_label, dx_type, age, sex, localization, row.dataset)
        )
    header = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization", "dataset")
    return paths, {TABLES["ham10000"]: csv_text(header, table_rows)}


def _isic_layout(
    rows: list[Row], site: DermSite, rng: np.random.Generator
) -> tuple[dict[str, Row], dict[str, str]]:
    """ISIC_2019_Training_Input/ images (some `_downsampled`), one-hot ground truth and metadata tables."""
    lesion_sizes: dict[str, int] = {}
    for row in rows:
        lesion_sizes[row.lesion_id] = lesion_sizes.get(row.lesion_id, 0) + 1
    ordered = sorted(rows, key=lambda r: r.image_id)
    n_small = max(1, round(site.downsampled * len(ordered))) if site.downsampled else 0
    small = {ordered[i].image_id for i in rng.choice(len(ordered), n_small, replace=False)}
    paths: dict[str, Row] = {}
    truth, metadata = [], []
    for row in ordered:
        name = row.image_id + ("_downsampled" if row.image_id in small else "")
        paths[f"ISIC_2019_Training_Input/{name}.jpg"] = row
        truth.append((name, *("1.0" if column == row.source_label else "0.0" for column in ISIC_COLUMNS)))
        age, sex = _demographics(row, rng)
        lesion = (
            row.lesion_id.replace("HAM_", "BCN_")
            if lesion_sizes[row.lesion_id] > 1 or rng.uniform() < 0.5
            else ""
        )
        metadata.append((name, age, str(rng.choice(_ANATOM_SITES)), lesion, sex))
    return paths, {
        TABLES["isic2019"]: csv_text(("image", *ISIC_COLUMNS), truth),
        ISIC_METADATA: csv_text(("image", "age_approx", "anatom_site_general", "lesion_id", "sex"), metadata),
    }


def _csv_layout(rows: list[Row], rng: np.random.Generator) -> tuple[dict[str, Row], dict[str, str]]:
    """images/<year>/<id>.jpg and a labels.csv with image paths relative to the site folder."""
    paths: dict[str, Row] = {}
    for row in sorted(rows, key=lambda r: r.image_id):
        paths[f"images/{int(rng.integers(2012, 2018))}/{row.image_id}.jpg"] = row
    table = [(path, row.source_label, row.lesion_id) for path, row in paths.items()]
    return paths, {TABLES["csv"]: csv_text(("image", "label", "lesion_id"), table)}


def write_derm_site(
    site: DermSite, index: int, root: Path, seed: int, scale: float, minimums: Minimums
) -> DermResult:
    """Write site `index` (0-based, keeps ids distinct across sites) under `root/<name>`; prune stale files."""
    folder = Path(root) / site.name
    claim_folder(folder)
    rows = _plan_rows(site, index, seed, scale, minimums)
    table_rng = rng_for(seed, site.name, "tables")
    if site.layout == "ham10000":
        paths, tables = _ham_layout(rows, table_rng)
    elif site.layout == "isic2019":
        paths, tables = _isic_layout(rows, site, table_rng)
    else:
        paths, tables = _csv_layout(rows, table_rng)
    changed = 0
    for relative, row in paths.items():
        changed += write_bytes(folder / relative, _jpeg(row, site, seed))
    for name, text in tables.items():
        changed += write_text(folder / name, text)
    written = [folder / p for p in [*paths, *tables]]
    prune(folder, written)

    kept = [(p, r) for p, r in paths.items() if r.dataset == site.dataset]
    dropped: dict[str, int] = {}
    for _, row in kept:
        if row.label is None:
            dropped[row.source_label] = dropped.get(row.source_label, 0) + 1
    return DermResult(
        name=site.name,
        folder=folder,
        layout=site.layout,
        class_counts={cls: sum(r.label == cls for _, r in kept) for cls in CLASSES},
        dropped=dropped,
        filtered=len(paths) - len(kept),
        files=len(written),
        changed=changed,
        records=[
            {"image": str(folder / p), "label": r.label, "lesion_id": r.lesion_id} for p, r in kept if r.label
        ],
    )
