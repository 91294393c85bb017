"""MRI volumes and masks: read, check, reorient, normalise, resample in-plane.

Geometry of both layouts (NIfTI and MetaImage) comes from SimpleITK, so it has one convention (ITK's LPS
world coordinates); NIfTI voxels are read by nibabel, which notices truncated files. Every volume is reoriented to LPS (`DICOMOrient`), which makes NumPy's (z, y, x) array order
axial slices stacked from inferior to superior, each slice with anterior at the top and the patient's right
on the left (the radiological view). Intensities are clipped to the 0.5-99.5 percentiles and z-scored over
the volume; slices are resized to input_size x input_size, whatever their aspect ratio (bilinear with
anti-aliasing for images, nearest for masks). `CaseGeometry.to_image` undoes all of this for a predicted mask.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from nibabel.filebasedimages import ImageFileError

WORKING_ORIENTATION = "LPS"
INTENSITY_PERCENTILES = (0.5, 99.5)
MASK_LIKE_VALUES = 4  # an image with this many distinct integer values or fewer is blank or a mask, not MRI
_VALUE_SAMPLE_STEP = 97  # voxels sampled first: an MRI volume shows many values among them, at no cost


@dataclass(frozen=True)
class CaseGeometry:
    """Where a case's voxels lie, as in its original image file: enough to write a predicted mask back."""

    case_id: str
    image_file: str
    size: tuple[int, int, int]  # voxels along the file's (x, y, z) axes, SimpleITK order
    spacing: tuple[float, float, float]  # mm, SimpleITK order
    origin: tuple[float, float, float]  # mm, LPS world coordinates
    direction: tuple[float, ...]  # 3x3 direction cosines, row-major, LPS world
    orientation: str  # the file's orientation code (e.g. "LPS", "RAI")

    @classmethod
    def of(cls, case_id: str, path: str | Path, image: sitk.Image) -> CaseGeometry:
        """The geometry of a volume as SimpleITK read it from `path` (training, prediction and bundles alike)."""
        direction = tuple(image.GetDirection())
        return cls(case_id=case_id, image_file=str(path), size=tuple(image.GetSize()),
                   spacing=tuple(image.GetSpacing()), origin=tuple(image.GetOrigin()), direction=direction,
                   orientation=sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(direction))

    @property
    def affine(self) -> np.ndarray:
        """4x4 voxel (i, j, k) = (x, y, z) to RAS world (mm) matrix, as nibabel writes it."""
        matrix = np.array(self.direction, dtype=np.float64).reshape(3, 3) @ np.diag(self.spacing)
        lps = np.eye(4)
        lps[:3, :3] = matrix
        lps[:3, 3] = self.origin
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps

    def _reference(self) -> sitk.Image:
        image = sitk.Image([int(s) for s in self.size], sitk.sitkUInt8)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    @cached_property
    def _oriented(self) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """(size, spacing) of the volume in working orientation, SimpleITK (x, y, z) order."""
        oriented = sitk.DICOMOrient(self._reference(), WORKING_ORIENTATION)
        return tuple(oriented.GetSize()), tuple(oriented.GetSpacing())

    @property
    def oriented_grid(self) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """(size, spacing) of the volume in working orientation, (x, y, z) order (RAS has the same axes)."""
        return self._oriented

    @property
    def num_slices(self) -> int:
        """Axial slices in the working orientation."""
        return int(self._oriented[0][2])

    def slice_volume_spacing(self, input_size: int) -> tuple[float, float, float]:
        """Voxel spacing (mm) of the preprocessed slices stacked as an (H, W, slices) volume.

        Rows run along y and columns along x of the working orientation; resizing a slice to input_size
        stretches each in-plane spacing by (original size / input_size).
        """
        (width, height, _), (spacing_x, spacing_y, spacing_z) = self._oriented
        return (spacing_y * height / input_size, spacing_x * width / input_size, spacing_z)

    def to_image(self, mask: np.ndarray) -> sitk.Image:
        """A (num_slices, H, W) mask in working orientation at any in-plane size -> an image on the file's grid."""
        oriented = sitk.DICOMOrient(self._reference(), WORKING_ORIENTATION)
        width, height, depth = oriented.GetSize()
        if mask.ndim != 3 or mask.shape[0] != depth:
            raise ValueError(f"case '{self.case_id}': mask shape {mask.shape} does not hold {depth} axial slices")
        image = sitk.GetImageFromArray(resize_slices(mask, height, width, "nearest-exact").astype(np.uint8))
        image.CopyInformation(oriented)
        restored = sitk.DICOMOrient(image, self.orientation)
        restored.CopyInformation(self._reference())
        return restored


