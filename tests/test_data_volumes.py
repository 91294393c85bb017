"""Volumes: reading, geometry checks, mask values, reorientation, preprocessing and writing back."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import phantom_case, write_volume

from medfl.data.volumes import (
    geometry_mismatch,
    mask_value_problem,
    prepare_case,
    preprocess_volume,
    read_volume,
    resize_mask,
)

FLIP_X_AND_Z = (-1, 0, 0, 0, 1, 0, 0, 0, -1)


def _case(tmp_path, image=None, mask=None, extension=".nii.gz", **geometry):
    default_image, default_mask = phantom_case()
    image_path = write_volume(tmp_path / f"Case01{extension}", default_image if image is None else image, **geometry)
    mask_path = write_volume(tmp_path / f"Case01_segmentation{extension}",
                             default_mask if mask is None else mask, **geometry)
    return image_path, mask_path


@pytest.mark.parametrize("extension", [".nii.gz", ".nii", ".mhd"])
def test_prepared_case_shapes_values_and_geometry(tmp_path, extension):
    image_path, mask_path = _case(tmp_path, extension=extension, spacing=(0.5, 0.7, 3.0), origin=(1, 2, 3))
    case, problems = prepare_case("Case01", image_path, mask_path, input_size=16)
    assert problems == []
    assert case.image.shape == (6, 16, 16) and case.image.dtype == np.float32
    assert case.mask.shape == (6, 16, 16) and case.mask.dtype == np.uint8 and set(np.unique(case.mask)) == {0, 1}
    assert abs(float(case.image.mean())) < 0.2
    assert case.geometry.size == (24, 20, 6) and case.geometry.spacing == pytest.approx((0.5, 0.7, 3.0))
    assert case.geometry.origin == pytest.approx((1, 2, 3)) and case.geometry.orientation == "LPS"
    assert case.geometry.num_slices == 6
    assert case.geometry.slice_volume_spacing(16) == pytest.approx((0.7 * 20 / 16, 0.5 * 24 / 16, 3.0))


def test_volumes_are_reoriented_so_one_anatomy_gives_one_array(tmp_path):
    image, mask = phantom_case(seed=3)
    plain, _ = prepare_case("a", *_case(tmp_path / "a", image, mask), input_size=20)
    # The same anatomy stored with x and z reversed, and direction cosines saying so.
    flipped_paths = _case(tmp_path / "b", image[::-1, :, ::-1].copy(), mask[::-1, :, ::-1].copy(),
                          direction=FLIP_X_AND_Z, origin=(23 * 0.6, 0, 5 * 3.0))
    flipped, _ = prepare_case("b", *flipped_paths, input_size=20)
    assert flipped.geometry.orientation == "RPI"
    assert flipped.geometry.slice_volume_spacing(10) == pytest.approx((1.2, 1.44, 3.0))
    np.testing.assert_allclose(flipped.image, plain.image, atol=1e-5)
    np.testing.assert_array_equal(flipped.mask, plain.mask)


def test_predicted_mask_is_written_back_onto_the_original_grid(tmp_path):
    image, mask = phantom_case(seed=1)
    paths = _case(tmp_path, image, mask, direction=FLIP_X_AND_Z, origin=(5, 6, 7))
    same_size, _ = prepare_case("Case01", *paths, input_size=20)
    restored = same_size.geometry.to_image(same_size.mask)
    original = sitk.ReadImage(str(paths[1]))
    assert restored.GetSize() == original.GetSize() and restored.GetDirection() == original.GetDirection()
    assert restored.GetOrigin() == pytest.approx(original.GetOrigin())
    np.testing.assert_array_equal(sitk.GetArrayFromImage(restored), (mask > 0).astype(np.uint8))
    smaller, _ = prepare_case("Case01", *paths, input_size=12)
    assert sitk.GetArrayFromImage(smaller.geometry.to_image(smaller.mask)).shape == mask.shape
    with pytest.raises(ValueError, match="does not hold 6 axial slices"):
        smaller.geometry.to_image(smaller.mask[:3])


def test_affine_matches_what_nibabel_reads(tmp_path):
    image_path, mask_path = _case(tmp_path, direction=FLIP_X_AND_Z, origin=(5, 6, 7), spacing=(0.5, 0.7, 3.0))
    case, _ = prepare_case("Case01", image_path, mask_path, input_size=8)
    np.testing.assert_allclose(case.geometry.affine, nib.load(image_path).affine, atol=1e-5)


@pytest.mark.parametrize(
    ("mask_geometry", "expected"),
    [
        ({"spacing": (0.6, 0.6, 2.0)}, "mask spacing (0.6, 0.6, 2) differs from image spacing (0.6, 0.6, 3)"),
        ({"origin": (0, 0, 1.5)}, "mask origin (0, 0, 1.5) differs from image origin (0, 0, 0)"),
        ({"direction": FLIP_X_AND_Z}, "mask orientation (direction cosines) differs from the image's"),
    ],
)
def test_mask_off_the_image_grid_is_named(tmp_path, mask_geometry, expected):
    image, mask = phantom_case()
    image_path = write_volume(tmp_path / "c.nii.gz", image)
    mask_path = write_volume(tmp_path / "c_segmentation.nii.gz", mask, **mask_geometry)
    case, problems = prepare_case("c", image_path, mask_path, input_size=8)
    assert case is None and problems == [(mask_path, expected)]


def test_mask_of_another_shape_is_named(tmp_path):
    image, mask = phantom_case()
    assert geometry_mismatch(sitk.GetImageFromArray(image), sitk.GetImageFromArray(mask[:, :10])) == \
        "mask shape (24, 10, 6) differs from image shape (24, 20, 6)"


def test_mask_values_must_be_non_negative_integers():
    assert mask_value_problem(np.array([0, 1, 2, 255], dtype=np.uint8)) is None
    assert mask_value_problem(np.array([0.0, 1.0, 2.0], dtype=np.float32)) is None
    assert mask_value_problem(np.array([0.0, 0.5], dtype=np.float32)) == "mask has non-integer values (e.g. 0.5)"
    assert mask_value_problem(np.array([0, -1], dtype=np.int16)) == "mask has negative values (minimum -1)"
    assert mask_value_problem(np.array([0.0, np.nan])) == "mask has NaN or infinite values"


def test_bad_mask_values_are_reported_against_the_mask_file(tmp_path):
    _, mask = phantom_case()
    image_path, mask_path = _case(tmp_path, mask=mask.astype(np.float32) * 0.5)
    case, problems = prepare_case("Case01", image_path, mask_path, input_size=8)
    assert case is None and problems == [(mask_path, "mask has non-integer values (e.g. 0.5)")]


def test_truncated_corrupt_and_missing_volumes_are_unreadable(tmp_path):
    image, _ = phantom_case()
    gz = write_volume(tmp_path / "a.nii.gz", image)
    gz.write_bytes(gz.read_bytes()[: len(gz.read_bytes()) // 2])
    raw_nifti = write_volume(tmp_path / "b.nii", image)
    raw_nifti.write_bytes(raw_nifti.read_bytes()[:2000])
    metaimage = write_volume(tmp_path / "c.mhd", image)
    metaimage.with_suffix(".raw").write_bytes(b"short")
    garbage = tmp_path / "d.nii.gz"
    garbage.write_bytes(b"garbage")
    for path in (gz, raw_nifti, metaimage, garbage, tmp_path / "missing.mhd"):
        volume, problem = read_volume(path, "image")
        assert volume is None and problem.startswith("unreadable or corrupt image ("), path


def test_a_metaimage_without_its_voxel_file_names_that_file(tmp_path, capfd):
    image, _ = phantom_case()
    header = write_volume(tmp_path / "Case00.mhd", image)
    raw = header.with_suffix(".raw")
    assert f"ElementDataFile = {raw.name}" in header.read_text()
    raw.unlink()
    assert read_volume(header, "image") == (
        None, f"image data file {raw} is missing (the header Case00.mhd names it as ElementDataFile)")
    assert capfd.readouterr().err == ""  # ITK is not asked, so it prints nothing of its own
    single_file = write_volume(tmp_path / "Case01.mha", image)  # voxels in the header file itself
    assert read_volume(single_file, "image")[1] is None


def test_a_2d_image_is_not_a_volume(tmp_path):
    path = tmp_path / "flat.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8), np.float32)), str(path))
    assert read_volume(path, "image") == (None, "image has 2 dimensions, expected a 3-D volume")


def test_image_with_nan_is_rejected(tmp_path):
    image, _ = phantom_case()
    image[2, 3, 4] = np.nan
    image_path, mask_path = _case(tmp_path, image=image)
    case, problems = prepare_case("Case01", image_path, mask_path, input_size=8)
    assert case is None and problems == [(image_path, "image has NaN or infinite values")]


def test_preprocessing_clips_outliers_and_standardises():
    volume = np.random.default_rng(0).normal(50, 5, (4, 30, 30)).astype(np.float32)
    volume[0, 0, 0] = 1e6
    out = preprocess_volume(volume, 30)
    assert out.shape == (4, 30, 30) and out.max() < 5 and abs(out.mean()) < 1e-3 and abs(out.std() - 1) < 0.05
    assert resize_mask(np.pad(np.ones((2, 4, 4), bool), ((0, 0), (2, 2), (2, 2))), 4).tolist() == \
        [[[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]] * 2


def test_a_volume_stored_sideways_is_sliced_axially(tmp_path):
    sideways = (0, 0, 1, 0, 1, 0, -1, 0, 0)  # file x runs along world S, file z along world R
    paths = _case(tmp_path, spacing=(0.5, 0.7, 3.0), direction=sideways)
    case, _ = prepare_case("Case01", *paths, input_size=10)
    assert case.geometry.num_slices == 24 and case.image.shape == (24, 10, 10)
    assert case.geometry.slice_volume_spacing(10) == pytest.approx((1.4, 1.8, 0.5))
    restored = case.geometry.to_image(np.zeros((24, 10, 10), np.uint8))
    assert restored.GetSize() == (24, 20, 6) and restored.GetDirection() == pytest.approx(sideways)
