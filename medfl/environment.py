"""Process-wide settings that medfl's entry points make before torch loads.

A library must not change its host's environment, so `import medfl` does none of this; the `medfl` command
and the NVFlare site script call `prefer_passive_openmp_waiting()` first thing, and scripts that import
torch themselves (tests, benchmarks) may call it before they do.
"""

from __future__ import annotations

import os


def prefer_passive_openmp_waiting() -> None:
    """OMP_WAIT_POLICY=PASSIVE unless the user chose a policy.

    OpenMP worker threads that spin while waiting make torch 10-30x slower as soon as another process wants
    a core (measured on a shared 2-core machine: a 2-site prostate round took 96-250 s instead of 8-13 s).
    Waiting passively costs nothing measurable on an idle machine. libgomp reads the variable once, when
    torch loads it, so this must run before the first `import torch`.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
