"""2-D image files of a classification site: find them under a folder, and prove they decode.

Checking reads every image file once and fully decodes it (a truncated JPEG fails only when its data is
read). JPEGs are decoded at a reduced scale (PIL's draft mode), which still walks the whole compressed stream
but costs far less than a full decode. Threads overlap the work, since PIL and hashlib release the GIL. The
bytes read give the file's sha256 (the site's data fingerprint, medfl.data.fingerprint) and the decoded pixels
its colour and content statistics (site shift), so nothing is read or decoded twice.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from medfl.data.fingerprint import content_sha256
from medfl.data.shift import GRID, dermoscopy_statistics

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def index_images(root: Path, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> dict[str, list[Path]]:
    """Map each image file's stem to the files carrying it, searching `root` recursively."""
    index: dict[str, list[Path]] = {}
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in extensions and path.is_file():
            index.setdefault(path.stem, []).append(path)
    return index


@dataclass(frozen=True)
class ImageFacts:
    """What reading one image file found: None or what is wrong with it, its site-shift statistics (a good
    image only: medfl.data.shift.DERMOSCOPY), and the sha256 of its bytes (None when it could not be read)."""

    verdict: str | None
    statistics: np.ndarray | None = None
    sha256: str | None = None


def check_image(path: Path) -> str | None:
    """None when `path` decodes to an RGB image, else a short description of what is wrong."""
    return read_image(path).verdict


def inspect_image(path: Path) -> tuple[str | None, np.ndarray | None]:
    """check_image's verdict and, for a good image, its site-shift statistics (`medfl.data.shift`) measured
    on the pixels this check decodes anyway."""
    facts = read_image(path)
    return facts.verdict, facts.statistics


def read_image(path: Path) -> ImageFacts:
    """Read an image file once: hash its bytes, decode them, measure the decoded pixels."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return ImageFacts("image file not found")
    except OSError as error:
        return ImageFacts(f"unreadable image file ({error.strerror or error})")
    sha256 = content_sha256(data)
    try:
        with Image.open(io.BytesIO(data)) as image:
            mode, (width, height) = image.mode, image.size
            if image.format == "JPEG":
                image.draft("RGB", (32, 32))
            image.load()
            histogram = image.histogram() if mode == "RGB" else None
            grid = np.asarray(image.resize((GRID, GRID), Image.BOX)) if mode == "RGB" else None
    except UnidentifiedImageError:
        return ImageFacts("unreadable or corrupt image (not in an image format PIL can read)", sha256=sha256)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        return ImageFacts(f"unreadable or corrupt image ({' '.join(str(error).split())})", sha256=sha256)
    if histogram is None:
        return ImageFacts(f"image mode is {mode}, expected RGB colour", sha256=sha256)
    return ImageFacts(None, dermoscopy_statistics(np.asarray(histogram), grid, width, height), sha256)


def check_images(paths: Iterable[Path], workers: int = 2) -> list[str | None]:
    """check_image over many files, in `workers` threads (0 or 1: in this thread), results in order."""
    return [facts.verdict for facts in read_images(paths, workers)]


def read_images(paths: Iterable[Path], workers: int = 2) -> list[ImageFacts]:
    """read_image over many files, in `workers` threads (0 or 1: in this thread), results in order."""
    paths = list(paths)
    if workers <= 1 or len(paths) < 2:
        return [read_image(p) for p in paths]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(read_image, paths))
