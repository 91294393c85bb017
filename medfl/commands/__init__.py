"""The `medfl` subcommands, one module each (see medfl/cli.py), and checks they share.

The checks here run before torch or MONAI is imported, so that a wrong path is reported at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

DEVICE_CHOICES = ("auto", "cpu", "cuda")
DEVICE_HELP = "where to run the model: auto (a CUDA GPU when there is one, else the CPU; the default), cpu or cuda"
UNBOUNDED_WIDTH = 10_000  # columns of a redirected console: wider than any table medfl prints


def existing_folder(path: str | Path, what: str) -> Path:
    """`path` as a folder that exists, or a ConfigError naming it and what it should have been."""
    from medfl.errors import ConfigError

    folder = Path(path)
    if not folder.exists():
        raise ConfigError(f"{path}: {what} not found")
    if not folder.is_dir():
        raise ConfigError(f"{path}: {what} must be a folder")
    return folder


def folder_to_write(path: str | Path, what: str) -> Path:
    """`path` as a folder a command may create or write into: an existing folder, or a new one whose nearest
    existing parent is a folder; a ConfigError naming the file that stands in the way, before anything is
    written."""
    from medfl.errors import ConfigError

    folder = Path(path)
    for place in (folder, *folder.parents):
        if place.exists():
            if not place.is_dir():
                where = "it" if place == folder else f"{place}"
                raise ConfigError(f"{path}: {what} must be a folder, but {where} is a file; nothing was written")
            break
    return folder


def file_to_write(path: str | Path, what: str) -> Path:
    """`path` as a file a command may write: a ConfigError when a folder is there."""
    from medfl.errors import ConfigError

    file = Path(path)
    if file.is_dir():
        raise ConfigError(f"{path}: {what} must be a file, and this is a folder")
    return file


def output_console(stderr: bool = False) -> Console:
    """A rich console for a command's tables (stdout) or messages (stderr).

    In a terminal it is the terminal's width. Redirected to a file or a pipe, rich would assume 80 columns and
    cut wide tables' cells (site names included) with an ellipsis; there it is as wide as what it prints.
    """
    from rich.console import Console

    console = Console(highlight=False, stderr=stderr)
    return console if console.is_terminal else Console(highlight=False, stderr=stderr, width=UNBOUNDED_WIDTH)
