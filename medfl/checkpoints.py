"""Atomic file writing, round checkpoints, and the one safe way to read a torch file back.

Every file medfl writes and that must never be half-written (checkpoints, run folders, summaries, exports,
bundles, reports, predictions, synthetic data) goes through `atomic_write_bytes`: the content is made in
memory first (torch objects serialized into bytes), written to a temporary file in the destination folder,
flushed and fsynced, then renamed over the target. A crash leaves either the old file or the new one, never a
torn one. A folder that must appear whole (an export) is assembled in `atomic_folder`.

Files and folders are created with the permissions the process's umask gives (and a default ACL, where the
folder has one), as `open()` and `mkdir` create them: the temporary file is created with mode 0666 and the
temporary folder with 0777, and the kernel removes the umask's bits (tempfile.mkstemp and mkdtemp would
create 0600 and 0700 whatever the umask, so that nobody else could read a bundle). Because the kernel
applies the umask at creation, medfl never reads or changes it: os.umask(0) and back would briefly give any
file another thread creates meanwhile mode 0666.

Writing only bytes means that every failure to write (a full disk, a read-only folder, no permission) arrives
as an OSError, and becomes one WriteError naming the file: torch.save writing into a file itself turns a full
disk into `RuntimeError: [enforce fail at inline_container.cc:672] unexpected pos`.

Every torch file is read with `load_torch_file` (weights_only=True): a file holding anything but tensors and
plain containers is refused before any of it runs, with one line naming the file.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import pickle
import re
import secrets
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from medfl.errors import DataError, WriteError

_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
_ATTEMPTS = 100  # names tried for a temporary file or folder before giving up (as tempfile does)


def write_error(path: str | Path, error: OSError, what: str = "cannot write") -> WriteError:
    """The one line of a failed write: the file or folder, and the system's reason (e.g. No space left on
    device)."""
    return WriteError(f"{path}: {what} ({error.strerror or error})")


def _temporary_path(folder: Path, name: str) -> Path:
    """`.<name>.<random>.tmp` in `folder`: hidden, beside its target, and removed by a resume's clean-up
    (RunFolder.clean_temporaries) when a killed process left it."""
    return folder / f".{name}.{secrets.token_hex(4)}.tmp"


def _create_temporary_file(folder: Path, name: str) -> tuple[int, Path]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(_ATTEMPTS):
        path = _temporary_path(folder, name)
        try:
            return os.open(path, flags, 0o666), path  # the umask applies, as for open()
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name for {folder / name}")


def _write_file(handle: int, data: bytes, sync: bool) -> None:
    with os.fdopen(handle, "wb") as stream:
        stream.write(data)
        stream.flush()
        if sync:
            os.fsync(stream.fileno())


def atomic_write_bytes(path: str | Path, data: bytes, sync: bool = True) -> Path:
    """Write `data` to `path` atomically (see the module's docstring); the folder is created when missing.

    `sync=False` skips the fsync, for files that can be made again (the synthetic data set): a crash may
    then leave the previous file or an empty one, never a mix. Any OSError becomes one WriteError naming
    `path`; the previous file is left as it was."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = _create_temporary_file(path.parent, path.name)
        try:
            _write_file(handle, data, sync)
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
    except OSError as error:
        raise write_error(path, error) from None
    return path


@contextmanager
def staging_folder(parent: str | Path, name: str) -> Iterator[Path]:
    """A new hidden folder `.<name>.<random>.tmp` in `parent` (created with the umask's permissions), removed
    with whatever is left in it when the block ends."""
    parent = Path(parent)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        for _ in range(_ATTEMPTS):
            folder = _temporary_path(parent, name)
            try:
                folder.mkdir(0o777)
                break
            except FileExistsError:
                continue
        else:
            raise FileExistsError(f"no free temporary name for {parent / name}")
    except OSError as error:
        raise write_error(parent / name, error) from None
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def atomic_folder(target: str | Path) -> Iterator[Path]:
    """A folder that appears whole or not at all: fill the yielded staging folder (beside `target`); when the
    block ends without an error it is renamed to `target`, which must not exist then (an existing folder is
    never replaced). On an error, nothing is left."""
    target = Path(target)
    with staging_folder(target.parent, target.name) as staging:
        try:
            yield staging
        except WriteError as error:  # name the file where the user will look for it, not the staging copy
            raise WriteError(str(error).replace(str(staging), str(target))) from None
        if target.exists():
            raise WriteError(f"{target}: appeared while it was being written; it is left as it is")
        try:
            os.rename(staging, target)
        except OSError as error:
            raise write_error(target, error) from None


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


def torch_bytes(obj: Any, save: Any = None) -> bytes:
    """The bytes `save` (torch.save by default; torch.export.save, torch.jit.save) writes for `obj`, made in
    memory, so that writing them to disk is plain file I/O (see the module's docstring)."""
    import torch

    buffer = io.BytesIO()
    (save or torch.save)(obj, buffer)
    return buffer.getvalue()


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """torch.save `obj` to `path` atomically: serialized in memory, then written as bytes."""
    return atomic_write_bytes(path, torch_bytes(obj))


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
