"""Shift strength (`medfl synth --shift realistic --shift-strength s`): the realistic sites at another strength.

Every site has two versions with the same name, layout, class mix and storage conventions: its mild version
(medfl.synth.sites, strength 0) and its realistic version (medfl.synth.realistic, strength 1). At strength s:

- continuous parameters move along the line between the two, value = mild * (1 - s) + realistic * s, which
  is the mild value at s = 0 and the realistic value at s = 1 exactly (so s = 1 writes the realistic preset's
  files byte for byte), and goes on beyond s = 1 in the same direction. Dermoscopy: colour gains, illumination
  gradient, blur, noise, hair, vignetting, JPEG quality, tone-curve contrast, black-level offsets, per-image
  cast jitter, magnification and the patients' skin-tone range. Prostate: tissue contrast, bias field, noise,
  fat, peripheral and central signal, the coil's gain, and the patients' gland sizes.
- discrete parameters take the mild value below s = 0.5 and the realistic one from s = 0.5 on: the image
  resolution (the low-resolution site), the dermatoscope's ring, the MRI grid (matrix, spacing, slices, slice
  thickness, and how the site stores it) and the coil type (none, endorectal or surface array; the balloon's
  deformation comes with the endorectal coil).
- the class mix and per-class minimums are the realistic preset's at every strength: tables, lesions and
  splits do not change with s, only the images do.

Beyond s = 1 a parameter stops at its physical limit (`DERM_LIMITS`, `PROSTATE_LIMITS`, `POPULATION_LIMITS`,
`SKIN_TONE_WIDTH`); at s <= 1 no reference or drawn site reaches one. At s = 1.5 the reference sites stop at:
derm_b's tone-curve contrast (0.5, the flattest tone curve a camera delivers), blue black level (0.1) and blue
gain (1.3), its patients' skin-tone range (0.1 wide: a population is never one skin tone); derm_c's red gain
(1.3) and magnification (0.5: smaller lesions vanish at the training size); derm_d's per-image cast jitter
(0.15); prost_e's noise (0.005 of the brightest tissue) and endorectal coil gain (4: 5x brightening at the
balloon's wall); prost_d's gland-size spread (0.2) and central-gland enlargement (0.15). Everything else
keeps moving; `stopped_at_limits(s)` lists what stops at any strength (at s = 2 about half the parameters).

`--site-seed N` draws the realistic version of every site (medfl.synth.realistic); the strength then moves
from the site's mild version to that drawn hospital, so s = 0 is the mild federation whatever the site seed.
"""

from __future__ import annotations

import math
from dataclasses import fields, replace
from typing import Any

from medfl.synth.acquisition import Acquisition
from medfl.synth.phantom import Population, Scanner
from medfl.synth.realistic import realistic_derm_sites, realistic_prostate_sites
from medfl.synth.sites import DermSite, ProstateSite, derm_sites, prostate_sites

MAX_STRENGTH = 2.0
SWITCH = 0.5  # discrete parameters take the realistic value from this strength on
SKIN_TONE_WIDTH = 0.1  # the narrowest skin-tone range of a site's patients

