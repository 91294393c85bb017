"""A site's data fingerprint covers the contents of every file it reads: one flipped bit in an image, a volume
or a mask changes it, the same bytes rewritten do not, and files the site does not use are left out."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medfl.config import DataSettings, load_site_config
from medfl.data import inspect_site
from medfl.data.fingerprint import data_fingerprint
from medfl.data.images import check_image
from medfl.tasks import task_for

SETTINGS = DataSettings(input_size=16, num_workers=0)


def _fingerprint(config: Path) -> str:
    site = load_site_config(config)
    data = inspect_site(site, SETTINGS, task=task_for(site.task))
    assert not data.report.errors, data.report.errors
    return data_fingerprint(data)


def flip_one_bit_keeping_it_decodable(path: Path) -> None:
    """Flip one bit in the second half of an image file (its compressed pixels), at the first place where the
    image still decodes: same size, same format, other content."""
    original = path.read_bytes()
    for position in range(len(original) // 2, len(original) - 2):
        changed = bytearray(original)
        changed[position] ^= 0x01
        path.write_bytes(bytes(changed))
        if check_image(path) is None:
            return
    raise AssertionError(f"no decodable one-bit change of {path}")


def test_one_flipped_bit_in_an_image_changes_the_fingerprint(ham10000_site):
    config = ham10000_site()
    before = _fingerprint(config)
    data = inspect_site(load_site_config(config), SETTINGS, task=task_for("classification"))
    image = Path(data.splits["train"][0]["image"])
    size = image.stat().st_size
    image.write_bytes(image.read_bytes())  # the same bytes, written again: same fingerprint
    assert _fingerprint(config) == before
    flip_one_bit_keeping_it_decodable(image)
    assert image.stat().st_size == size
    assert _fingerprint(config) != before


def test_the_fingerprint_holds_each_used_files_sha256_and_no_other(ham10000_site):
    config = ham10000_site()
    site = load_site_config(config)
    data = inspect_site(site, SETTINGS, task=task_for(site.task))
    used = {record["image"] for records in data.splits.values() for record in records}
    assert set(data.file_digests) == used
    assert all(data.file_digests[path] == hashlib.sha256(Path(path).read_bytes()).hexdigest() for path in used)
    before = data_fingerprint(data)
    dropped = next(site.data_root.rglob("ISIC_akiec000.jpg"))  # a label the site maps to null: never read
    flip_one_bit_keeping_it_decodable(dropped)
    assert _fingerprint(config) == before


def test_one_flipped_bit_that_preprocessing_clips_away_still_changes_the_fingerprint(prostate_site):
    """A brighter brightest voxel vanishes in the 99.5th-percentile clip, so the preprocessed slices (all that
    the fingerprint compared for volumes) stay the same: only the file's own hash sees it."""
    config = prostate_site(layout="metaimage", cases=("Case00", "Case01", "Case02", "Case03"))
    before = _fingerprint(config)
    header = load_site_config(config).data_root / "Case01.mhd"
    raw = header.with_suffix(".raw")
    voxels = sitk.GetArrayFromImage(sitk.ReadImage(str(header)))
    assert voxels.dtype == np.float32
    brightest = int(np.argmax(voxels))
    data = bytearray(raw.read_bytes())
    value = np.frombuffer(bytes(data[4 * brightest: 4 * brightest + 4]), dtype="<f4")[0]
    bit = next(b for b in range(22, -1, -1) if not (int.from_bytes(data[4 * brightest: 4 * brightest + 4], "little")
                                                    >> b) & 1)
    data[4 * brightest + bit // 8] ^= 1 << (bit % 8)
    raw.write_bytes(bytes(data))
    changed = sitk.GetArrayFromImage(sitk.ReadImage(str(header))).ravel()[brightest]
    assert changed > value
    assert _fingerprint(config) != before
