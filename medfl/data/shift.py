"""Site shift: what each sample of a site looks like, and how far each site sits from the pooled sites.

Per-sample statistics are measured on what the site's reader already holds, so nothing is decoded twice:
a dermoscopy image's pixels as `medfl check` decodes them (JPEGs at PIL's reduced draft scale, close to
the size a model sees), and a prostate case as medfl prepares it (clipped to its 0.5-99.5 percentiles,
z-scored over the volume, slices resized to the input size), plus the case's grid and raw intensity scale.

Dermoscopy: the colour of every image (each channel's mean and SD), and two statistics of its content on a
common 32 x 32 grid, which colour cannot see: how much of the image's variation is fine detail (sharpness,
effective resolution, noise: a blurred or low-resolution camera has little, a noisy one much) and how much of
the field of view the lesion covers (the dermatoscope's magnification). See `texture_statistics`.

Distance of a site from the pooled sites, per compared statistic k:
    |site mean_k - pooled mean_k| / pooled within-site SD_k,
where the pooled mean is over every sample of every site and the pooled within-site SD is
sqrt(sum over sites and their samples of (x - site mean)^2 / (samples - sites)), the typical spread of a
site's own samples. 0 means the site looks like the others on average; 1 means its average is one typical
within-site spread away. A site's shift is the root mean square over the compared statistics. Geometry and
raw intensities are shown, not compared: sites often keep them constant (no within-site spread to divide
by), and normalisation removes the raw scale.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

NOISE_MAD_SCALE = 0.6745  # median |N(0, 1)|: turns a median absolute value into a standard deviation
ROUNDING = 1e-9  # relative differences below this are floating-point rounding, not shift
_VALUES = np.arange(256, dtype=np.float64)  # the 8-bit pixel values a histogram counts
GRID = 32  # the common grid of the dermoscopy content statistics (JPEGs decode at 32-64 px in draft mode)
LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601 grey from RGB
DETAIL_FREQUENCY = 0.25  # cycles per pixel above which the spectrum counts as fine detail (Nyquist: 0.5)
_CENTRE = slice(6, 26)  # the central 20 x 20 pixels of the grid: inside any dermatoscope's ring
_HANN = np.outer(np.hanning(22)[1:-1], np.hanning(22)[1:-1])  # tapers the crop's edges, which are not detail
_RADIUS = np.hypot(*np.meshgrid(np.fft.fftfreq(20), np.fft.fftfreq(20), indexing="ij"))
_GRID_COORDS = (np.arange(GRID) + 0.5) / GRID - 0.5
_ROWS, _COLUMNS = np.meshgrid(_GRID_COORDS, _GRID_COORDS, indexing="ij")
_DISC = np.hypot(_ROWS, _COLUMNS) <= 0.45  # the field of view inside a contact dermatoscope's ring
_RAMP = np.stack([np.ones(int(_DISC.sum())), _COLUMNS[_DISC], _ROWS[_DISC]], axis=1)
_RAMP_FIT = np.linalg.pinv(_RAMP)  # least squares of a linear illumination ramp over the disc, solved once
_BINS = 256  # Otsu's histogram, as scikit-image's threshold_otsu makes it


@dataclass(frozen=True)
class StatisticSet:
    """Names of one modality's per-sample statistics: `compared` enter the distance, `shown` do not."""

    title: str
    compared: tuple[str, ...]
    shown: tuple[str, ...]
    legend: str

    @property
    def names(self) -> tuple[str, ...]:
        return self.compared + self.shown


DERMOSCOPY = StatisticSet(
    "colour and content per image",
    ("R mean", "G mean", "B mean", "R SD", "G SD", "B SD", "detail %", "lesion %"),
    ("width px", "height px"),
    "mean and SD of each RGB channel's pixel values (0-255) of an image, JPEGs at the reduced scale check "
    "decodes them; on the image resized to 32 x 32: detail %, the share of the central 20 x 20 pixels' "
    "variation above a quarter cycle per pixel (fine detail: sharpness, resolution and noise), and lesion %, "
    "the share of the central disc darker than Otsu's threshold once the illumination ramp is removed (the "
    "lesion's size in the frame); width and height of the image file",
)
PROSTATE = StatisticSet(
    "intensity per case",
    ("prostate z", "prostate SD", "noise SD", "skewness", "prostate %"),
    ("raw p99.5", "in-plane mm", "slice mm", "FOV mm", "matrix", "slices"),
    "on the slices as medfl prepares them (clipped to the 0.5-99.5 percentiles, z-scored per volume, resized "
    "to the input size): mean and SD of the gland's intensities, noise SD (median absolute 2x2 Haar detail "
    "/ 0.6745), skewness of all intensities, the gland's share of the slices that show it; raw p99.5: the "
    "raw 99.5th percentile (raw scale, before normalisation); in-plane spacing, slice thickness, larger "
    "in-plane field of view and matrix, slices",
)


