"""Prostate T2-weighted MRI phantoms: a pelvis with a deformable gland, sampled by a site's scanner.

Anatomy lives in world coordinates (RAS, millimetres), so a case looks the same whatever the scanner's
matrix, spacing, slice thickness or axis directions; the scanner only decides where its voxels sample it.
That keeps the written affines honest: the gland is where the affine says it is.

Tissues (relative T2 signal): fat bright, muscle and pelvic tissue dark-grey, bladder bright, rectum dark,
peripheral zone bright-ish, central gland darker and heterogeneous. A site's scanner sets the contrast of
the gland against its surroundings, a smooth multiplicative bias field, Rician noise and the stored
intensity range and type; for the realistic preset (medfl.synth.realistic) also the tissue signals, the
near-field brightening of an endorectal or surface coil, and (through `Population` and `site_anatomy`) the
site's gland sizes and the deformation an endorectal balloon causes. Their defaults change nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from skimage.filters import gaussian


@dataclass(frozen=True)
class Scanner:
    """One site's MRI acquisition and storage conventions."""

    matrix: int  # in-plane voxels per side
    slices: int
    spacing: float  # in-plane voxel size, mm
    thickness: float  # slice spacing, mm
    direction: tuple[tuple[float, ...], ...]  # 3x3 RAS direction cosines (columns = voxel axes)
    dtype: str  # "int16" or "float32"
    max_intensity: float  # stored value of the brightest tissue (about)
    contrast: float  # gland-versus-surroundings contrast multiplier
    bias: float  # strength of the multiplicative bias field
    noise: float  # Rician noise level relative to the brightest tissue
    labels: str  # "zones" (1 central gland, 2 peripheral zone), "binary" (1) or "255"
    fat: float = 0.85  # T2 signal of fat
    peripheral: float = 0.30  # peripheral-zone signal above the surrounding tissue, times `contrast`
    central: float = 0.10  # central-gland signal above the surrounding tissue, times `contrast`
    endorectal: float = 0.0  # near-field gain of an endorectal coil at its balloon's wall (0: no such coil)
    surface: float = 0.0  # brightening of the body wall by a phased-array surface coil
    float_levels: int = 0  # float32 data holding integers times a slope (e.g. 4095 levels); 0: full precision

    def zooms(self) -> tuple[float, float, float]:
        """Voxel size (mm) along the array axes (i, j, k)."""
        return (self.spacing, self.spacing, self.thickness)

    def shape(self) -> tuple[int, int, int]:
        """Array shape (i, j, k): in-plane, in-plane, slices."""
        return (self.matrix, self.matrix, self.slices)


def rotation_x(degrees: float) -> tuple[tuple[float, ...], ...]:
    """Direction cosines of axial slices tilted by `degrees` about the left-right axis (an oblique scan)."""
    a = np.deg2rad(degrees)
    return (
        (1.0, 0.0, 0.0),
        (0.0, float(np.cos(a)), float(-np.sin(a))),
        (0.0, float(np.sin(a)), float(np.cos(a))),
    )


LPS_AXES = ((-1.0, 0.0, 0.0), (0.0, -1.0, 0.0), (0.0, 0.0, 1.0))  # DICOM-style arrays seen in RAS
RAS_AXES = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))


def random_scanner(rng: np.random.Generator) -> Scanner:
    """Draw the scanner of an extra (non-reference) site."""
    matrix = int(rng.choice([48, 56, 64, 72, 80, 96]))
    thickness = float(rng.choice([1.5, 2.0, 2.5, 3.0, 3.6, 4.0, 4.5]))
    slices = int(np.clip(round(rng.uniform(60, 80) / thickness), 12, 32))
    if slices * thickness < 56:
        thickness = round(56 / slices + 0.25, 1)
    return Scanner(
        matrix=matrix,
        slices=slices,
        spacing=round(float(rng.uniform(120, 160)) / matrix, 3),
        thickness=thickness,
        direction=[LPS_AXES, RAS_AXES, rotation_x(float(rng.uniform(-10, 10)))][int(rng.integers(3))],
        dtype="float32" if rng.uniform() < 0.25 else "int16",
        max_intensity=float(rng.choice([1.0, 600, 1000, 2000, 4095])),
        contrast=float(rng.uniform(0.55, 1.25)),
        bias=float(rng.uniform(0.05, 0.4)),
        noise=float(rng.uniform(0.01, 0.05)),
        labels=str(rng.choice(["zones", "binary", "255"])),
    )


