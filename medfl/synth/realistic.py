"""The realistic preset (`medfl synth --shift realistic`): the reference sites with real-world site shift.

Same site names, layouts, file conventions and reference counts as the mild preset (medfl.synth.sites); what
changes is how differently the sites image and whom they image. Values come from the physics of the devices
first, so that the shift is neither tuned nor arbitrary:

Dermoscopy (what one clinic's dermatoscope, camera and patients do to every image):
- colour response: per-channel gains 0.75-1.25 (white balance of the light source and sensor), tone-curve
  contrast 0.6-1.3 about mid-grey, black-level offsets (veiling glare of old optics), per-image white-balance
  jitter (auto white balance; mixed devices at the ISIC-like site);
- magnification x0.6-1.7: a dermatoscope's field of view and working distance decide how large a lesion is in
  the frame (a wide-field compact camera against a video dermatoscope filling the frame);
- resolution with blur, noise and JPEG quality: one low-resolution site (48 px, soft optics, sensor noise,
  JPEG quality 70), like the older video dermatoscope of HAM10000's MoleMax images;
- the black ring of a contact dermatoscope at two sites, and vignetting from none to strong;
- skin tone: each site's population has its own range (central Europe light; sun-damaged Queensland skin
  darker; the mixed ISIC-like site the whole range);
- the reference class mix, with per-class minimums only as large as a 70/10/20 split needs (`MINIMUMS`).

Prostate T2-weighted MRI (the multi-site collection's protocols, rounded into the ranges below):
- field of view 120-240 mm (the largest 2x the smallest), in-plane spacing 0.4-0.78 mm, matrices <= 320;
- slice thickness 1.25-4 mm (a 3-D acquisition against thick 2-D slices), covering 60-72 mm;
- field strength: noise 0.045-0.055 of the brightest tissue at 1.5 T against 0.018-0.02 at 3 T (2.2-3x);
  a stronger bias field at 3 T (dielectric effects);
- receive coils: an endorectal coil (near-field brightening up to 3-4x at the balloon's wall, falling as
  1/r^2, with the gland pushed forward, compressed front to back and flattened behind) at three sites, a
  phased-array surface coil brightening the body wall at the others;
- tissue contrast (TE/TR): the peripheral and central zones' signal above muscle, and fat's signal;
- patients: gland-size distribution (median linear factor 0.85-1.25, BPH-rich populations with a larger
  central gland).
medfl z-scores every volume after a 0.5/99.5 percentile clip, so a plain intensity scale would vanish;
every choice above changes what survives it (contrast between tissues, noise, coil profiles, geometry,
anatomy).

The sites above are constants: `--seed` changes patients and splits, not hospitals. `--site-seed N` (N > 0)
draws every site's acquisition and patients' range from the ranges `random_realistic_acquisition` and
`random_realistic_scanner` draw extra sites from (the ones listed above), seeded by (N, site): a second set of
hospitals with the same names, layouts, class mixes and storage conventions. `--site-seed 0` is the constants.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from medfl.synth.acquisition import Acquisition
from medfl.synth.phantom import Population, Scanner, random_scanner
from medfl.synth.rng import rng_for
from medfl.synth.sites import (
    REFERENCE_DERM,
    REFERENCE_PROSTATE,
    DermSite,
    Minimums,
    ProstateSite,
    derm_sites,
    prostate_sites,
)

SHIFTS = ("mild", "realistic")
# What a 70/10/20 split by lesion needs and no more: one lesion per class in each split (12 lesions per
# class with the split margin); prostate sites keep the mild preset's 10 cases.
MINIMUMS = Minimums(train=1, val=1, test=1, cases=10)

T3_NOISE, T15_NOISE = 0.02, 0.05  # Rician noise relative to the brightest tissue: SNR grows about with B0


def _derm(site: DermSite, acquisition: Acquisition, skin_tone: tuple[float, float]) -> DermSite:
    return replace(site, acquisition=acquisition, skin_tone=skin_tone)


_A, _B, _C, _D = REFERENCE_DERM
REALISTIC_DERM = (
    # ViDIR modern: polarised dermatoscope on a good camera; warm white balance, crisp; central Europe.
    _derm(_A, Acquisition(128, (1.12, 1.00, 0.84), 0.10, 0.004, 0.008, 0.30, 0.10, False, 92,
                          contrast=1.15, cast_jitter=0.03, magnification=1.0), (0.0, 0.40)),
    # ViDIR MoleMax: older low-resolution video dermatoscope filling the frame; cool cast, flat tone curve
    # with a raised black level, soft optics, sensor noise, strong vignetting, JPEG quality 70.
    _derm(_B, Acquisition(48, (0.80, 1.04, 1.24), 0.05, 0.025, 0.05, 0.15, 0.45, False, 70,
                          contrast=0.65, offset=(0.06, 0.05, 0.08), cast_jitter=0.02, magnification=1.6),
          (0.0, 0.35)),
    # Rosendahl: contact immersion dermatoscope on a compact camera, wide field; red cast, punchy contrast,
    # black ring; older, sun-damaged Queensland skin.
    _derm(_C, Acquisition(96, (1.24, 0.94, 0.78), 0.30, 0.008, 0.012, 0.50, 0.25, True, 88,
                          contrast=1.30, offset=(0.0, -0.02, -0.03), cast_jitter=0.04, magnification=0.65),
          (0.25, 0.75)),
    # ISIC challenge mixture: many clinics and devices (large per-image colour jitter), contact ring,
    # the whole range of skin tones.
    _derm(_D, Acquisition(112, (0.96, 0.98, 1.06), 0.15, 0.010, 0.015, 0.35, 0.35, True, 80,
                          contrast=0.95, cast_jitter=0.10, magnification=1.2), (0.0, 1.0)),
)  # fmt: skip


def mr_scanner(base: Scanner, *, fov: float, matrix: int, thickness: float, slices: int, tesla: float,
               bias: float, endorectal: float = 0.0, surface: float = 0.0, contrast: float = 1.0,
               peripheral: float = 0.30, central: float = 0.10, fat: float = 0.85,
               noise_factor: float = 1.0) -> Scanner:
    """A site's protocol on `base`'s storage conventions (axes, dtype, range, labels): spacing = fov / matrix,
    noise from the field strength (1.5 T: `T15_NOISE`, 3 T: `T3_NOISE`, times `noise_factor`); float32 data
    hold 12-bit values times a slope, as reconstructed magnitude images do (and compress to half the size)."""
    noise = (T15_NOISE if tesla < 2 else T3_NOISE) * noise_factor
    return replace(base, matrix=matrix, slices=slices, spacing=round(fov / matrix, 4), thickness=thickness,
                   contrast=contrast, bias=bias, noise=noise, fat=fat, peripheral=peripheral, central=central,
                   endorectal=endorectal, surface=surface, float_levels=4095 if base.dtype == "float32" else 0)


def _prostate(site: ProstateSite, scanner: Scanner, population: Population) -> ProstateSite:
    return replace(site, scanner=scanner, population=population)


_PA, _PB, _PC, _PD, _PE, _PF = REFERENCE_PROSTATE
REALISTIC_PROSTATE = (
    # RUNMC-like: 3 T, pelvic surface array, 0.625 mm in-plane, 4 mm slices.
    _prostate(_PA, mr_scanner(_PA.scanner, fov=180, matrix=288, thickness=4.0, slices=18, tesla=3.0, bias=0.30,
                              surface=0.6), Population(gland_spread=0.10)),
    # BMC-like: 1.5 T with an endorectal coil, small field of view, 0.4 mm in-plane, 3 mm slices; older men.
    _prostate(_PB, mr_scanner(_PB.scanner, fov=120, matrix=300, thickness=3.0, slices=24, tesla=1.5, bias=0.15,
                              endorectal=2.5, contrast=0.8, peripheral=0.26, central=0.12),
              Population(gland_scale=1.15, gland_spread=0.12, central_extra=0.08)),
    # HCRUDB/I2CVB-like: 3 T 3-D acquisition with 1.25 mm slices, surface array, strong T2 contrast.
    _prostate(_PC, mr_scanner(_PC.scanner, fov=175, matrix=224, thickness=1.25, slices=52, tesla=3.0, bias=0.35,
                              surface=0.4, contrast=1.25, peripheral=0.36, central=0.06),
              Population(gland_scale=0.9, gland_spread=0.10)),
    # UCL (PROMISE12)-like: 1.5 T, surface array, 3.6 mm slices, flat contrast, darker fat; BPH-rich population.
    _prostate(_PD, mr_scanner(_PD.scanner, fov=160, matrix=256, thickness=3.6, slices=18, tesla=1.5, bias=0.20,
                              surface=0.5, contrast=0.7, peripheral=0.24, central=0.12, fat=0.75,
                              noise_factor=0.9), Population(gland_scale=1.25, gland_spread=0.15,
                                                            central_extra=0.10)),
    # BIDMC-like: 3 T with an endorectal coil, 0.4 mm in-plane (finer in reality), 2.5 mm slices.
    _prostate(_PE, mr_scanner(_PE.scanner, fov=128, matrix=320, thickness=2.5, slices=28, tesla=3.0, bias=0.30,
                              endorectal=3.0, contrast=1.1, noise_factor=0.9), Population(gland_scale=1.05,
                                                                                         gland_spread=0.10)),
    # HK-like: 1.5 T with an endorectal coil, large field of view, 3.6 mm slices, brighter fat; smaller glands.
    _prostate(_PF, mr_scanner(_PF.scanner, fov=240, matrix=320, thickness=3.6, slices=20, tesla=1.5, bias=0.15,
                              endorectal=2.0, contrast=0.9, fat=0.95, noise_factor=1.1),
              Population(gland_scale=0.85, gland_spread=0.10)),
)  # fmt: skip


def random_realistic_acquisition(rng: np.random.Generator) -> Acquisition:
    """The acquisition of an extra site drawn from the realistic ranges."""
    return Acquisition(
        resolution=int(rng.choice([48, 64, 80, 96, 112, 128])),
        cast=tuple(float(g) for g in rng.uniform(0.75, 1.25, 3)),
        gradient=float(rng.uniform(0.0, 0.35)),
        blur=float(rng.uniform(0.0, 0.02)),
        noise=float(rng.uniform(0.005, 0.05)),
        hair=float(rng.uniform(0.0, 0.6)),
        vignette=float(rng.uniform(0.0, 0.5)),
        ring=bool(rng.uniform() < 0.4),
        jpeg_quality=int(rng.integers(70, 96)),
        contrast=float(rng.uniform(0.6, 1.3)),
        offset=tuple(float(o) for o in rng.uniform(-0.03, 0.06, 3)),
        cast_jitter=float(rng.uniform(0.01, 0.08)),
        magnification=float(math.exp(rng.uniform(math.log(0.6), math.log(1.7)))),
    )


def random_realistic_scanner(rng: np.random.Generator, base: Scanner | None = None) -> tuple[Scanner, Population]:
    """The protocol and population of a prostate site drawn from the realistic ranges, on `base`'s storage
    conventions (axes, dtype, range, labels; drawn too when None, as for an extra site)."""
    base = random_scanner(rng) if base is None else base
    tesla = 1.5 if rng.uniform() < 0.5 else 3.0
    thickness = float(rng.choice([1.25, 2.0, 2.5, 3.0, 3.6, 4.0]))
    coil = rng.uniform()
    fov = float(rng.uniform(120, 240))
    spacing = float(rng.uniform(max(0.4, fov / 320), 0.8))
    matrix = int(np.clip(round(fov / spacing), math.ceil(fov / 0.8), min(320, math.floor(fov / 0.4))))
    scanner = mr_scanner(
        base, fov=fov, matrix=matrix, thickness=thickness, slices=int(round(rng.uniform(60, 72) / thickness)),
        tesla=tesla,
        bias=float(rng.uniform(0.1, 0.2) if tesla < 2 else rng.uniform(0.25, 0.35)),
        endorectal=float(rng.uniform(2.0, 3.0)) if coil < 0.4 else 0.0,
        surface=float(rng.uniform(0.3, 0.6)) if coil >= 0.4 else 0.0,
        contrast=float(rng.uniform(0.7, 1.3)), peripheral=float(rng.uniform(0.24, 0.36)),
        central=float(rng.uniform(0.06, 0.12)), fat=float(rng.uniform(0.75, 0.95)),
        noise_factor=float(rng.uniform(0.9, 1.1)),
    )  # fmt: skip
    population = Population(gland_scale=float(rng.uniform(0.85, 1.25)), gland_spread=0.1,
                            central_extra=float(rng.uniform(0.0, 0.1)))
    return scanner, population


def _drawn_derm(site: DermSite, rng: np.random.Generator) -> DermSite:
    """`site` with its acquisition and its patients' skin-tone range drawn from the realistic ranges."""
    low = float(rng.uniform(0.0, 0.6))
    return replace(site, acquisition=random_realistic_acquisition(rng),
                   skin_tone=(low, min(1.0, low + float(rng.uniform(0.3, 0.6)))))


