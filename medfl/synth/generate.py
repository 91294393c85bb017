"""`generate`: write the whole synthetic federation (dermoscopy sites, prostate sites and their configs)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from medfl.errors import ConfigError
from medfl.synth.dermoscopy import MAX_SCALE, DermResult, write_derm_site
from medfl.synth.files import write_text
from medfl.synth.prostate import ProstateResult, write_prostate_site
from medfl.synth.realistic import MINIMUMS, SHIFTS
from medfl.synth.site_configs import config_yaml, derm_config, prostate_config, relative_root
from medfl.synth.sites import DEFAULT_SCALE, Minimums, derm_sites, prostate_sites
from medfl.synth.strength import check_strength, derm_sites_at, prostate_sites_at

DEFAULT_OUT = Path("data/synth")
MAX_SITES = 64
MAX_LESIONS_PER_CLASS = 5000  # keeps every site's image ids inside its own id range


@dataclass
class SynthResult:
    """What `generate` wrote."""

    out: Path
    derm: list[DermResult] = field(default_factory=list)
    prostate: list[ProstateResult] = field(default_factory=list)
    configs: list[Path] = field(default_factory=list)
    changed: int = 0  # files created or rewritten; 0 on an identical rerun


def _check(scale: float, n_derm: int, n_prostate: int, minimums: Minimums, shift: str, site_seed: int,
           strength: float | None) -> None:
    if shift not in SHIFTS:
        raise ConfigError(f"--shift must be one of {', '.join(SHIFTS)}, got {shift!r}")
    if not isinstance(site_seed, int) or site_seed < 0:
        raise ConfigError(f"--site-seed must be an integer >= 0, got {site_seed!r}")
    if site_seed and shift != "realistic":
        raise ConfigError(f"--site-seed {site_seed} draws the sites of the realistic preset: add --shift realistic")
    if strength is not None:
        try:
            check_strength(strength)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if shift != "realistic":
            raise ConfigError(f"--shift-strength {strength:g} scales the realistic preset's site shift (0: the mild "
                              "sites' acquisitions, 1: the realistic ones): add --shift realistic")
    if not (isinstance(scale, int | float) and math.isfinite(scale) and 0 < scale <= MAX_SCALE):
        raise ConfigError(f"--scale must be a number in (0, {MAX_SCALE:g}], got {scale!r}")
    for option, count in (("--derm-sites", n_derm), ("--prostate-sites", n_prostate)):
        if not 0 <= count <= MAX_SITES:
            raise ConfigError(f"{option} must be between 0 and {MAX_SITES}, got {count}")
    if min(minimums.train, minimums.val, minimums.test, minimums.cases) < 1:
        raise ConfigError(f"per-class minimums must be at least 1, got {minimums}")
    if minimums.lesions() > MAX_LESIONS_PER_CLASS or minimums.cases > MAX_LESIONS_PER_CLASS:
        raise ConfigError(f"minimums {minimums} ask for more than {MAX_LESIONS_PER_CLASS} lesions or cases")


def generate(
    out: Path | str = DEFAULT_OUT,
    *,
    seed: int = 0,
    scale: float = DEFAULT_SCALE,
    n_derm: int = 4,
    n_prostate: int = 6,
    minimums: Minimums | None = None,
    shift: str = "mild",
    site_seed: int = 0,
    shift_strength: float | None = None,
) -> SynthResult:
    """Write `n_derm` dermoscopy and `n_prostate` prostate sites under `out`, with configs in out/site_configs.

    `shift`: "mild" (sites differ a little; per-class minimums default to Minimums()) or "realistic"
    (real-world site shift, medfl.synth.realistic; minimums default to what a 70/10/20 split needs).
    `site_seed` (realistic only): 0, today's sites; another value draws every site's acquisition from the
    realistic ranges (medfl.synth.realistic): new hospitals, while `seed` draws their patients and splits.
    `shift_strength` (realistic only; None means 1): how far every site's acquisition moves from its mild version
    (0) towards its realistic one (1) and beyond (up to 2), with the realistic preset's class mix at every
    strength (medfl.synth.strength); 1 writes the realistic preset's files byte for byte.
    Same arguments, same bytes: every file is seeded from (seed, site name, item). Reruns rewrite only what
    differs and prune stale files inside the site folders that `medfl synth` owns.
    """
    realistic = shift == "realistic"
    minimums = minimums or (MINIMUMS if realistic else Minimums())
    _check(scale, n_derm, n_prostate, minimums, shift, site_seed, shift_strength)
    out = Path(out)
    result = SynthResult(out=out)
    derm_config_dir = out / "site_configs" / "dermoscopy"
    strength = 1.0 if shift_strength is None else float(shift_strength)
    dermoscopy = derm_sites_at(n_derm, seed, site_seed, strength) if realistic else derm_sites(n_derm, seed)
    prostate = (prostate_sites_at(n_prostate, seed, site_seed, strength) if realistic
                else prostate_sites(n_prostate, seed))
    for index, site in enumerate(dermoscopy):
        written = write_derm_site(site, index, out / "dermoscopy", seed, scale, minimums)
        result.derm.append(written)
        config = derm_config(site, relative_root(derm_config_dir, written.folder))
        result.configs.append(derm_config_dir / f"{site.name}.yaml")
        result.changed += written.changed + write_text(result.configs[-1], config_yaml(config))
    prostate_config_dir = out / "site_configs" / "prostate"
    for site in prostate:
        written = write_prostate_site(site, out / "prostate", seed, scale, minimums.cases)
        result.prostate.append(written)
        config = prostate_config(site, relative_root(prostate_config_dir, written.folder))
        result.configs.append(prostate_config_dir / f"{site.name}.yaml")
        result.changed += written.changed + write_text(result.configs[-1], config_yaml(config))
    return result
