"""Atomic file writing, round checkpoints, and the one safe way to read a torch file back.

Everything that must never be half-written (checkpoints, summaries, exports) goes through these helpers:
write to a temporary file in the destination folder, flush and fsync, then rename over the target.
A crash leaves either the old file or the new one, never a torn one. Every torch file is read with
`load_torch_file` (weights_only=True): a file holding anything but tensors and plain containers is refused
before any of it runs, with one line naming the file.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import pickle
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from medfl.errors import DataError

_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically."""
    return _atomic_write(Path(path), lambda stream: stream.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 `text` to `path` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_csv(path: str | Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> Path:
    """Write rows (dicts) as CSV atomically; columns default to the union of keys in first-seen order; floats
    written exactly (repr), NaN as an empty cell."""
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_cell(v) for k, v in row.items()})
    return atomic_write_text(path, buffer.getvalue())


def _csv_cell(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return value


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write `obj` as indented JSON atomically (NaN written as null, so other tools can read it)."""
    return atomic_write_text(path, json.dumps(_json_safe(obj), indent=2, sort_keys=False) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """torch.save `obj` to `path` atomically."""
    import torch

    return _atomic_write(Path(path), lambda stream: torch.save(obj, stream))


def load_torch_file(path: str | Path, site: str | None = None) -> Any:
    """The tensors and plain containers (dicts, lists, numbers, strings) of a torch file, on the CPU.

    torch.load runs with weights_only=True, so a crafted pickle cannot run code. A file that holds other
    Python objects, a corrupt, truncated or missing file becomes one DataError naming the file (and the
    site when given) instead of torch's traceback, which advises weights_only=False."""
    import torch

    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataError("file not found", site=site, path=str(path)) from None
    except OSError as error:
        raise DataError(f"unreadable ({error.strerror or error})", site=site, path=str(path)) from None
    except pickle.UnpicklingError as error:
        found = _UNSUPPORTED_GLOBAL.search(str(error))
        if found:
            message = (f"refused: it holds Python objects other than tensors and plain containers ({found[1]}); "
                       "loading them could run code")
        else:
            message = "refused: not a torch file of tensors and plain containers (corrupt, or holding other objects)"
        raise DataError(message, site=site, path=str(path)) from None
    except Exception as error:  # noqa: BLE001 - any other failure inside torch.load is a corrupt file
        reason = " ".join(str(error).split()).split(". ")[0][:160] or type(error).__name__
        raise DataError(f"unreadable or corrupt torch file ({reason})", site=site, path=str(path)) from None


def _json_safe(obj: Any) -> Any:
    """Replace float NaN/inf by None recursively: JSON has no such numbers."""
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {str(key): _json_safe(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(value) for value in obj]
    return obj