def affine(scanner: Scanner, centre: np.ndarray) -> np.ndarray:
    """4x4 voxel-to-world (RAS, mm) matrix whose volume centre lands on `centre`."""
    linear = np.asarray(scanner.direction, dtype=float) @ np.diag(scanner.zooms())
    middle = (np.asarray(scanner.shape(), dtype=float) - 1.0) / 2.0
    matrix = np.eye(4)
    matrix[:3, :3] = linear
    matrix[:3, 3] = np.asarray(centre, dtype=float) - linear @ middle
    return matrix


@dataclass(frozen=True)
class Anatomy:
    """One patient: the gland and its neighbours, in world millimetres."""

    gland_centre: np.ndarray
    gland_axes: np.ndarray  # semi-axes LR, AP, SI
    gland_tilt: float  # rotation about the SI axis, radians
    bumps: np.ndarray  # rows (nx, ny, nz, amplitude, width): smooth deformations of the surface
    taper: float  # apex narrowing
    central_scale: float  # central gland size relative to the gland
    body_axes: np.ndarray  # semi-axes LR, AP of the pelvis
    bladder_radius: float
    seed: int
    rectum_radius: float = 11.0  # an endorectal coil's balloon widens it


@dataclass(frozen=True)
class Population:
    """A site's patients: how large their glands are. The defaults are sample_anatomy's adult ranges alone."""

    gland_scale: float = 1.0  # median linear size factor of the gland
    gland_spread: float = 0.0  # sd of the per-patient log size factor, on top of sample_anatomy's own spread
    central_extra: float = 0.0  # added to the central gland's relative size (BPH enlarges the transition zone)


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw one patient; gland size, shape and position vary within adult ranges."""
    directions = rng.normal(size=(5, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    bumps = np.column_stack([directions, rng.uniform(-0.18, 0.18, 5), rng.uniform(0.2, 0.6, 5)])
    posterior = np.array([[0.0, -1.0, 0.0, -rng.uniform(0.05, 0.2), 0.3]])  # flattened by the rectum
    return Anatomy(
        gland_centre=np.array([rng.normal(0, 4), rng.normal(-4, 4), rng.normal(0, 4)]),
        gland_axes=np.array([rng.uniform(17, 27), rng.uniform(12, 20), rng.uniform(14, 22)]),
        gland_tilt=float(rng.normal(0, 0.15)),
        bumps=np.vstack([bumps, posterior]),
        taper=float(rng.uniform(0.1, 0.4)),
        central_scale=float(rng.uniform(0.55, 0.75)),
        body_axes=np.array([rng.uniform(70, 95), rng.uniform(60, 80)]),
        bladder_radius=float(rng.uniform(18, 32)),
        seed=int(rng.integers(2**31)),
    )


def site_anatomy(
    anatomy: Anatomy, population: Population, endorectal: bool, rng: np.random.Generator
) -> Anatomy:
    """A patient of a site: the population's gland size and, under an endorectal coil, the balloon's imprint.

    The balloon (radius 15-19 mm instead of the rectum's 11) pushes the gland forward, compresses it front to
    back by 12-25% (widening it, volume roughly kept) and flattens its posterior surface.
    """
    if population == Population() and not endorectal:
        return anatomy
    axes = anatomy.gland_axes * population.gland_scale * np.exp(rng.normal(0.0, population.gland_spread))
    central = float(np.clip(anatomy.central_scale + population.central_extra, 0.4, 0.9))
    centre, bumps, rectum = anatomy.gland_centre, anatomy.bumps, anatomy.rectum_radius
    if endorectal:
        squash = rng.uniform(0.75, 0.88)
        axes = axes * np.array([squash**-0.6, squash, squash**-0.4])
        rectum = float(rng.uniform(15.0, 19.0))
        centre = centre + np.array([0.0, 0.7 * (rectum - anatomy.rectum_radius), 0.0])
        bumps = bumps.copy()
        bumps[-1, 3:] = (-rng.uniform(0.25, 0.35), 0.45)  # the posterior flattening, broader and deeper
    return replace(anatomy, gland_centre=centre, gland_axes=axes, central_scale=central, bumps=bumps,
                   rectum_radius=rectum)


def _gland_distance(anatomy: Anatomy, world: np.ndarray) -> np.ndarray:
    """Normalised radius of every point (1 on the gland surface, < 1 inside)."""
    offset = world - anatomy.gland_centre
    c, s = np.cos(anatomy.gland_tilt), np.sin(anatomy.gland_tilt)
    x = c * offset[..., 0] + s * offset[..., 1]
    y = -s * offset[..., 0] + c * offset[..., 1]
    z = offset[..., 2] / anatomy.gland_axes[2]
    apex = 1.0 - anatomy.taper * np.clip(-z, 0, 1)  # narrower towards the apex (inferior)
    q = np.stack([x / (anatomy.gland_axes[0] * apex), y / (anatomy.gland_axes[1] * apex), z], axis=-1)
    rho = np.linalg.norm(q, axis=-1)
    unit = q / np.maximum(rho, 1e-6)[..., None]
    surface = np.ones_like(rho)
    for nx, ny, nz, amplitude, width in anatomy.bumps:
        surface += amplitude * np.exp(-(1.0 - unit @ np.array([nx, ny, nz])) / width)
    return rho / np.maximum(surface, 0.4)


def _soft(inside: np.ndarray, width: float) -> np.ndarray:
    """Partial-volume membership from a signed "inside" measure (> 0 inside) and an edge width."""
    return 1.0 / (1.0 + np.exp(-np.clip(inside / width, -30, 30)))


def render_case(
    anatomy: Anatomy, scanner: Scanner, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample one case with `scanner`; return (image, mask, affine) with arrays in (i, j, k) order."""
    centre = np.array([0.0, -6.0, 0.0]) + rng.normal(0, 3, 3)
    matrix = affine(scanner, centre)
    ijk = np.moveaxis(np.indices(scanner.shape(), dtype=np.float32), 0, -1)
    linear, offset = matrix[:3, :3].astype(np.float32), matrix[:3, 3].astype(np.float32)
    world = np.einsum("...j,ij->...i", ijk, linear) + offset
    x, y = world[..., 0], world[..., 1]
    edge = max(scanner.spacing, scanner.thickness) / 2

    body_r = np.hypot(x / anatomy.body_axes[0], (y + 10) / anatomy.body_axes[1])
    body = _soft((1.0 - body_r) * 60, edge)
    muscle = _soft((0.78 - body_r) * 60, edge)  # inside the subcutaneous fat layer
    gc = anatomy.gland_centre
    rectum_r = anatomy.rectum_radius
    rectum_y = gc[1] - anatomy.gland_axes[1] - rectum_r
    rectum = _soft(rectum_r - np.hypot((x - gc[0]) / 1.3, y - rectum_y), edge)
    bladder_c = gc + np.array([0.0, 6.0, anatomy.gland_axes[2] + anatomy.bladder_radius * 0.8])
    bladder = _soft(anatomy.bladder_radius - np.sqrt(((world - bladder_c) ** 2).sum(-1)), edge)
    near = ((world - gc) ** 2).sum(-1) < (2.0 * anatomy.gland_axes.max()) ** 2  # the gland lies well inside
    gland_rho = np.full(near.shape, 10.0)
    gland_rho[near] = _gland_distance(anatomy, world[near])
    gland = _soft((1.0 - gland_rho) * anatomy.gland_axes[1], edge)
    inner = replace(
        anatomy,
        gland_centre=gc + np.array([0.0, 0.25 * anatomy.gland_axes[1], 2.0]),
        gland_axes=anatomy.gland_axes * anatomy.central_scale,
    )
    central_rho = np.full(near.shape, 10.0)
    central_rho[near] = _gland_distance(inner, world[near])
    central = _soft((1.0 - central_rho) * anatomy.gland_axes[1] * anatomy.central_scale, edge) * gland

    tissue_rng = np.random.default_rng(anatomy.seed)
    voxel_mm = np.array(scanner.zooms())
    coarse = _texture(tissue_rng, scanner.shape(), 6.0 / voxel_mm)
    fine = _texture(tissue_rng, scanner.shape(), 2.0 / voxel_mm)
    surrounding = 0.32 + 0.04 * coarse
    peripheral = surrounding + scanner.contrast * (scanner.peripheral + 0.03 * fine)
    central_gland = surrounding + scanner.contrast * (scanner.central + 0.07 * fine)
    signal = scanner.fat * body  # fat
    signal = signal * (1 - muscle) + surrounding * muscle
    signal = signal * (1 - bladder * muscle) + 0.95 * bladder * muscle
    rectum_signal = 0.03 if scanner.endorectal else 0.12  # an air-filled balloon gives no signal
    signal = signal * (1 - rectum * muscle) + rectum_signal * rectum * muscle
    signal = signal * (1 - gland) + peripheral * gland
    signal = signal * (1 - central) + central_gland * central
    if scanner.endorectal or scanner.surface:
        signal = signal * _coil_gain(scanner, body_r, np.hypot(x - gc[0], y - rectum_y), world[..., 2] - gc[2],
                                     rectum_r)

    signal = signal * _bias_field((world - centre) / 80.0, scanner.bias, rng)
    noise = rng.normal(0, scanner.noise, (2, *signal.shape))
    signal = np.hypot(signal + noise[0], noise[1])  # Rician magnitude

    stored = signal * scanner.max_intensity * rng.uniform(0.85, 1.15)
    if scanner.dtype == "int16":
        image = np.clip(np.round(stored), 0, np.iinfo(np.int16).max).astype(np.int16)
    elif scanner.float_levels:
        step = scanner.max_intensity / scanner.float_levels
        image = (np.round(stored / step) * step).astype(np.float32)
    else:
        image = stored.astype(np.float32)
    mask = _labels(gland_rho < 1.0, central_rho < 1.0, scanner.labels)
    return image, mask, matrix


def _coil_gain(scanner: Scanner, body_r: np.ndarray, coil_distance: np.ndarray, along: np.ndarray,
               balloon: float) -> np.ndarray:
    """Receive-coil sensitivity: an endorectal coil's near field falls off as 1/r^2 from the balloon's wall
    (and beyond the coil's 5 cm length); a surface array brightens the body wall."""
    gain = np.ones_like(body_r)
    if scanner.endorectal:
        reach = np.exp(-np.clip(np.abs(along) - 25.0, 0.0, None) / 15.0)
        gain = gain + scanner.endorectal * (balloon / np.maximum(coil_distance, balloon)) ** 2 * reach
    if scanner.surface:
        gain = gain + scanner.surface * np.clip(body_r, 0.0, 1.2) ** 4
    return gain


def _texture(rng: np.random.Generator, shape: tuple[int, ...], sigma: np.ndarray) -> np.ndarray:
    """Unit-variance smooth noise whose correlation length is `sigma` voxels per axis."""
    field = gaussian(rng.standard_normal(shape), sigma=tuple(np.maximum(sigma, 0.3)))
    return field / (field.std() + 1e-8)


def _bias_field(unit: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth multiplicative field: exp of a random quadratic polynomial of the (roughly unit) coordinates."""
    linear, cross, quadratic = rng.normal(0, 1, 3), rng.normal(0, 1), rng.normal(0, 1, 3)
    polynomial = unit @ linear + cross * unit[..., 0] * unit[..., 1] + (unit**2) @ quadratic
    return np.exp(strength * polynomial)


def _labels(gland: np.ndarray, central: np.ndarray, convention: str) -> np.ndarray:
    """Integer mask in a site's label convention."""
    if convention == "zones":
        return np.where(gland, np.where(central, 1, 2), 0).astype(np.uint8)
    value = 255 if convention == "255" else 1
    return (gland * value).astype(np.uint8)