@dataclass
class SampleStatistics:
    """Per-sample statistics of one site: values[i, k] is statistic `kind.names[k]` of sample i."""

    kind: StatisticSet
    values: np.ndarray

    @classmethod
    def from_rows(cls, kind: StatisticSet, rows: Sequence[np.ndarray]) -> SampleStatistics:
        values = np.asarray(rows, dtype=np.float64).reshape(len(rows), len(kind.names))
        return cls(kind, values)

    @property
    def compared(self) -> np.ndarray:
        return self.values[:, : len(self.kind.compared)]

    @property
    def shown(self) -> np.ndarray:
        return self.values[:, len(self.kind.compared) :]


def colour_statistics(histogram: np.ndarray, width: int, height: int) -> np.ndarray:
    """Per-channel mean and SD (0-255) of an RGB image, then the file's width and height.

    `histogram`: (3, 256) pixel counts per channel and value, as PIL's `Image.histogram()` gives them (a
    fifth of the time numpy needs on the pixels themselves)."""
    counts = np.asarray(histogram, dtype=np.float64).reshape(3, 256)
    number = counts.sum(axis=1)
    mean = counts @ _VALUES / number
    sd = np.sqrt(np.maximum(counts @ _VALUES**2 / number - mean**2, 0.0))
    return np.concatenate([mean, sd, [width, height]])


def texture_statistics(pixels: np.ndarray) -> np.ndarray:
    """Detail % and lesion % of an RGB image resized to GRID x GRID ((GRID, GRID, 3) values 0-255).

    Detail %: the share of the spectral energy of the central 20 x 20 grey pixels (Hann-tapered, mean removed)
    above `DETAIL_FREQUENCY`. A blurred or low-resolution camera leaves little fine detail, sensor noise adds
    some; brightness and contrast cancel in the share. NaN for a flat image.
    Lesion %: the share of the central disc (radius 0.45 of the side) darker than Otsu's threshold of its log
    grey values, once a fitted linear illumination ramp is removed (a lamp's gradient is not a lesion)."""
    from skimage.filters import threshold_otsu  # start-up: scikit-image loads only once images are measured

    grey = np.asarray(pixels, dtype=np.float64).reshape(GRID, GRID, 3) @ LUMA
    centre = grey[_CENTRE, _CENTRE]
    power = np.abs(np.fft.fft2((centre - centre.mean()) * _HANN)) ** 2
    total = power[_RADIUS > 0].sum()
    detail = 100.0 * power[_RADIUS > DETAIL_FREQUENCY].sum() / total if np.ptp(centre) > 0 else float("nan")
    logs = np.log(np.maximum(grey[_DISC], 1.0))
    flat = logs - _RAMP[:, 1:] @ (_RAMP_FIT @ logs)[1:]
    low, span = flat.min(), np.ptp(flat)
    if span <= 1e-6:
        return np.array([detail, 0.0])
    counts = np.bincount(np.minimum((flat - low) * (_BINS / span), _BINS - 1).astype(np.intp), minlength=_BINS)
    threshold = threshold_otsu(hist=(counts, low + (np.arange(_BINS) + 0.5) * (span / _BINS)))
    return np.array([detail, 100.0 * float(np.mean(flat < threshold))])


