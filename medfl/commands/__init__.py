"""The `medfl` subcommands, one module each (see medfl/cli.py), and checks they share.

The checks here run before torch or MONAI is imported, so that a wrong path is reported at once.
"""

from __future__ import annotations

from pathlib import Path

DEVICE_CHOICES = ("auto", "cpu", "cuda")
DEVICE_HELP = "where to run the model: auto (a CUDA GPU when there is one, else the CPU; the default), cpu or cuda"


def existing_folder(path: str | Path, what: str) -> Path:
    """`path` as a folder that exists, or a ConfigError naming it and what it should have been."""
    from medfl.errors import ConfigError

    folder = Path(path)
    if not folder.exists():
        raise ConfigError(f"{path}: {what} not found")
    if not folder.is_dir():
        raise ConfigError(f"{path}: {what} must be a folder")
    return folder
