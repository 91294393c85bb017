"""Deterministic, atomic and idempotent file writing for the synthetic data set.

Every file is produced in memory first, then written with medfl's one atomic writer
(medfl.checkpoints.atomic_write_bytes: a temporary file in the same folder renamed into place, created with
the umask's permissions), so an interrupted run never leaves a half file under its final name. A file whose bytes are
already on disk is left untouched, so re-running `medfl synth` with the same arguments changes nothing.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from pathlib import Path

from medfl.checkpoints import atomic_write_bytes
from medfl.errors import ConfigError

MARKER = ".medfl-synth"


def write_bytes(path: Path, data: bytes) -> bool:
    """Write `data` to `path` atomically; return False when the file already held exactly these bytes."""
    path = Path(path)
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return False
    atomic_write_bytes(path, data, sync=False)  # regenerated on a re-run: not worth an fsync per file
    return True


def write_text(path: Path, text: str) -> bool:
    """Write UTF-8 text with Unix line endings (see `write_bytes`)."""
    return write_bytes(path, text.encode("utf-8"))


def csv_text(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Render a CSV table with a header line and "\\n" line endings."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def claim_folder(folder: Path) -> None:
    """Make `folder` a synth-owned folder, refusing one that holds files `medfl synth` did not write.

    The marker file lets later runs prune stale files (e.g. cases left over from a larger `--scale`)
    without ever deleting a user's own data.
    """
    folder = Path(folder)
    marker = folder / MARKER
    if folder.is_dir() and not marker.is_file() and any(folder.iterdir()):
        raise ConfigError(f"{folder}: folder exists and was not written by medfl synth; choose another --out")
    write_text(marker, "written by `medfl synth`; files here are regenerated and pruned on every run\n")


def prune(folder: Path, keep: Iterable[Path]) -> int:
    """Delete files under a claimed `folder` that are not in `keep` (plus empty folders); return the count."""
    folder = Path(folder)
    kept = {Path(p).resolve() for p in keep} | {(folder / MARKER).resolve()}
    removed = 0
    for path in sorted(folder.rglob("*"), reverse=True):
        if path.is_file() and path.resolve() not in kept:
            path.unlink()
            removed += 1
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    return removed
