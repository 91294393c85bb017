"""Site shift statistics (medfl.data.shift) on hand-made arrays, and where the readers measure them."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import phantom_case, write_volume
from PIL import Image

from medfl.data.images import check_image, inspect_image
from medfl.data.shift import (
    DERMOSCOPY,
    GRID,
    PROSTATE,
    SampleStatistics,
    colour_statistics,
    dermoscopy_statistics,
    describe,
    grid_statistics,
    intensity_statistics,
    noise_sd,
    site_shift,
    skewness,
)
from medfl.data.volumes import prepare_case


def _histogram(pixels: np.ndarray) -> np.ndarray:
    """(3, 256) counts per channel and value of (H, W, 3) pixels, as PIL's Image.histogram() gives them."""
    flat = np.asarray(pixels, dtype=np.uint8).reshape(-1, 3)
    return np.stack([np.bincount(flat[:, channel], minlength=256) for channel in range(3)])


def _images(seed: int, count: int = 40, gain: float = 1.0) -> np.ndarray:
    """Per-image colour statistics of `count` skin-like images whose brightness varies from image to image."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(count):
        level = rng.uniform(90, 130)
        pixels = np.clip(rng.normal(level, 15, (24, 24, 3)) * (1.0, 0.8, 0.7), 0, 255)
        pixels = np.clip(pixels * gain, 0, 255).astype(np.uint8)
        grid = np.asarray(Image.fromarray(pixels).resize((GRID, GRID), Image.BOX))
        rows.append(dermoscopy_statistics(_histogram(pixels), grid, 24, 24))
    return SampleStatistics.from_rows(DERMOSCOPY, rows).compared


def test_identical_sites_are_at_zero():
    shift = site_shift({"a": _images(0), "b": _images(0), "c": _images(0)})
    np.testing.assert_allclose(shift.distances, 0.0, atol=1e-9)
    np.testing.assert_allclose(shift.shift, 0.0, atol=1e-9)


def test_a_site_with_brighter_images_is_measurably_far():
    same = site_shift({"a": _images(0), "b": _images(1)})
    brighter = site_shift({"a": _images(0), "b": _images(1, gain=1.3)})
    assert same.shift.max() < 0.5
    assert brighter.shift.min() > 2.0
    means = list(DERMOSCOPY.compared).index("R mean")
    assert brighter.distances[1, means] > 4 * same.distances[1, means]
    np.testing.assert_allclose(brighter.site_means[1, :3] / brighter.site_means[0, :3], 1.3, rtol=0.05)


def test_distance_is_the_gap_to_the_pooled_mean_in_pooled_within_site_sds():
    shift = site_shift({"small": np.array([[1.0], [3.0]]), "large": np.array([[4.0], [6.0], [4.0], [6.0]])})
    pooled = (2 * 2.0 + 4 * 5.0) / 6  # over every sample: the larger site counts more
    within = np.sqrt((1 + 1 + 4 * 1) / (6 - 2))
    np.testing.assert_allclose(shift.pooled_mean, [pooled])
    np.testing.assert_allclose(shift.within_sd, [within])
    np.testing.assert_allclose(shift.distances[:, 0], [(pooled - 2.0) / within, (5.0 - pooled) / within])


def test_the_site_shift_is_the_root_mean_square_over_statistics():
    shift = site_shift({"a": np.array([[0.0, 0.0], [2.0, 2.0]]), "b": np.array([[2.0, 0.0], [4.0, 2.0]])})
    np.testing.assert_allclose(shift.distances, [[1 / np.sqrt(2), 0.0], [1 / np.sqrt(2), 0.0]])
    np.testing.assert_allclose(shift.shift, [0.5, 0.5])


def test_no_within_site_spread_and_missing_values():
    constant = np.full((3, 1), 0.1)
    assert site_shift({"a": constant, "b": constant}).distances.tolist() == [[0.0], [0.0]]
    assert np.isinf(site_shift({"a": constant, "b": constant + 1}).distances).all()
    single = site_shift({"a": np.array([[1.0]]), "b": np.array([[2.0]])})
    assert np.isnan(single.distances).all() and np.isnan(single.shift).all()
    with_gap = site_shift({"a": np.array([[1.0, np.nan], [3.0, 5.0], [5.0, 7.0]]), "b": np.array([[3.0, 6.0]] * 2)})
    np.testing.assert_allclose(with_gap.site_means[0], [3.0, 6.0])
    np.testing.assert_allclose(with_gap.distances, 0.0)
    with pytest.raises(ValueError):
        site_shift({})


def test_describe_ignores_missing_values():
    summary = describe(np.array([[1.0, np.nan], [3.0, np.nan], [np.nan, np.nan]]))
    np.testing.assert_allclose(summary[:, 0], [2.0, 1.0, 1.0, 3.0])
    assert np.isnan(summary[:, 1]).all()


def test_colour_statistics_of_a_known_image():
    pixels = np.zeros((4, 6, 3), dtype=np.uint8)
    pixels[..., 0] = 200
    pixels[:2, :, 1] = 100  # green: half 100, half 0
    np.testing.assert_allclose(colour_statistics(_histogram(pixels), 600, 400), [200, 50, 0, 0, 50, 0, 600, 400])


def test_noise_sd_finds_white_noise_and_ignores_smooth_anatomy():
    rows, columns = np.mgrid[0:64, 0:64]
    ramp = np.stack([0.05 * rows + 0.03 * columns + z for z in range(4)]).astype(np.float64)
    assert noise_sd(ramp) == pytest.approx(0.0, abs=1e-12)
    noisy = ramp + np.random.default_rng(0).normal(0, 0.2, ramp.shape)
    assert noise_sd(noisy) == pytest.approx(0.2, rel=0.1)


def test_skewness_of_symmetric_and_skewed_samples():
    rng = np.random.default_rng(0)
    assert skewness(rng.normal(size=100_000)) == pytest.approx(0.0, abs=0.05)
    assert skewness(rng.exponential(size=100_000)) == pytest.approx(2.0, rel=0.1)
    assert np.isnan(skewness(np.ones(5)))


def test_intensity_statistics_of_a_hand_made_case():
    image = np.zeros((3, 8, 8))
    mask = np.zeros((3, 8, 8), dtype=np.uint8)
    mask[1, 2:4, 2:6] = 1  # 8 of the 64 pixels of the one slice that shows the gland
    image[1, 2:4, 2:4], image[1, 2:4, 4:6] = 1.0, 3.0
    gland_mean, gland_sd, _, _, share = intensity_statistics(image, mask)
    assert (gland_mean, gland_sd, share) == (2.0, 1.0, 12.5)
    assert np.isnan(intensity_statistics(image, np.zeros_like(mask))[[0, 1, 4]]).all()


def test_grid_statistics_find_the_slice_axis_from_the_direction_cosines():
    axial = grid_statistics((320, 256, 20), (0.5, 0.6, 3.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), 812.0)
    np.testing.assert_allclose(axial, [812.0, 0.55, 3.0, 160.0, 320, 20])
    slices_along_x = grid_statistics((20, 256, 320), (3.0, 0.6, 0.5), (0, 0, 1, 0, 1, 0, 1, 0, 0), 812.0)
    np.testing.assert_allclose(slices_along_x, axial)


def test_inspect_image_measures_the_pixels_check_decodes(tmp_path):
    path = tmp_path / "red.png"
    Image.new("RGB", (30, 20), (200, 10, 0)).save(path)
    verdict, statistics = inspect_image(path)
    assert verdict is None and check_image(path) is None
    np.testing.assert_allclose(statistics, [200, 10, 0, 0, 0, 0, np.nan, 0, 30, 20])  # a flat image: no detail
    grey = tmp_path / "grey.png"
    Image.new("L", (8, 8)).save(grey)
    assert inspect_image(grey) == ("image mode is L, expected RGB colour", None)


def test_prepared_cases_keep_the_raw_scale_that_normalisation_removes(tmp_path):
    image, mask = phantom_case()
    cases = []
    for name, gain in (("plain", 1.0), ("scaled", 1.3)):
        paths = (write_volume(tmp_path / f"{name}.nii.gz", image * gain),
                 write_volume(tmp_path / f"{name}_seg.nii.gz", mask))
        cases.append(prepare_case(name, *paths, input_size=16)[0])
    plain, scaled = cases
    assert scaled.raw_range[1] == pytest.approx(1.3 * plain.raw_range[1], rel=1e-5)
    np.testing.assert_allclose(intensity_statistics(scaled.image, scaled.mask),
                               intensity_statistics(plain.image, plain.mask), atol=1e-5)
    grid = plain.geometry
    assert len(PROSTATE.names) == 5 + len(grid_statistics(grid.size, grid.spacing, grid.direction, 1.0))


def test_grid_statistics_agree_with_the_reoriented_volume(tmp_path):
    image, mask = phantom_case(depth=6, height=20, width=24)
    direction = (0, 0, 1, 1, 0, 0, 0, 1, 0)  # file axes x, y, z run along world y, z and x: slices along file y
    paths = [write_volume(tmp_path / name, np.ascontiguousarray(array.transpose(1, 2, 0)), direction=direction)
             for name, array in (("a.nii.gz", image), ("a_seg.nii.gz", mask))]
    case = prepare_case("a", *paths, input_size=8)[0]
    grid = case.geometry
    statistics = grid_statistics(grid.size, grid.spacing, grid.direction, 1.0)
    assert statistics[5] == grid.num_slices == case.image.shape[0] == 24  # file y: 24 voxels
    assert statistics[1:3] == pytest.approx([(0.6 + 3.0) / 2, 0.6])
