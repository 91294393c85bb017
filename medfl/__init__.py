"""medfl: personalized retrogress-resilient federated learning for medical imaging."""

import os

# OpenMP threads that spin while waiting make torch 10-30x slower as soon as any other process wants a
# core (measured: a 2-site prostate round took 140-250 s instead of 6-13 s on a shared 2-core machine).
# Waiting passively costs nothing measurable on an idle machine. It must be set before torch loads
# libgomp, so it lives here; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
