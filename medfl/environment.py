"""Process-wide settings that medfl's entry points make before torch loads.

A library must not change its host's environment, so `import medfl` does none of this; the `medfl` command
and the NVFlare site script call `prefer_passive_openmp_waiting()` and `keep_freed_memory()` first thing, and
scripts that import torch themselves (tests, benchmarks) may call them before they do.
"""

from __future__ import annotations

import ctypes
import os
import sys

# glibc's mallopt parameters (malloc.h) and the environment variables that set them in a new process.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
KEPT_BYTES = 1 << 40  # free memory at the top of the heap is kept up to this much: in practice, always


def prefer_passive_openmp_waiting() -> None:
    """OMP_WAIT_POLICY=PASSIVE unless the user chose a policy.

    OpenMP worker threads that spin while waiting make torch 10-30x slower as soon as another process wants
    a core (measured on a shared 2-core machine: a 2-site prostate round took 96-250 s instead of 8-13 s).
    Waiting passively costs nothing measurable on an idle machine. libgomp reads the variable once, when
    torch loads it, so this must run before the first `import torch`.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def keep_freed_memory() -> bool:
    """Keep the memory torch frees for its next allocations instead of handing it back to the system (glibc only;
    False elsewhere, where nothing changes).

    PyTorch has no caching allocator on the CPU: every training step allocates its activations, and glibc
    returns large freed blocks to the system (mmap'ed blocks at once, the heap's top beyond a threshold), so the
    next step faults the same pages in again. A 6-batch probe on an idle AMD EPYC core (128 px, full width) saw
    a single-model step 12% faster with it and DET at 2.07x a single-model epoch instead of 2.29x; the committed
    12-batch `speed.py --det-profile` run measured 2.08x without it, so that gain is not established
    (benchmarks/README.md). The price: a process keeps its peak memory until it ends, which for a training
    process is what it needs anyway. Applies to this process (`mallopt`) and, through glibc's environment variables unless the
    user set them, to the processes it starts (the site workers).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...): its allocator keeps its own rules
        return False
    os.environ.setdefault("MALLOC_MMAP_MAX_", "0")
    os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", str(KEPT_BYTES))
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    settings = {_M_MMAP_MAX: os.environ["MALLOC_MMAP_MAX_"], _M_TRIM_THRESHOLD: os.environ["MALLOC_TRIM_THRESHOLD_"]}
    applied = []
    for parameter, text in settings.items():
        try:
            value = min(int(text), 2**31 - 1)  # mallopt takes an int; glibc reads the variable as a size
        except ValueError:  # the user's own value, which glibc reads its own way in new processes
            continue
        applied.append(bool(mallopt(parameter, value)))
    return bool(applied) and all(applied)