# Physical limits of continuous parameters beyond s = 1 (low, high).
DERM_LIMITS: dict[str, tuple[float, float]] = {
    "cast": (0.7, 1.3),  # per-channel gains: what white balance leaves at worst
    "gradient": (0.0, 0.5),  # the ramp keeps light > 0 in every corner
    "blur": (0.0, 0.08),  # sigma as a share of the image side: a lesion's border still shows
    "noise": (0.0, 0.1),
    "hair": (0.0, 1.0),  # a probability
    "vignette": (0.0, 0.9),  # the corners keep light
    "jpeg_quality": (60, 95),  # what cameras and archives write
    "contrast": (0.5, 1.5),  # slope of the tone curve about mid-grey
    "offset": (-0.05, 0.1),  # black level: veiling glare adds, a crushed black level removes a little
    "cast_jitter": (0.0, 0.15),  # sd of per-image log gains
    "magnification": (0.5, 2.0),  # lesions stay visible at 32 px and inside the frame
}
PROSTATE_LIMITS: dict[str, tuple[float, float]] = {
    "contrast": (0.5, 1.5),
    "bias": (0.0, 0.5),
    "noise": (0.005, 0.1),
    "fat": (0.6, 1.0),
    "peripheral": (0.15, 0.45),
    "central": (0.0, 0.2),
    "endorectal": (0.0, 4.0),  # near-field gain at the balloon's wall: up to 5x brightening
    "surface": (0.0, 1.0),
}
POPULATION_LIMITS: dict[str, tuple[float, float]] = {
    "gland_scale": (0.7, 1.4), "gland_spread": (0.0, 0.2), "central_extra": (0.0, 0.15),
}
_DERM_DISCRETE = ("resolution", "ring")
# The grid, and how the site stores it (axes, data type, intensity range, label values: the same on both sides
# for the reference sites, drawn separately for the extra ones).
_PROSTATE_DISCRETE = ("matrix", "slices", "spacing", "thickness", "float_levels", "direction", "dtype",
                      "max_intensity", "labels")
_COILS = ("endorectal", "surface")


def lerp(mild: float, realistic: float, strength: float) -> float:
    """mild * (1 - s) + realistic * s: exactly `mild` at s = 0 and exactly `realistic` at s = 1."""
    return mild * (1.0 - strength) + realistic * strength


def _clamped(mild: float, realistic: float, strength: float, limits: tuple[float, float]) -> float:
    return min(max(lerp(mild, realistic, strength), limits[0]), limits[1])


def _value(mild: Any, realistic: Any, strength: float, limits: tuple[float, float]) -> Any:
    if isinstance(mild, tuple):
        return tuple(_clamped(a, b, strength, limits) for a, b in zip(mild, realistic, strict=True))
    if isinstance(mild, int) and not isinstance(mild, bool):
        return int(round(_clamped(mild, realistic, strength, limits)))
    return _clamped(mild, realistic, strength, limits)


def _discrete(mild: Any, realistic: Any, strength: float) -> Any:
    return realistic if strength >= SWITCH else mild


def acquisition_at(mild: Acquisition, realistic: Acquisition, strength: float) -> Acquisition:
    """A dermoscopy site's acquisition at `strength` (module docstring)."""
    values = {}
    for item in fields(Acquisition):
        a, b = getattr(mild, item.name), getattr(realistic, item.name)
        values[item.name] = (_discrete(a, b, strength) if item.name in _DERM_DISCRETE
                             else _value(a, b, strength, DERM_LIMITS[item.name]))
    return Acquisition(**values)


def skin_tone_at(mild: tuple[float, float], realistic: tuple[float, float], strength: float) -> tuple[float, float]:
    """The patients' skin-tone range at `strength`: both ends interpolated inside [0, 1], at least
    `SKIN_TONE_WIDTH` wide (widened about its centre, inside [0, 1])."""
    low, high = (_clamped(a, b, strength, (0.0, 1.0)) for a, b in zip(mild, realistic, strict=True))
    if high - low >= SKIN_TONE_WIDTH or strength <= 1:
        return (low, high)
    centre = min(max((low + high) / 2, SKIN_TONE_WIDTH / 2), 1 - SKIN_TONE_WIDTH / 2)
    return (centre - SKIN_TONE_WIDTH / 2, centre + SKIN_TONE_WIDTH / 2)


def derm_site_at(mild: DermSite, realistic: DermSite, strength: float) -> DermSite:
    """The realistic site (its class mix and everything but how it images) with acquisition and skin tones at
    `strength`."""
    return replace(realistic, acquisition=acquisition_at(mild.acquisition, realistic.acquisition, strength),
                   skin_tone=skin_tone_at(mild.skin_tone, realistic.skin_tone, strength))


