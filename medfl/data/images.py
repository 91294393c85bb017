"""2-D image files of a classification site: find them under a folder, and prove they decode.

Checking opens and fully decodes every image (a truncated JPEG fails only when its data is read). JPEGs are
decoded at a reduced scale (PIL's draft mode), which still walks the whole compressed stream but costs far
less than a full decode. Threads overlap the work, since PIL releases the GIL while decoding. The decoded
pixels also give the image's colour statistics (site shift), so nothing is decoded twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from medfl.data.shift import colour_statistics

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def index_images(root: Path, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> dict[str, list[Path]]:
    """Map each image file's stem to the files carrying it, searching `root` recursively."""
    index: dict[str, list[Path]] = {}
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in extensions and path.is_file():
            index.setdefault(path.stem, []).append(path)
    return index


def check_image(path: Path) -> str | None:
    """None when `path` decodes to an RGB image, else a short description of what is wrong."""
    return inspect_image(path)[0]


def inspect_image(path: Path) -> tuple[str | None, np.ndarray | None]:
    """check_image's verdict and, for a good image, its colour statistics (`medfl.data.shift`) measured on
    the pixels this check decodes anyway."""
    try:
        with Image.open(path) as image:
            mode, (width, height) = image.mode, image.size
            if image.format == "JPEG":
                image.draft("RGB", (32, 32))
            image.load()
            histogram = image.histogram() if mode == "RGB" else None
    except FileNotFoundError:
        return "image file not found", None
    except UnidentifiedImageError:
        return "unreadable or corrupt image (not in an image format PIL can read)", None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        return f"unreadable or corrupt image ({' '.join(str(error).split())})", None
    if histogram is None:
        return f"image mode is {mode}, expected RGB colour", None
    return None, colour_statistics(np.asarray(histogram), width, height)


def check_images(paths: Iterable[Path], workers: int = 2) -> list[str | None]:
    """check_image over many files, in `workers` threads (0 or 1: in this thread), results in order."""
    return [verdict for verdict, _ in inspect_images(paths, workers)]


def inspect_images(paths: Iterable[Path], workers: int = 2) -> list[tuple[str | None, np.ndarray | None]]:
    """inspect_image over many files, in `workers` threads (0 or 1: in this thread), results in order."""
    paths = list(paths)
    if workers <= 1 or len(paths) < 2:
        return [inspect_image(p) for p in paths]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(inspect_image, paths))
