"""Random generators keyed by names, so that every site and file is reproducible on its own.

Seeds come from a SHA-256 of (seed, names), never from Python's salted `hash()`, so the same arguments give
byte-identical files in every process, and adding a site or an image never changes the others.
"""

from __future__ import annotations

import hashlib

import numpy as np


def rng_for(seed: int, *names: str | int) -> np.random.Generator:
    """A numpy Generator determined only by `seed` and `names` (e.g. a site name and an image id)."""
    key = "/".join([str(seed), *map(str, names)]).encode("utf-8")
    digest = hashlib.sha256(key).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest[:16], "little")))