def realistic_derm_sites(count: int, seed: int, site_seed: int = 0) -> list[DermSite]:
    """The first `count` realistic dermoscopy sites. `site_seed` 0: the reference ones, then extra ones drawn
    from the realistic ranges (seeded by `seed`). Another `site_seed` draws every site's acquisition and skin
    tones from those ranges, seeded by (site_seed, site) alone: other hospitals, with the same names, layouts and
    class mixes."""
    sites = list(REALISTIC_DERM[:count])
    for site in derm_sites(count, seed)[len(sites):]:
        sites.append(_drawn_derm(site, rng_for(seed, "realistic", site.name)))
    if site_seed:
        sites = [_drawn_derm(site, rng_for(site_seed, "site-seed", site.name)) for site in sites]
    return sites


def realistic_prostate_sites(count: int, seed: int, site_seed: int = 0) -> list[ProstateSite]:
    """The first `count` realistic prostate sites. `site_seed` 0: the reference ones, then extra ones drawn from
    the realistic ranges (seeded by `seed`). Another `site_seed` draws every site's protocol (field of view,
    spacing, slices, field strength, coil, contrast) and population from those ranges, seeded by (site_seed,
    site) alone, on the site's own storage conventions: the same names, layouts and numbers of cases."""
    sites = list(REALISTIC_PROSTATE[:count])
    for site in prostate_sites(count, seed)[len(sites):]:
        scanner, population = random_realistic_scanner(rng_for(seed, "realistic", site.name))
        sites.append(replace(site, scanner=scanner, population=population))
    if site_seed:
        drawn = []
        for site in sites:
            scanner, population = random_realistic_scanner(rng_for(site_seed, "site-seed", site.name), site.scanner)
            drawn.append(replace(site, scanner=scanner, population=population))
        sites = drawn
    return sites