@dataclass
class PreparedCase:
    """A case ready for slicing: (Z, S, S) normalised float32 image and {0, 1} uint8 mask.

    raw_range: the raw intensities' 0.5 and 99.5 percentiles, the clip limits (the raw scale, for site shift)."""

    case_id: str
    image: np.ndarray
    mask: np.ndarray
    geometry: CaseGeometry
    raw_range: tuple[float, float] = (float("nan"), float("nan"))
    original: OriginalMask | None = None


@dataclass(frozen=True)
class OriginalMask:
    """A case's mask on its own voxel grid, in working orientation as a (Z, Y, X) array, and that grid's spacing:
    what the scores on the original grid compare a prediction with. Kept packed (one bit a voxel)."""

    bits: np.ndarray
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]  # mm, in the array's (z, y, x) order

    @classmethod
    def of(cls, labels: np.ndarray, geometry: CaseGeometry) -> OriginalMask:
        """`labels` (Z, Y, X) in working orientation, as `check_case` reads them; the spacing from `geometry`."""
        _, (spacing_x, spacing_y, spacing_z) = geometry.oriented_grid
        return cls(np.packbits(np.asarray(labels, dtype=bool), axis=None), tuple(int(n) for n in labels.shape),
                   (float(spacing_z), float(spacing_y), float(spacing_x)))

    @property
    def mask(self) -> np.ndarray:
        """The boolean (Z, Y, X) mask."""
        count = int(np.prod(self.shape))
        return np.unpackbits(self.bits, count=count).reshape(self.shape).astype(bool)


def _itk_message(error: Exception) -> str:
    """The useful last part of an ITK exception, on one line."""
    text = str(error)
    for marker in ("ERROR:", "Description:"):
        if marker in text:
            text = text.rsplit(marker, 1)[1]
    text = re.sub(r"\w+\(0x[0-9a-fA-F]+\):\s*", "", text)
    return " ".join(text.split())[:200]


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith((".nii", ".nii.gz"))


def _read_nifti(path: Path) -> sitk.Image:
    """NIfTI voxels through nibabel, geometry from SimpleITK's header reader.

    SimpleITK fills a truncated NIfTI file with zeros without a word; nibabel refuses it. The header is
    still read by SimpleITK so that geometry follows ITK's conventions for both layouts.
    """
    info = sitk.ImageFileReader()
    info.SetFileName(str(path))
    info.ReadImageInformation()
    data = np.asanyarray(nib.load(path).dataobj)
    if data.ndim != 3 or info.GetDimension() != 3:
        raise _VolumeShapeError(f"{max(data.ndim, info.GetDimension())} dimensions, expected a 3-D volume")
    image = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
    image.SetSpacing(info.GetSpacing())
    image.SetOrigin(info.GetOrigin())
    image.SetDirection(info.GetDirection())
    return image


class _VolumeShapeError(ValueError):
    """A readable file that does not hold one 3-D single-channel volume."""


def metaimage_data_file(path: Path) -> Path | None:
    """The voxel file a MetaImage header names (`ElementDataFile`), or None when the voxels are in the header
    file itself (LOCAL, as in .mha), are a list or pattern of files, or the header cannot be read."""
    try:
        with open(path, "rb") as stream:
            header = stream.read(1 << 16).decode("latin-1")
    except OSError:
        return None
    for line in header.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "ElementDataFile":
            name = value.strip()
            if not name or name.upper() in ("LOCAL", "LIST") or "%" in name:
                return None
            return path.parent / name
    return None


def _missing_data_file(path: Path, what: str) -> str | None:
    """For a MetaImage header whose voxel file is missing: a message naming that file (ITK would only say
    that it cannot read the header)."""
    if _is_nifti(path) or not path.is_file():
        return None
    data_file = metaimage_data_file(path)
    if data_file is None or data_file.is_file():
        return None
    return f"{what} data file {data_file} is missing (the header {path.name} names it as ElementDataFile)"