def scanner_at(mild: Scanner, realistic: Scanner, strength: float) -> Scanner:
    """A prostate site's scanner at `strength`: the grid, its storage and the coil type switched at `SWITCH`, the
    rest interpolated; a coil absent on one side has gain 0 there."""
    values = {}
    for item in fields(Scanner):
        a, b = getattr(mild, item.name), getattr(realistic, item.name)
        if item.name in _PROSTATE_DISCRETE:
            values[item.name] = _discrete(a, b, strength)
        elif item.name in _COILS:
            present = _discrete(a, b, strength) > 0  # the coil type of this side of the switch
            values[item.name] = _value(a, b, strength, PROSTATE_LIMITS[item.name]) if present else 0.0
        else:
            values[item.name] = _value(a, b, strength, PROSTATE_LIMITS[item.name])
    return Scanner(**values)


def population_at(mild: Population, realistic: Population, strength: float) -> Population:
    """A prostate site's patients (gland sizes) at `strength`."""
    return Population(**{item.name: _value(getattr(mild, item.name), getattr(realistic, item.name), strength,
                                           POPULATION_LIMITS[item.name]) for item in fields(Population)})


def prostate_site_at(mild: ProstateSite, realistic: ProstateSite, strength: float) -> ProstateSite:
    """The realistic site with its scanner and patients at `strength`."""
    return replace(realistic, scanner=scanner_at(mild.scanner, realistic.scanner, strength),
                   population=population_at(mild.population, realistic.population, strength))


def check_strength(strength: Any) -> float:
    """`strength` as a float in [0, MAX_STRENGTH]; ValueError with one line otherwise."""
    if isinstance(strength, bool) or not isinstance(strength, int | float) or not math.isfinite(strength) \
            or not 0 <= strength <= MAX_STRENGTH:
        raise ValueError(f"--shift-strength must be a number from 0 (the mild sites) to {MAX_STRENGTH:g}, "
                         f"1 being the realistic preset; got {strength!r}")
    return float(strength)


def derm_sites_at(count: int, seed: int, site_seed: int = 0, strength: float = 1.0) -> list[DermSite]:
    """The first `count` realistic dermoscopy sites (medfl.synth.realistic.realistic_derm_sites) at `strength`."""
    strength = check_strength(strength)
    realistic = realistic_derm_sites(count, seed, site_seed)
    return [derm_site_at(a, b, strength) for a, b in zip(derm_sites(count, seed), realistic, strict=True)]


def prostate_sites_at(count: int, seed: int, site_seed: int = 0, strength: float = 1.0) -> list[ProstateSite]:
    """The first `count` realistic prostate sites (medfl.synth.realistic.realistic_prostate_sites) at `strength`."""
    strength = check_strength(strength)
    realistic = realistic_prostate_sites(count, seed, site_seed)
    return [prostate_site_at(a, b, strength) for a, b in zip(prostate_sites(count, seed), realistic, strict=True)]


def stopped_at_limits(strength: float, count_derm: int = 4, count_prostate: int = 6, seed: int = 0,
                      site_seed: int = 0) -> list[str]:
    """'site: parameter' for every interpolated parameter that its physical limit stopped at `strength`."""
    stopped = []
    pairs = [*zip(derm_sites(count_derm, seed), realistic_derm_sites(count_derm, seed, site_seed), strict=True),
             *zip(prostate_sites(count_prostate, seed), realistic_prostate_sites(count_prostate, seed, site_seed),
                  strict=True)]
    for mild, realistic in pairs:
        if isinstance(mild, DermSite):
            groups = [(mild.acquisition, realistic.acquisition, DERM_LIMITS)]
            low, high = (lerp(a, b, strength) for a, b in zip(mild.skin_tone, realistic.skin_tone, strict=True))
            if low < 0 or high > 1 or high - low < SKIN_TONE_WIDTH:
                stopped.append(f"{mild.name}: skin_tone")
        else:
            groups = [(mild.scanner, realistic.scanner, PROSTATE_LIMITS),
                      (mild.population, realistic.population, POPULATION_LIMITS)]
        for a, b, limits in groups:
            for name, (low, high) in limits.items():
                values = getattr(a, name), getattr(b, name)
                pairs_of = zip(*values, strict=True) if isinstance(values[0], tuple) else [values]
                if any(not low <= lerp(x, y, strength) <= high for x, y in pairs_of):
                    stopped.append(f"{mild.name}: {name}")
    return stopped