def dermoscopy_statistics(histogram: np.ndarray, pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """An image's statistics in `DERMOSCOPY`'s order: colour (`colour_statistics`, from the decoded image's
    histogram), content (`texture_statistics`, from its pixels resized to GRID x GRID), the file's size."""
    colour = colour_statistics(histogram, width, height)
    return np.concatenate([colour[:6], texture_statistics(pixels), colour[6:]])


def noise_sd(slices: np.ndarray) -> float:
    """Noise standard deviation of (Z, H, W) slices: median absolute Haar diagonal detail / 0.6745.

    The diagonal detail (a - b - c + d) / 2 of each 2 x 2 block cancels smooth anatomy and keeps white noise
    at its own standard deviation; the median ignores the few blocks on edges (Donoho's estimator)."""
    depth, height, width = slices.shape
    blocks = slices[:, : height - height % 2, : width - width % 2].astype(np.float64)
    detail = (blocks[:, 0::2, 0::2] - blocks[:, 0::2, 1::2] - blocks[:, 1::2, 0::2] + blocks[:, 1::2, 1::2]) / 2
    return float(np.median(np.abs(detail)) / NOISE_MAD_SCALE) if detail.size else float("nan")


def skewness(values: np.ndarray) -> float:
    """Sample skewness m3 / m2^1.5 (0 for a symmetric distribution, NaN for a constant one)."""
    centred = np.asarray(values, dtype=np.float64).ravel()
    centred = centred - centred.mean()
    squared = centred * centred
    m2 = squared.mean()
    return float(np.dot(squared, centred) / centred.size / m2**1.5) if m2 > 0 else float("nan")


def intensity_statistics(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A prepared case's compared statistics: (Z, H, W) normalised intensities and {0, 1} mask.

    Prostate z and SD: mean and SD of the intensities inside the gland; noise SD over all slices;
    skewness of all intensities; prostate %: the gland's share of the pixels of the slices that show it.
    Statistics of the gland are NaN for a case without prostate."""
    image = np.asarray(image, dtype=np.float64)
    inside = mask > 0
    gland = image[inside]
    shown = inside.reshape(inside.shape[0], -1).any(axis=1)
    share = 100.0 * inside.sum() / inside[shown].size if shown.any() else float("nan")
    mean, spread = (float(gland.mean()), float(gland.std())) if gland.size else (float("nan"), float("nan"))
    return np.array([mean, spread, noise_sd(image), skewness(image), share])


def grid_statistics(size: Sequence[int], spacing: Sequence[float], direction: Sequence[float],
                    raw_high: float) -> np.ndarray:
    """A case's shown statistics: raw 99.5th percentile, mean in-plane spacing (mm), slice thickness (mm),
    the larger in-plane field of view (mm) and matrix, number of slices.

    size, spacing and the row-major 3 x 3 direction cosines are the file's, in SimpleITK's (x, y, z) order;
    the slice axis is the file axis closest to the patient's inferior-superior axis."""
    axes = np.abs(np.asarray(direction, dtype=np.float64).reshape(3, 3))
    axial = int(np.argmax(axes[2]))
    plane = [axis for axis in range(3) if axis != axial]
    sizes, spacings = np.asarray(size, dtype=np.float64), np.asarray(spacing, dtype=np.float64)
    return np.array([raw_high, spacings[plane].mean(), spacings[axial], (sizes * spacings)[plane].max(),
                     sizes[plane].max(), sizes[axial]])


@dataclass(frozen=True)
class SiteShift:
    """Distances of sites from their pooled samples, per compared statistic (see the module docstring)."""

    sites: tuple[str, ...]
    site_means: np.ndarray  # (sites, statistics)
    pooled_mean: np.ndarray  # (statistics,)
    within_sd: np.ndarray  # (statistics,)
    distances: np.ndarray  # (sites, statistics)

    @property
    def shift(self) -> np.ndarray:
        """Root mean square of each site's distances over the statistics that have one (NaN when none)."""
        squares = self.distances**2
        counted = ~np.isnan(squares)
        number = counted.sum(axis=1)
        total = np.where(counted, squares, 0.0).sum(axis=1)
        return np.where(number > 0, np.sqrt(total / np.maximum(number, 1)), np.nan)

    @property
    def mean_shift(self) -> float:
        """The federation's one figure: the mean of the sites' shifts (NaN when none could be measured)."""
        measured = self.shift[~np.isnan(self.shift)]
        return float(measured.mean()) if measured.size else float("nan")


def site_shift(samples: Mapping[str, np.ndarray]) -> SiteShift:
    """Distance of each site's mean from the pooled mean, in pooled within-site SDs, per statistic.

    samples[site] is (samples, statistics); NaN values are left out. A statistic that no site varies gets
    distance 0 where the site matches the pooled mean and infinity where it does not; one without enough
    samples for a within-site spread (no site with two values) gets NaN."""
    if not samples:
        raise ValueError("site_shift needs at least one site")
    sites = tuple(samples)
    arrays = [np.asarray(samples[site], dtype=np.float64) for site in sites]
    stacked = np.concatenate(arrays, axis=0)
    site_means = np.stack([_nanmean(a) for a in arrays])
    pooled_mean = _nanmean(stacked)
    squares = np.sum([np.nansum((a - m) ** 2, axis=0) for a, m in zip(arrays, site_means, strict=True)], axis=0)
    freedom = np.sum(~np.isnan(stacked), axis=0) - np.sum(~np.isnan(site_means), axis=0)
    within_sd = np.where(freedom > 0, np.sqrt(squares / np.maximum(freedom, 1)), np.nan)
    within_sd[within_sd <= ROUNDING * np.abs(pooled_mean)] = 0.0  # constant values, up to rounding
    gap = np.abs(site_means - pooled_mean)
    matches = gap <= ROUNDING * (np.abs(site_means) + np.abs(pooled_mean))
    spread = np.where(within_sd > 0, within_sd, 1.0)
    distances = np.where(within_sd > 0, gap / spread, np.where(matches, 0.0, np.inf))
    distances[np.isnan(gap) | np.isnan(within_sd)] = np.nan
    return SiteShift(sites, site_means, pooled_mean, within_sd, distances)



def describe(values: np.ndarray) -> np.ndarray:
    """(samples, statistics) -> (4, statistics): mean, SD, minimum and maximum, ignoring NaN (NaN if none)."""
    values = np.asarray(values, dtype=np.float64)
    mean = _nanmean(values)
    present = ~np.isnan(values)
    count = present.sum(axis=0)
    squares = np.where(present, (values - mean) ** 2, 0.0).sum(axis=0)
    sd = np.where(count > 0, np.sqrt(squares / np.maximum(count, 1)), np.nan)
    low = np.where(count > 0, np.where(present, values, np.inf).min(axis=0, initial=np.inf), np.nan)
    high = np.where(count > 0, np.where(present, values, -np.inf).max(axis=0, initial=-np.inf), np.nan)
    return np.stack([mean, sd, low, high])


def _nanmean(values: np.ndarray) -> np.ndarray:
    """Column means ignoring NaN, NaN for an all-NaN column (without numpy's warning)."""
    present = ~np.isnan(values)
    count = present.sum(axis=0)
    total = np.where(present, values, 0.0).sum(axis=0)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)
