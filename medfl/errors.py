"""Errors meant for people: one readable line naming the site, the file and the problem."""

from __future__ import annotations


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
