"""CSV tables of a site (label tables, metadata, split files), read with the standard library.

Every problem (missing file, missing column, undecodable text) is recorded in the site's ProblemLog and the
reader returns None, so that validation can go on with the site's other checks.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from medfl.data.problems import ProblemLog


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
                found = ", ".join(columns) if columns else "no header"
                log.error(f"{what} lacks column(s) {', '.join(missing)} (found: {found})", path)
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
