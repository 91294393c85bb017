"""Prostate MRI sites: pair volumes with masks, split by case, cut volumes into axial slice records.

Pairing is by name, case-insensitively, never by numbering: `<case>.nii.gz` (or `.nii`, or `<case>.mhd`)
goes with `<case><mask_suffix>.<same extension>`. Splits are by case. Train keeps the slices chosen by the
`slices` setting; val and test keep every slice, so volumes can be reassembled and scored per case. With
`context_slices` = k, a slice's image holds 2k + 1 channels (edge slices repeated); without context, and
for interior slices, records hold views into the case's volume rather than copies.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from medfl.config import DataSettings, SiteConfig
from medfl.data.containment import admitted
from medfl.data.fingerprint import file_sha256
from medfl.data.problems import ProblemLog
from medfl.data.records import SiteContent
from medfl.data.shift import PROSTATE, SampleStatistics, grid_statistics, intensity_statistics
from medfl.data.splits import assign_splits
from medfl.data.volumes import PreparedCase, prepare_case

LAYOUT_EXTENSIONS = {"nifti": (".nii.gz", ".nii"), "metaimage": (".mhd",)}
_HEADER_LIMIT = 1 << 16  # a MetaImage header is a few hundred bytes; ElementDataFile is its last field
_PATTERN_LIMIT = 4096

T = TypeVar("T")


@dataclass(frozen=True)
class CaseFiles:
    """One case's image and mask files."""

    case_id: str
    image: Path
    mask: Path


def _split_name(path: Path, extensions: tuple[str, ...]) -> tuple[str, str] | None:
    """(stem, extension) when the file has one of the layout's extensions (any letter case)."""
    lower = path.name.lower()
    for extension in extensions:
        if lower.endswith(extension) and len(lower) > len(extension):
            return path.name[: -len(extension)], extension
    return None


def find_cases(site: SiteConfig, log: ProblemLog) -> list[CaseFiles]:
    """Pair every volume under data_root with its mask; unpaired or duplicate cases are errors."""
    suffix = site.effective_mask_suffix.lower()
    images: dict[str, list[Path]] = {}
    masks: dict[str, list[Path]] = {}
    for path in sorted(site.data_root.rglob("*")):
        named = _split_name(path, LAYOUT_EXTENSIONS[site.layout])
        if named is None or not path.is_file():
            continue
        stem = named[0]
        if stem.lower().endswith(suffix) and len(stem) > len(suffix):
            masks.setdefault(stem[: -len(suffix)].lower(), []).append(path)
        else:
            images.setdefault(stem.lower(), []).append(path)
    cases = []
    for key in sorted(images.keys() | masks.keys()):
        found_images, found_masks = images.get(key, []), masks.get(key, [])
        if len(found_images) > 1 or len(found_masks) > 1:
            files = ", ".join(p.name for p in found_images + found_masks)
            log.error(f"duplicate case id '{key}' (files: {files})", site.data_root, kind="duplicate case id")
        elif not found_masks:
            stem, extension = _split_name(found_images[0], LAYOUT_EXTENSIONS[site.layout]) or (key, "")
            log.error(f"no mask for this image (expected {stem}{site.effective_mask_suffix}{extension})",
                      found_images[0], kind="image without mask")
        elif not found_images:
            log.error("mask without an image of the same case", found_masks[0], kind="mask without image")
        elif _case_admitted(site, found_images[0], found_masks[0], log):
            name = _split_name(found_images[0], LAYOUT_EXTENSIONS[site.layout])
            cases.append(CaseFiles(name[0] if name else key, found_images[0], found_masks[0]))
    return cases


def _case_admitted(site: SiteConfig, image: Path, mask: Path, log: ProblemLog) -> bool:
    """Whether a case's files (and the data files its MetaImage headers name) lie inside the site's folders."""
    files = [("image", image), ("mask", mask)]
    for what, header in list(files):
        try:
            files += [(f"data file of the {what}", data) for data in metaimage_data_files(header)]
        except ValueError as error:
            log.error(str(error), header)
            return False
    verdicts = [admitted(site, path, log, what, kind=f"{what} outside the site's folders") for what, path in files]
    return all(verdicts)


def metaimage_data_files(header: Path) -> list[Path]:
    """The files a MetaImage header's ElementDataFile names, relative to the header's folder: one file,
    a `LIST` of files, or a `name%03d.raw first last step` pattern; none for LOCAL data or another format.

    ValueError when a pattern names more than _PATTERN_LIMIT files (each would have to be checked)."""
    if not header.name.lower().endswith(".mhd"):
        return []
    try:
        with open(header, "rb") as stream:
            lines = stream.read(_HEADER_LIMIT).decode("latin-1").splitlines()
    except OSError:
        return []  # the volume reader reports the unreadable header
    for number, line in enumerate(lines):
        key, _, value = line.partition("=")
        if key.strip() != "ElementDataFile":
            continue
        value = value.strip()
        if not value or value.upper() == "LOCAL":
            return []
        if value.split()[0].upper() == "LIST":
            return [header.parent / name.strip() for name in lines[number + 1 :] if name.strip()]
        pattern, *numbers = value.split()
        if "%" not in pattern or len(numbers) < 2:
            return [header.parent / value]
        try:
            first, last, step = (int(n) for n in (numbers + ["1"])[:3])
        except ValueError:
            return [header.parent / value]
        indices = range(first, last + 1, step or 1)
        if len(indices) > _PATTERN_LIMIT:
            raise ValueError(f"ElementDataFile names {len(indices)} files (at most {_PATTERN_LIMIT} are read)")
        try:
            return [header.parent / (pattern % index) for index in indices]
        except (TypeError, ValueError):
            return [header.parent / pattern]
    return []


