"""Which synthetic sites exist: the reference sites and randomly drawn extra ones, and how many samples each has.

Counts. `--scale` multiplies the reference sites' TRAINING counts and turns them into per-class TOTALS that a
70/10/20 train/val/test split divides: total = round(train_count / 0.7 * scale) images. Splits keep a lesion's
images together, so the minimum is counted in lesions: every class has at least `Minimums.lesions()` lesions,
the smallest number whose 70/10/20 split still leaves the minimum train, validation and test counts, plus a
20% margin for whole-lesion rounding (defaults 10/5/5 give 60 lesions, about 80 images). Prostate sites have
`round(reference_cases * scale)` cases, at least `Minimums.cases` (default 10: a 70/10/20 split by case
then has 7/1/2).
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass

import numpy as np

from medfl.synth.acquisition import Acquisition, random_acquisition
from medfl.synth.phantom import LPS_AXES, RAS_AXES, Population, Scanner, random_scanner, rotation_x
from medfl.synth.rng import rng_for

SPLIT_FRACTIONS = (0.7, 0.1, 0.2)
SPLIT_MARGIN = 1.2
DEFAULT_SCALE = 0.1


@dataclass(frozen=True)
class Minimums:
    """Per-class minimum counts every dermoscopy site keeps in each split of a 70/10/20 split, and the
    minimum number of cases of a prostate site."""

    train: int = 10
    val: int = 5
    test: int = 5
    cases: int = 10

    def lesions(self) -> int:
        """Smallest per-class number of lesions that leaves these counts after the split, with the margin."""
        needed = max(n / f for n, f in zip((self.train, self.val, self.test), SPLIT_FRACTIONS, strict=True))
        return math.ceil(round(needed * SPLIT_MARGIN, 6))


@dataclass(frozen=True)
class DermSite:
    """A dermoscopy site: where its rows come from, how many per class, how it images."""

    name: str
    layout: str  # ham10000 | isic2019 | csv
    train_counts: tuple[int, int, int]  # reference training counts of nv, bkl, mel (before scaling)
    acquisition: Acquisition
    dataset: str | None = None  # ham10000 `dataset` value the site's filter keeps
    foreign: int = 0  # rows of another `dataset` in the same folder, left out by the filter
    dropped: tuple[tuple[str, int], ...] = ()  # rows of source classes the federation leaves out
    downsampled: float = 0.0  # isic2019: share of images named ISIC_xxxxxxx_downsampled
    skin_tone: tuple[float, float] = (0.0, 1.0)  # range of the patients' skin tones (0 very light, 1 brown)

    def totals(self, scale: float) -> tuple[int, int, int]:
        """Per-class image totals (nv, bkl, mel) at `scale`, before the per-class minimum number of lesions."""
        return tuple(round(n / SPLIT_FRACTIONS[0] * scale) for n in self.train_counts)


@dataclass(frozen=True)
class ProstateSite:
    """A prostate MRI site: file layout, number of cases and scanner."""

    name: str
    layout: str  # nifti | metaimage
    cases: int  # reference number of cases (before scaling)
    scanner: Scanner
    mask_suffix: str = "_segmentation"
    split_file: bool = False  # ships an official split.csv
    population: Population = Population()  # the site's patients: gland sizes (default: no site term)

    def num_cases(self, scale: float, minimum: int) -> int:
        """Number of cases at `scale`, at least `minimum`."""
        return max(minimum, round(self.cases * scale))


REFERENCE_DERM = (
    DermSite(  # ~ HAM10000 ViDIR modern
        "derm_a", "ham10000", (1282, 333, 476),
        Acquisition(96, (1.04, 0.98, 0.93), 0.10, 0.004, 0.010, 0.30, 0.15, False, 92),
        dataset="vidir_modern", dropped=(("bcc", 3), ("akiec", 2)),
    ),
    DermSite(  # ~ HAM10000 ViDIR MoleMax: an older, low-resolution camera
        "derm_b", "ham10000", (2604, 87, 17),
        Acquisition(64, (0.94, 1.02, 1.08), 0.05, 0.010, 0.025, 0.15, 0.30, False, 85),
        dataset="vidir_molemax", foreign=12, dropped=(("df", 2),),
    ),
    DermSite(  # ~ Rosendahl, delivered as a plain CSV
        "derm_c", "csv", (562, 343, 239),
        Acquisition(80, (1.08, 0.95, 0.88), 0.30, 0.006, 0.020, 0.50, 0.10, False, 90),
        dropped=(("basal_cell_carcinoma", 3),),
    ),
    DermSite(  # ~ ISIC challenge images: contact dermoscope ring, mixed sources
        "derm_d", "isic2019", (960, 178, 262),
        Acquisition(128, (1.00, 1.00, 1.03), 0.15, 0.002, 0.015, 0.25, 0.35, True, 80),
        dropped=(("BCC", 3), ("AK", 2)), downsampled=0.1,
    ),
)  # fmt: skip

REFERENCE_PROSTATE = (
    ProstateSite("prost_a", "nifti", 30, Scanner(64, 20, 2.2, 3.6, LPS_AXES, "int16", 1200, 1.0, 0.20, 0.02, "zones")),
    ProstateSite(
        "prost_b", "nifti", 30, Scanner(80, 24, 1.75, 3.0, LPS_AXES, "int16", 4095, 0.8, 0.35, 0.03, "zones"),
        mask_suffix="_Segmentation",
    ),
    ProstateSite("prost_c", "nifti", 19, Scanner(96, 32, 1.4, 2.0, RAS_AXES, "float32", 1.0, 1.2, 0.10, 0.015, "255")),
    ProstateSite(
        "prost_d", "metaimage", 13, Scanner(64, 16, 2.3, 4.0, rotation_x(6.0), "int16", 800, 0.7, 0.25, 0.04, "binary")
    ),
    ProstateSite("prost_e", "nifti", 12, Scanner(48, 28, 3.0, 2.5, LPS_AXES, "int16", 2000, 0.6, 0.40, 0.05, "binary")),
    ProstateSite(
        "prost_f", "nifti", 12, Scanner(72, 12, 1.9, 5.0, LPS_AXES, "int16", 600, 0.9, 0.15, 0.025, "zones"),
        split_file=True,
    ),
)  # fmt: skip

_DERM_LAYOUTS = ("ham10000", "csv", "isic2019")
_DROPPED = {"ham10000": ("bcc", "akiec"), "csv": ("basal_cell_carcinoma",), "isic2019": ("BCC", "AK")}


def site_name(prefix: str, index: int) -> str:
    """`prefix_a`, ..., `prefix_z`, `prefix_aa`, ...: the name of the index-th site (0-based)."""
    letters = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        letters = string.ascii_lowercase[rest] + letters
    return f"{prefix}_{letters}"


def derm_sites(count: int, seed: int) -> list[DermSite]:
    """The first `count` dermoscopy sites: the reference ones, then extra ones drawn from (seed, name)."""
    sites = list(REFERENCE_DERM[:count])
    for index in range(len(sites), count):
        name = site_name("derm", index)
        rng = rng_for(seed, "site", name)
        layout = _DERM_LAYOUTS[index % len(_DERM_LAYOUTS)]
        total = rng.uniform(1100, 2700)
        mix = rng.dirichlet((2.0, 1.0, 1.0))
        sites.append(
            DermSite(
                name, layout, tuple(int(round(total * share)) for share in mix), random_acquisition(rng),
                dataset=name if layout == "ham10000" else None,
                dropped=((_DROPPED[layout][0], int(rng.integers(1, 4))),),
                downsampled=0.1 if layout == "isic2019" else 0.0,
            )
        )  # fmt: skip
    return sites


def prostate_sites(count: int, seed: int) -> list[ProstateSite]:
    """The first `count` prostate sites: the reference ones, then extra ones drawn from (seed, name)."""
    sites = list(REFERENCE_PROSTATE[:count])
    for index in range(len(sites), count):
        name = site_name("prost", index)
        rng = rng_for(seed, "site", name)
        sites.append(
            ProstateSite(
                name,
                "metaimage" if index % 4 == 3 else "nifti",
                int(rng.integers(12, 31)),
                random_scanner(rng),
                mask_suffix=str(rng.choice(["_segmentation", "_Segmentation"])),
            )
        )
    return sites


def case_ids(count: int, rng: np.random.Generator) -> list[str]:
    """Non-contiguous PROMISE12-style case ids (Case00, Case03, Case04, Case07, ...)."""
    gaps = rng.integers(1, 4, count)
    gaps[0] = rng.integers(0, 3)
    if count > 1 and (gaps[1:] == 1).all():
        gaps[-1] = 2
    return [f"Case{number:02d}" for number in np.cumsum(gaps)]
