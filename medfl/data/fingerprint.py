"""What a site's data was when a run started: its training files, and a fingerprint of everything it read.

A run folder keeps both at the site (never sent to the server): a resumed run is refused when the fingerprint
changed (a filter that adds rows, a replaced or edited image, volume or mask, even one bit of it, another
split), and an export lists the training files without reading the site's data again. The fingerprint covers
the sha256 of every file the site trains and scores on, computed by the readers from the bytes they read
anyway (`medfl.data.images.read_image`, `medfl.data.prostate`), and the records built from them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from medfl.data.site import SiteData

# site.json's `data_fingerprint_version`: 1 compared image files by size (medfl before file contents were
# hashed); 2 compares the sha256 of every file's bytes.
DATA_FINGERPRINT_VERSION = 2


def relative_paths(paths: set[str], data: SiteData) -> list[str]:
    """Sorted paths relative to the site's data_root (absolute when outside it)."""
    root = Path(data.config.data_root).resolve() if data.config is not None else None
    return sorted(_relative(Path(p), root) for p in paths)


def _relative(path: Path, root: Path | None) -> str:
    resolved = path.resolve()
    if root is not None and resolved.is_relative_to(root):
        return resolved.relative_to(root).as_posix()
    return resolved.as_posix()


def content_sha256(data: bytes) -> str:
    """sha256 of bytes a reader holds already."""
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in chunks (a reader that hands the path to a library)."""
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def data_fingerprint(data: SiteData) -> str:
    """sha256 over every record of every split (for images their file, label and group; for MRI slices their
    voxels and mask after preprocessing), every case's geometry, and the sha256 of every file read for them."""
    digest = hashlib.sha256()
    for split, records in data.splits.items():
        for record in records:
            plain = {k: v for k, v in record.items() if not isinstance(v, np.ndarray)}
            digest.update(json.dumps([split, plain], sort_keys=True, default=str).encode())
            for key in ("image", "label"):
                if isinstance(record.get(key), np.ndarray):
                    digest.update(np.ascontiguousarray(record[key]).tobytes())
    for case, geometry in sorted(data.geometry.items()):
        digest.update(json.dumps([case, repr(geometry)]).encode())
    digest.update(json.dumps(sorted(data.file_digests.items())).encode())
    return digest.hexdigest()


def site_config_sha256(config: Any) -> str:
    """sha256 of a site config as validated (paths resolved)."""
    return hashlib.sha256(json.dumps(config.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()
