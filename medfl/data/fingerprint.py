"""What a site's data was when a run started: its training files, and a fingerprint of everything it read.

A run folder keeps both at the site (never sent to the server): a resumed run is refused when the fingerprint
changed (a filter that adds rows, a replaced image, an edited mask, another split), and an export lists the
training files without reading the site's data again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from medfl.data.site import SiteData


def relative_paths(paths: set[str], data: SiteData) -> list[str]:
    """Sorted paths relative to the site's data_root (absolute when outside it)."""
    root = Path(data.config.data_root).resolve() if data.config is not None else None
    return sorted(_relative(Path(p), root) for p in paths)


def _relative(path: Path, root: Path | None) -> str:
    resolved = path.resolve()
    if root is not None and resolved.is_relative_to(root):
        return resolved.relative_to(root).as_posix()
    return resolved.as_posix()


def data_fingerprint(data: SiteData) -> str:
    """sha256 over every record of every split: for images their file, size, label and group; for MRI slices
    their voxels and mask (after preprocessing) and their case's geometry."""
    digest = hashlib.sha256()
    for split, records in data.splits.items():
        for record in records:
            digest.update(json.dumps([split, _describe(record)], sort_keys=True, default=str).encode())
            for key in ("image", "label"):
                if isinstance(record.get(key), np.ndarray):
                    digest.update(np.ascontiguousarray(record[key]).tobytes())
    for case, geometry in sorted(data.geometry.items()):
        digest.update(json.dumps([case, repr(geometry)]).encode())
    return digest.hexdigest()


def _describe(record: dict[str, Any]) -> dict[str, Any]:
    """A record's plain fields; an image path also by its size on disk."""
    plain = {k: v for k, v in record.items() if not isinstance(v, np.ndarray)}
    image = record.get("image")
    if isinstance(image, str):
        plain["image_bytes"] = Path(image).stat().st_size
    return plain


def site_config_sha256(config: Any) -> str:
    """sha256 of a site config as validated (paths resolved)."""
    return hashlib.sha256(json.dumps(config.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()
