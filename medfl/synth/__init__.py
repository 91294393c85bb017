"""Deterministic synthetic multi-site data: dermoscopy (nv/bkl/mel) and prostate MRI, in real layouts.

`generate(out, seed=..., scale=..., n_derm=..., n_prostate=..., shift="mild"|"realistic")` writes the sites and
their site configs; `medfl synth` is its command line. See `medfl.synth.sites` for how `--scale` maps to counts,
`medfl.synth.realistic` for the realistic preset's site shift and `medfl.synth.strength` for its strength.
"""

from medfl.synth.generate import DEFAULT_OUT, SynthResult, generate
from medfl.synth.realistic import SHIFTS
from medfl.synth.sites import DEFAULT_SCALE, Minimums

__all__ = ["DEFAULT_OUT", "DEFAULT_SCALE", "SHIFTS", "Minimums", "SynthResult", "generate"]