def case_file_digests(case: CaseFiles) -> dict[str, str]:
    """sha256 of every file of a case just read (image, mask, and the voxel files their MetaImage headers
    name), by path: the files are in the page cache, so this costs little more than the hashing itself."""
    files = [case.image, case.mask, *metaimage_data_files(case.image), *metaimage_data_files(case.mask)]
    return {str(path): file_sha256(path) for path in files}


def read_cases(files: Sequence[CaseFiles], read: Callable[[CaseFiles], tuple[T | None, list[tuple[Path, str]]]],
               workers: int, log: ProblemLog) -> tuple[list[tuple[CaseFiles, T]], dict[str, dict[str, str]]]:
    """`read` (a case's files -> what it made of them, or None, and the problems it found) over every case in
    `workers` threads, problems to `log`; the cases read, in order, with the sha256 of each file by case id
    (the site's fingerprint). The slice-wise and the volumetric readers differ only in `read`."""

    def one(case: CaseFiles) -> tuple[T | None, list[tuple[Path, str]], dict[str, str]]:
        result, problems = read(case)
        return result, problems, case_file_digests(case) if result is not None else {}

    kept: list[tuple[CaseFiles, T]] = []
    digests: dict[str, dict[str, str]] = {}
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for case, (result, problems, case_digests) in zip(files, pool.map(one, files), strict=True):
            for path, message in problems:
                log.error(message, path)
            if result is not None:
                kept.append((case, result))
                digests[case.case_id] = case_digests
    return kept, digests


def split_by_case(case_ids: Sequence[str], site: SiteConfig, settings: DataSettings,
                  log: ProblemLog) -> dict[str, str]:
    """Each case's split (a case is its own group; ids compared without case), by the site's split file or the
    settings' fractions and seed; cases without one are left out."""
    cases = {case_id: case_id.lower() for case_id in case_ids}
    assignment = assign_splits(cases, dict.fromkeys(cases.values(), "case"), site.split_path,
                               settings.split_fractions, settings.split_seed, log, ignore_case=True)
    return {case_id: assignment[key] for case_id, key in cases.items() if key in assignment}


def add_case(content: SiteContent, case_id: str, split: str, geometry: Any, digests: dict[str, str],
             statistics: list[np.ndarray], row: np.ndarray) -> None:
    """What a site's content records of every case it keeps, whatever its records: grid, file digests, the
    split's case count and the case's shift statistics."""
    statistics.append(row)
    content.geometry[case_id] = geometry
    content.file_digests.update(digests)
    content.groups[split] += 1


def select_slices(mask: np.ndarray, mode: str, empty_fraction: float, seed: int, case_id: str) -> list[int]:
    """Training slice indices: all, or those with foreground plus a seeded share of the empty ones."""
    depth = mask.shape[0]
    if mode == "all":
        return list(range(depth))
    has_foreground = mask.reshape(depth, -1).any(axis=1)
    foreground = [i for i in range(depth) if has_foreground[i]]
    empty = sorted(
        (i for i in range(depth) if not has_foreground[i]),
        key=lambda i: hashlib.sha256(f"{seed}\0{case_id}\0{i}".encode()).hexdigest(),
    )
    keep = math.floor(len(empty) * empty_fraction + 0.5)
    return sorted(foreground + empty[:keep])


def slice_record(case: PreparedCase, index: int, context: int, site: str) -> dict[str, Any]:
    """The record of one axial slice; its image holds 2 * context + 1 neighbouring slices as channels."""
    depth = case.image.shape[0]
    low, high = index - context, index + context + 1
    if low >= 0 and high <= depth:
        image = case.image[low:high]
    else:
        image = case.image[np.clip(np.arange(low, high), 0, depth - 1)]
    return {
        "image": image,
        "label": case.mask[index : index + 1],
        "case_id": case.case_id,
        "slice_index": index,
        "num_slices": depth,
        "site": site,
    }


def read_segmentation_site(site: SiteConfig, settings: DataSettings, log: ProblemLog) -> SiteContent:
    """Slice records of a segmentation site, split by case; every problem goes to `log`."""
    content = SiteContent(["background", "prostate"])
    read, digests = read_cases(
        find_cases(site, log), lambda case: prepare_case(case.case_id, case.image, case.mask, settings.input_size),
        settings.num_workers, log)
    prepared = [case for _, case in read]
    assignment = split_by_case([case.case_id for case in prepared], site, settings, log)
    statistics: list[np.ndarray] = []
    for case in prepared:
        split = assignment.get(case.case_id)
        if split is None:
            continue
        grid = case.geometry
        add_case(content, case.case_id, split, grid, digests[case.case_id], statistics,
                 np.concatenate([intensity_statistics(case.image, case.mask),
                                 grid_statistics(grid.size, grid.spacing, grid.direction, case.raw_range[1])]))
        indices = (
            select_slices(case.mask, settings.slices, settings.empty_slice_fraction, settings.split_seed, case.case_id)
            if split == "train"
            else range(case.image.shape[0])
        )
        content.splits[split] += [slice_record(case, i, settings.context_slices, site.name) for i in indices]
        if split != "train" and case.original is not None:
            content.original_masks[case.case_id] = case.original  # scored whole, on its own grid too
    content.statistics = SampleStatistics.from_rows(PROSTATE, statistics)
    return content

