"""Errors meant for people: one readable line naming the site, the file and the problem."""

from __future__ import annotations

import errno


class MedflError(Exception):
    """Base of every error medfl reports to a user without a traceback."""


class ConfigError(MedflError):
    """A config file is invalid (unknown key, bad value, missing file)."""


class DataError(MedflError):
    """A site's data is unusable: missing, unreadable, inconsistent or empty."""

    def __init__(self, message: str, site: str | None = None, path: str | None = None):
        self.site = site
        self.path = path
        parts = [f"site '{site}'" if site else None, str(path) if path else None, message]
        super().__init__(": ".join(p for p in parts if p))


class WriteError(MedflError):
    """A file or folder cannot be written (a full disk, a read-only folder, no permission): one line naming it
    and the system's reason."""


def storage_failure(error: BaseException | None) -> WriteError | None:
    """The WriteError a full, over-quota or read-only disk amounts to, when one caused `error` however it was
    carried (torch turns a failed write into a RuntimeError whose context is the OSError), else None: the
    last line of defence for writes that do not go through medfl.checkpoints."""
    storage = {errno.ENOSPC, errno.EFBIG, errno.EROFS, getattr(errno, "EDQUOT", errno.ENOSPC)}
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in storage:
            where = f"{error.filename}: " if error.filename else ""
            return WriteError(f"{where}cannot write ({error.strerror or error})")
        error = error.__cause__ or error.__context__
    return None