def read_volume(path: Path, what: str) -> tuple[sitk.Image | None, str | None]:
    """A 3-D single-channel image, or None and why it cannot be used."""
    missing = _missing_data_file(path, what)
    if missing:
        return None, missing
    try:
        image = _read_nifti(path) if _is_nifti(path) else sitk.ReadImage(str(path))
    except _VolumeShapeError as error:
        return None, f"{what} has {error}"
    except RuntimeError as error:
        return None, f"unreadable or corrupt {what} ({_itk_message(error)})"
    except (OSError, EOFError, ValueError, zlib.error, ImageFileError) as error:
        return None, f"unreadable or corrupt {what} ({' '.join(str(error).split())[:200]})"
    if image.GetDimension() != 3:
        return None, f"{what} has {image.GetDimension()} dimensions, expected a 3-D volume"
    if image.GetNumberOfComponentsPerPixel() != 1:
        return None, f"{what} has {image.GetNumberOfComponentsPerPixel()} components per voxel, expected 1"
    return image, None


def geometry_mismatch(image: sitk.Image, mask: sitk.Image) -> str | None:
    """Why a mask does not lie on its image's voxel grid (shape, spacing, origin or direction), or None."""
    if image.GetSize() != mask.GetSize():
        return f"mask shape {mask.GetSize()} differs from image shape {image.GetSize()}"
    spacing = np.array(image.GetSpacing())
    if not np.allclose(spacing, mask.GetSpacing(), rtol=1e-4, atol=1e-6):
        return f"mask spacing {_fmt(mask.GetSpacing())} differs from image spacing {_fmt(image.GetSpacing())}"
    if not np.allclose(image.GetOrigin(), mask.GetOrigin(), rtol=0, atol=0.01 * spacing.min()):
        return f"mask origin {_fmt(mask.GetOrigin())} differs from image origin {_fmt(image.GetOrigin())}"
    if not np.allclose(image.GetDirection(), mask.GetDirection(), rtol=0, atol=1e-4):
        return "mask orientation (direction cosines) differs from the image's"
    return None


