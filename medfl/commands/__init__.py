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


def output_folder(path: str | Path, what: str) -> Path:
    """`path` as a folder to write into: an existing folder, or a new one whose nearest existing parent is a
    folder; a ConfigError naming the file that stands in the way, before anything is written."""
    from medfl.errors import ConfigError

    folder = Path(path)
    for place in (folder, *folder.parents):
        if place.exists():
            if not place.is_dir():
                where = "it" if place == folder else f"{place}"
                raise ConfigError(f"{path}: {what} must be a folder, but {where} is a file; nothing was written")
            break
    return folder
