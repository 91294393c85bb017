"""Data problems: one line each, naming the site, the file and what is wrong.

Validation collects every problem of a site instead of stopping at the first, so that `medfl check` and
`load_site` can list them all. Problems of one kind beyond a limit (say 10 000 missing images) are folded
into one summary line so that the report stays readable.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Severity = Literal["error", "warning"]


def display_path(path: str | Path | None) -> str | None:
    """A path as people want to read it: relative to the working folder when it lies below it."""
    if path is None:
        return None
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):
        return str(path)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a site's data; errors stop training, warnings are reported only."""

    site: str
    file: str | None
    message: str
    severity: Severity = "error"

    def __str__(self) -> str:
        parts = [f"site '{self.site}'", display_path(self.file), self.message]
        return ": ".join(p for p in parts if p)


class ProblemLog:
    """Collects a site's problems; at most `limit` lines per kind, the rest counted in one line."""

    def __init__(self, site: str, limit: int = 10):
        self.site = site
        self.limit = limit
        self._problems: list[Problem] = []
        self._seen: Counter[str] = Counter()
        self._overflow: dict[str, Severity] = {}

    def error(self, message: str, file: str | Path | None = None, kind: str | None = None) -> None:
        """Record an error (the site cannot be used until it is fixed)."""
        self._add(message, file, "error", kind)

    def warning(self, message: str, file: str | Path | None = None, kind: str | None = None) -> None:
        """Record a warning (reported; the site can still be used)."""
        self._add(message, file, "warning", kind)

    def _add(self, message: str, file: str | Path | None, severity: Severity, kind: str | None) -> None:
        key = kind or message
        self._seen[key] += 1
        if self._seen[key] > self.limit:
            self._overflow[key] = severity
            return
        self._problems.append(Problem(self.site, os.fspath(file) if file is not None else None, message, severity))

    @property
    def has_errors(self) -> bool:
        return any(p.severity == "error" for p in self.problems())

    def problems(self) -> list[Problem]:
        """Every recorded problem, errors first, with one summary line per kind that overflowed."""
        folded = [
            Problem(self.site, None, f"... and {self._seen[key] - self.limit} more: {key}", severity)
            for key, severity in self._overflow.items()
        ]
        everything = self._problems + folded
        return [p for p in everything if p.severity == "error"] + [p for p in everything if p.severity == "warning"]
