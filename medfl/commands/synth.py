"""`medfl synth`: write a deterministic synthetic multi-site data set and its site configs.

Only the standard library is imported here; numpy, scikit-image and the writers load inside `run`.
"""

from __future__ import annotations

import argparse
import time

DEFAULT_OUT = "data/synth"  # the git-ignored folder the repository's site_configs/ point at
DEFAULT_SCALE = 0.1  # medfl.synth.sites.DEFAULT_SCALE: ~150-500 images per dermoscopy site, a CPU demo
SHIFTS = ("mild", "realistic")  # medfl.synth.realistic.SHIFTS


def _minimums(text: str) -> tuple[int, int, int]:
    try:
        train, val, test = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected TRAIN,VAL,TEST integers such as 10,5,5, got {text!r}"
        ) from None
    return train, val, test


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `medfl synth`."""
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed; same arguments give identical files"
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=DEFAULT_SCALE,
        help="fraction of the reference sites' sizes: per-class totals = train count / 0.7 * scale, "
        f"prostate cases = reference cases * scale, before minimums (default: {DEFAULT_SCALE})",
    )
    parser.add_argument(
        "--derm-sites", type=int, default=4, help="dermoscopy sites (4 reference, then random)"
    )
    parser.add_argument(
        "--prostate-sites", type=int, default=6, help="prostate sites (6 reference, then random)"
    )
    parser.add_argument(
        "--shift",
        choices=SHIFTS,
        default="mild",
        help="site shift: mild (sites differ a little) or realistic (real-world colour, magnification, "
        "resolution, skin tone, reference class mix; MRI field of view, spacing, slices, field strength, "
        "coils, anatomy) (default: mild)",
    )
    parser.add_argument(
        "--site-seed",
        type=int,
        default=0,
        help="with --shift realistic: 0 keeps today's sites; another value draws every site's acquisition "
        "(colour, contrast, magnification, resolution, rings, skin tones; MRI field of view, spacing, field "
        "strength, coil) from the preset's ranges: other hospitals, same layouts and class mixes (default: 0)",
    )
    parser.add_argument(
        "--shift-strength",
        type=float,
        default=None,
        metavar="S",
        help="with --shift realistic: how strong the site shift is, 0 (every site images as in the mild preset) "
        "to 2; 1 is the realistic preset byte for byte, values between interpolate each site's continuous "
        "acquisition (colour, contrast, blur, noise, magnification, skin tones; MRI contrast, noise, bias, coil "
        "gain), values above 1 go on to the parameters' physical limits; resolution, rings, the MRI grid and "
        "coil type switch at 0.5; class mixes never change (default: 1)",
    )
    parser.add_argument(
        "--min-per-class",
        type=_minimums,
        default=None,
        metavar="TRAIN,VAL,TEST",
        help="per-class counts every dermoscopy site keeps after a 70/10/20 split "
        "(default: 10,5,5 for mild, 1,1,1 for realistic)",
    )


def run(args: argparse.Namespace) -> int:
    """Generate the data set and print one line per site."""
    from medfl.commands import folder_to_write

    folder_to_write(args.out, "--out")
    from medfl.synth import Minimums, generate

    start = time.perf_counter()
    result = generate(
        args.out,
        seed=args.seed,
        scale=args.scale,
        n_derm=args.derm_sites,
        n_prostate=args.prostate_sites,
        minimums=Minimums(*args.min_per_class) if args.min_per_class else None,
        shift=args.shift,
        site_seed=args.site_seed,
        shift_strength=args.shift_strength,
    )
    for site in result.derm:
        counts = " ".join(f"{cls}={n}" for cls, n in site.class_counts.items())
        extra = ", ".join(f"{label}={n}" for label, n in site.dropped.items())
        filtered = f"; {site.filtered} rows of another dataset" if site.filtered else ""
        print(f"{site.name:10s} {site.layout:9s} {counts}; left-out labels {extra or 'none'}{filtered}")
    for site in result.prostate:
        shape = "x".join(map(str, site.shape))
        spacing = "x".join(f"{s:g}" for s in site.spacing)
        print(f"{site.name:10s} {site.layout:9s} {len(site.cases)} cases, {shape} voxels of {spacing} mm")
    strength = f", strength {args.shift_strength:g}" if args.shift_strength is not None else ""
    sites = f"{strength}, site seed {args.site_seed}" if args.site_seed else strength
    print(
        f"wrote {len(result.derm)} dermoscopy and {len(result.prostate)} prostate sites ({args.shift} shift{sites}) "
        f"to {result.out} "
        f"({result.changed} files changed), configs in {result.out / 'site_configs'} "
        f"[{time.perf_counter() - start:.1f} s]"
    )
    return 0