def _fmt(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def mask_value_problem(mask: np.ndarray) -> str | None:
    """Masks hold non-negative integers (any value > 0 is prostate); else why not."""
    if np.issubdtype(mask.dtype, np.floating):
        if not np.all(np.isfinite(mask)):
            return "mask has NaN or infinite values"
        fractional = mask[mask != np.round(mask)]
        if fractional.size:
            return f"mask has non-integer values (e.g. {fractional.flat[0]:g})"
    if mask.size and mask.min() < 0:
        return f"mask has negative values (minimum {mask.min():g})"
    return None


def image_value_problem(volume: np.ndarray, mask: np.ndarray) -> str | None:
    """Why an image volume cannot be trained on because of its values (blank, or a mask given as the image),
    or None. The rule is the one `medfl predict` applies to its inputs."""
    flat = volume.ravel()
    if len(np.unique(flat[::_VALUE_SAMPLE_STEP])) > MASK_LIKE_VALUES:
        return None
    values = np.unique(flat)
    if len(values) > MASK_LIKE_VALUES or not np.array_equal(values, np.round(values)):
        return None
    shown = ", ".join(f"{v:g}" for v in values)
    what = "a blank volume" if len(values) == 1 else "a mask, not an MRI volume"
    return (f"image holds only the value(s) {shown}: {what} (its mask marks {int(np.count_nonzero(mask))} voxels); "
            "medfl trains on MRI intensities only")


@dataclass
class CheckedCase:
    """A case read and checked, before any resizing: (Z, Y, X) float32 intensities and boolean mask in working
    orientation, its geometry, and the intensities' INTENSITY_PERCENTILES (the clip limits)."""

    case_id: str
    volume: np.ndarray
    labels: np.ndarray
    geometry: CaseGeometry
    clip: tuple[float, float]


def check_case(case_id: str, image_path: Path, mask_path: Path) -> tuple[CheckedCase | None, list[tuple[Path, str]]]:
    """Read and check one case (both files, their grids, the mask's and the image's values); problems come back
    as (file, message) pairs. Slice-wise (prepare_case) and volumetric (medfl.data.volumetric) reading share it."""
    image, problem = read_volume(image_path, "image")
    if image is None:
        return None, [(image_path, problem or "unreadable image")]
    mask, problem = read_volume(mask_path, "mask")
    if mask is None:
        return None, [(mask_path, problem or "unreadable mask")]
    problem = geometry_mismatch(image, mask)
    if problem:
        return None, [(mask_path, problem)]
    mask_array = sitk.GetArrayViewFromImage(mask)
    problem = mask_value_problem(mask_array)
    if problem:
        return None, [(mask_path, problem)]
    geometry = CaseGeometry.of(case_id, image_path, image)
    volume = sitk.GetArrayFromImage(sitk.DICOMOrient(image, WORKING_ORIENTATION)).astype(np.float32)
    if not np.all(np.isfinite(volume)):
        return None, [(image_path, "image has NaN or infinite values")]
    labels = sitk.GetArrayFromImage(sitk.DICOMOrient(mask, WORKING_ORIENTATION)) > 0
    problem = image_value_problem(volume, labels)
    if problem:
        return None, [(image_path, problem)]
    low, high = np.percentile(volume, INTENSITY_PERCENTILES)
    return CheckedCase(case_id, volume, labels, geometry, (low, high)), []


def prepare_case(case_id: str, image_path: Path, mask_path: Path,
                 input_size: int) -> tuple[PreparedCase | None, list[tuple[Path, str]]]:
    """Read, check and preprocess one case; problems come back as (file, message) pairs."""
    checked, problems = check_case(case_id, image_path, mask_path)
    if checked is None:
        return None, problems
    low, high = checked.clip
    image_slices = preprocess_volume(checked.volume, input_size, clip=(low, high))
    return (PreparedCase(case_id, image_slices, resize_mask(checked.labels, input_size), checked.geometry,
                         (float(low), float(high)), OriginalMask.of(checked.labels, checked.geometry)), [])


def resize_slices(volume: np.ndarray, height: int, width: int, mode: str) -> np.ndarray:
    """Resize every (Y, X) slice of a (Z, Y, X) array; "bilinear" is anti-aliased (PIL-like) when shrinking.

    torch is imported here, not at the top, so that `medfl check` validates configs before loading it."""
    import torch
    import torch.nn.functional as F

    tensor = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[:, None]
    options = {"antialias": True, "align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(tensor, size=(height, width), mode=mode, **options)[:, 0].numpy()


def preprocess_volume(volume: np.ndarray, input_size: int, clip: tuple[float, float] | None = None) -> np.ndarray:
    """(Z, Y, X) intensities -> (Z, S, S) float32: percentile clip, z-score over the volume, in-plane resize.

    `clip`: the volume's INTENSITY_PERCENTILES when the caller has them already.

    Percentiles come from NumPy: MONAI's ClipIntensityPercentiles goes through torch.quantile, which sorts
    (slow) and refuses tensors above 16M voxels (a 512 x 512 x 64 volume).
    """
    from monai.transforms import NormalizeIntensity

    low, high = clip if clip is not None else np.percentile(volume, INTENSITY_PERCENTILES)
    normalised = np.asarray(NormalizeIntensity()(np.clip(volume, low, high)), dtype=np.float32)
    return np.ascontiguousarray(resize_slices(normalised, input_size, input_size, "bilinear"))


def resize_mask(mask: np.ndarray, input_size: int) -> np.ndarray:
    """(Z, Y, X) boolean -> (Z, S, S) uint8 in {0, 1}, nearest neighbour."""
    return np.ascontiguousarray(resize_slices(mask, input_size, input_size, "nearest-exact").astype(np.uint8))


def write_like(image: sitk.Image, target: Path, source: Path) -> None:
    """Write `image`, which lies on `source`'s voxel grid, to `target` in the format its name says.

    A NIfTI target of a NIfTI source keeps the source's header (qform and sform with their codes, units,
    orientation) with only the data type changed: SimpleITK would write its own codes (qform and sform both
    "scanner"), which changes how viewers and pipelines treat the mask. Other formats go through
    SimpleITK, compressed."""
    if not (_is_nifti(target) and _is_nifti(source)):
        sitk.WriteImage(image, str(target), useCompression=True)
        return
    original = nib.load(source)
    data = np.ascontiguousarray(sitk.GetArrayFromImage(image).transpose(2, 1, 0))
    header = original.header.copy()
    header.set_data_dtype(data.dtype)
    header.set_slope_inter(1.0, 0.0)
    nib.save(type(original)(data, None, header), target)
