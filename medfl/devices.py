"""The one device setting: "auto" (a CUDA GPU when there is one), "cpu" or "cuda".

Commands check a request for "cuda" before they load anything heavy (`check_device`): a torch built without
CUDA or ROCm (its generated torch/version.py says `cuda = None` and `hip = None`) can never use a GPU, which
is answered without importing torch.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING

from medfl.errors import ConfigError

if TYPE_CHECKING:
    import torch

NO_CUDA = "device 'cuda' was asked for but no CUDA GPU is available (use 'auto' or 'cpu')"
GPU_BACKENDS = ("cuda", "hip")  # what torch.cuda runs on: NVIDIA CUDA, or AMD ROCm through HIP


def gpu_backends_in(version_source: str) -> set[str] | None:
    """The GPU back ends a torch/version.py names (e.g. `cuda: Optional[str] = '12.4'` -> {"cuda"}), or None
    when it does not state each of them as a literal."""
    stated: dict[str, object] = {}
    for node in ast.parse(version_source).body:
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else getattr(node, "target", None)
        value = getattr(node, "value", None)
        if isinstance(target, ast.Name) and target.id in GPU_BACKENDS and value is not None:
            try:
                stated[target.id] = ast.literal_eval(value)
            except ValueError:
                return None
    if set(stated) != set(GPU_BACKENDS):
        return None
    return {backend for backend, version in stated.items() if version is not None}


def installed_torch_gpu_backends() -> set[str] | None:
    """The GPU back ends the installed torch was built with, read from its version file without importing it
    (find_spec locates a top-level package without running it); None when that cannot be told."""
    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        try:
            return gpu_backends_in((Path(folder) / "version.py").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, SyntaxError):
            continue
    return None


def check_device(choice: str) -> None:
    """ConfigError when `choice` is "cuda" and no CUDA GPU is available, told without torch where the
    installed build has no GPU back end at all."""
    if choice != "cuda":
        return
    if installed_torch_gpu_backends() == set():
        raise ConfigError(NO_CUDA)
    # A GPU build: torch (not MONAI) loads here, as only CUDA tells soundly if a GPU is usable (driver, WSL, Jetson).
    resolve_device(choice)


def resolve_device(choice: str) -> torch.device:
    """"auto": CUDA when present, else CPU; "cuda" without a GPU is a config error."""
    import torch

    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError(NO_CUDA)
    return torch.device(choice)


MEMINFO = Path("/proc/meminfo")


def available_memory_bytes(device: torch.device) -> int | None:
    """Memory a run on `device` can still take: a CUDA GPU's free memory as the driver reports it; on the CPU the
    RAM the kernel says is available without swapping (MemAvailable in /proc/meminfo; elsewhere the free pages);
    None when the system does not tell."""
    if device.type == "cuda":
        import torch

        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        for line in MEMINFO.read_text(encoding="ascii").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None
