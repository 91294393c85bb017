"""CSV tables of a site (label tables, metadata, split files), read with the standard library.

Every problem (missing file, missing column, undecodable text) is recorded in the site's ProblemLog and the
reader returns None, so that validation can go on with the site's other checks.
"""

from __future__ import annotations

import csv
import difflib
from collections.abc import Sequence
from pathlib import Path

from medfl.data.problems import ProblemLog


def _found_columns(columns: list[str], required: Sequence[str]) -> str:
    """The header's column names for a message, only when one of them is (close to) an expected column: the
    first line of a file that is no such table (a wrong path) is never repeated."""
    lowered = [column.lower() for column in columns]
    if any(difflib.get_close_matches(name.lower(), lowered, n=1) for name in required):
        return f"found: {', '.join(columns)}"
    return "its first line holds none of them: is this the right file?"


def read_table(path: Path, required: Sequence[str], log: ProblemLog, what: str = "table") -> list[dict[str, str]] | None:
    """Rows of a CSV file as dicts of stripped strings; None (and a recorded error) when unusable."""
    if not path.is_file():
        log.error(f"{what} not found", path)
        return None
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in reader.fieldnames or []]
            missing = [c for c in required if c not in columns]
            if missing:
                log.error(f"{what} lacks column(s) {', '.join(missing)} ({_found_columns(columns, required)})", path)
                return None
            rows = [
                {(k or "").strip(): (v or "").strip() for k, v in row.items() if isinstance(v, str) or v is None}
                for row in reader
            ]
    except UnicodeDecodeError:
        log.error(f"{what} is not UTF-8 text", path)
        return None
    except csv.Error as error:
        log.error(f"{what} is not a valid CSV file ({error})", path)
        return None
    return rows
