"""Sites stay inside their folders: every file a site reads lies in its data_root or its config's folder.

The rule itself (resolved paths compared, symlinks followed) is `SiteConfig.holds`; `admitted` applies it
where a reader is about to open a file and records the refusal as one problem naming the site and the file.
A refused file is never opened, so nothing of its contents can reach a message.
"""

from __future__ import annotations

from pathlib import Path

from medfl.config import SiteConfig
from medfl.data.problems import ProblemLog

OUTSIDE = "lies outside data_root and the site config's folder"


def admitted(site: SiteConfig, path: Path, log: ProblemLog, what: str, kind: str | None = None) -> bool:
    """True when `path` may be read for `site`; else records an error naming the file and returns False.

    `kind` groups many refusals of one sort (images of a table) into one summary line beyond the log's limit."""
    if site.holds(path):
        return True
    log.error(f"{what} {OUTSIDE} (it resolves to {Path(path).resolve()}); refused", path,
              kind=kind or f"{what} outside the site's folders")
    return False


def named_files_admitted(site: SiteConfig, log: ProblemLog) -> bool:
    """Whether every file the site config names (label table, metadata table, split file) may be read;
    each refused one is recorded."""
    named = {"table": site.table_path, "metadata table": site.metadata_path, "split file": site.split_path}
    verdicts = [admitted(site, path, log, what) for what, path in named.items() if path is not None]
    return all(verdicts)
