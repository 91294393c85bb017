"""Write one synthetic prostate MRI site: NIfTI (`CaseXX.nii.gz` + `CaseXX_segmentation.nii.gz`) or
PROMISE12-style MetaImage (`CaseXX.mhd`/`.raw` + `CaseXX_segmentation.mhd`/`.raw`).

NIfTI files carry the scanner's voxel-to-RAS affine in both qform and sform and are gzipped without a time
stamp, so reruns are byte-identical. MetaImage files are written by SimpleITK, in its LPS convention.
"""

from __future__ import annotations

import gzip
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from medfl.synth.files import claim_folder, csv_text, prune, write_bytes, write_text
from medfl.synth.phantom import render_case, sample_anatomy, site_anatomy
from medfl.synth.rng import rng_for
from medfl.synth.sites import SPLIT_FRACTIONS, ProstateSite, case_ids

SPLIT_FILE = "split.csv"
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


@dataclass
class ProstateResult:
    """What was written for one prostate site."""

    name: str
    folder: Path
    layout: str
    cases: list[str]
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    files: int
    changed: int
    split_file: Path | None


def nifti_bytes(array: np.ndarray, affine: np.ndarray) -> bytes:
    """A gzipped NIfTI-1 file (qform = sform = `affine`, millimetres) with no time stamp in the gzip header."""
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    return gzip.compress(image.to_bytes(), compresslevel=1, mtime=0)


def metaimage_bytes(array: np.ndarray, affine: np.ndarray, name: str) -> dict[str, bytes]:
    """`name.mhd` and `name.raw` as SimpleITK writes them, with the RAS `affine` converted to LPS."""
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.SetSpacing(tuple(float(z) for z in zooms))
    image.SetOrigin(tuple(float(v) for v in _RAS_TO_LPS @ affine[:3, 3]))
    image.SetDirection(tuple(float(v) for v in (_RAS_TO_LPS @ (affine[:3, :3] / zooms)).ravel()))
    with tempfile.TemporaryDirectory() as tmp:
        sitk.WriteImage(image, str(Path(tmp) / f"{name}.mhd"), useCompression=False)
        return {
            f"{name}.raw": (Path(tmp) / f"{name}.raw").read_bytes(),
            f"{name}.mhd": (Path(tmp) / f"{name}.mhd").read_bytes(),
        }


def _split_rows(cases: list[str], rng: np.random.Generator) -> list[tuple[str, str]]:
    """An official-style split by case: 70/10/20 with at least one validation and one test case."""
    order = [cases[i] for i in rng.permutation(len(cases))]
    n_val = max(1, round(len(cases) * SPLIT_FRACTIONS[1]))
    n_test = max(1, round(len(cases) * SPLIT_FRACTIONS[2]))
    split = {case: "val" for case in order[:n_val]}
    split.update({case: "test" for case in order[n_val : n_val + n_test]})
    return [(case, split.get(case, "train")) for case in cases]


def write_prostate_site(
    site: ProstateSite, root: Path, seed: int, scale: float, min_cases: int
) -> ProstateResult:
    """Write `site` under `root/<name>` and prune stale files; every case gets an image and a mask."""
    folder = Path(root) / site.name
    claim_folder(folder)
    cases = case_ids(site.num_cases(scale, min_cases), rng_for(seed, site.name, "cases"))
    outputs: dict[str, bytes] = {}
    for case in cases:
        anatomy = sample_anatomy(rng_for(seed, site.name, "anatomy", case))
        anatomy = site_anatomy(anatomy, site.population, site.scanner.endorectal > 0,
                               rng_for(seed, site.name, "population", case))
        image, mask, affine = render_case(anatomy, site.scanner, rng_for(seed, site.name, "scan", case))
        mask_name = f"{case}{site.mask_suffix}"
        if site.layout == "metaimage":
            outputs.update(metaimage_bytes(image, affine, case))
            outputs.update(metaimage_bytes(mask, affine, mask_name))
        else:
            outputs[f"{case}.nii.gz"] = nifti_bytes(image, affine)
            outputs[f"{case}{site.mask_suffix}.nii.gz"] = nifti_bytes(mask, affine)
    changed = sum(write_bytes(folder / name, data) for name, data in outputs.items())
    written = [folder / name for name in outputs]
    split_path = None
    if site.split_file:
        split_path = folder / SPLIT_FILE
        changed += write_text(
            split_path, csv_text(("id", "split"), _split_rows(cases, rng_for(seed, site.name, "split")))
        )
        written.append(split_path)
    prune(folder, written)
    return ProstateResult(
        name=site.name,
        folder=folder,
        layout=site.layout,
        cases=cases,
        shape=site.scanner.shape(),
        spacing=site.scanner.zooms(),
        files=len(written),
        changed=changed,
        split_file=split_path,
    )
