"""Deterministic synthetic multi-site data: dermoscopy (nv/bkl/mel) and prostate MRI, in real layouts.

`generate(out, seed=..., scale=..., n_derm=..., n_prostate=...)` writes the sites and their site configs;
`medfl synth` is its command line. See `medfl.synth.sites` for how `--scale` maps to counts.
"""

from medfl.synth.generate import DEFAULT_OUT, SynthResult, generate
from medfl.synth.sites import DEFAULT_SCALE, Minimums

__all__ = ["DEFAULT_OUT", "DEFAULT_SCALE", "Minimums", "SynthResult", "generate"]
