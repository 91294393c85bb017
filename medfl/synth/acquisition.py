"""Per-site dermoscopy acquisition: what one hospital's camera and habits do to every image.

Colour cast, illumination gradient, blur, noise, hair, vignetting (up to the black ring of a contact
dermoscope), resolution and JPEG quality; for the realistic preset (medfl.synth.realistic) also the camera's
tone curve (contrast about mid-grey, per-channel black-level offsets), per-image white-balance jitter and
the dermatoscope's magnification. These differ between sites and not between classes, so they are the
domain shift that federated learning has to cope with. Their defaults change nothing: the mild preset's
images stay as they were.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.draw import bezier_curve
from skimage.filters import gaussian


@dataclass(frozen=True)
class Acquisition:
    """One site's imaging settings."""

    resolution: int  # square image side in pixels
    cast: tuple[float, float, float]  # per-channel gains
    gradient: float  # strength of a linear illumination ramp
    blur: float  # gaussian sigma, as a fraction of the image side
    noise: float  # gaussian noise standard deviation
    hair: float  # probability that an image has hair
    vignette: float  # radial darkening at the corners
    ring: bool  # black circular field of view of a contact dermoscope
    jpeg_quality: int
    contrast: float = 1.0  # slope of the camera's tone curve about mid-grey
    offset: tuple[float, float, float] = (0.0, 0.0, 0.0)  # per-channel black level added after the tone curve
    cast_jitter: float = 0.0  # sd of per-image, per-channel log gains (auto white balance, mixed cameras)
    magnification: float = 1.0  # lesion size in the frame relative to a standard field of view


def random_acquisition(rng: np.random.Generator) -> Acquisition:
    """Draw the acquisition of an extra (non-reference) site."""
    return Acquisition(
        resolution=int(rng.choice([64, 72, 80, 96, 112, 128])),
        cast=tuple(float(g) for g in rng.uniform(0.86, 1.12, 3)),
        gradient=float(rng.uniform(0.0, 0.35)),
        blur=float(rng.uniform(0.0, 0.012)),
        noise=float(rng.uniform(0.005, 0.04)),
        hair=float(rng.uniform(0.0, 0.6)),
        vignette=float(rng.uniform(0.0, 0.5)),
        ring=bool(rng.uniform() < 0.3),
        jpeg_quality=int(rng.integers(75, 96)),
    )


def _draw_hair(image: np.ndarray, rng: np.random.Generator) -> None:
    """Draw 1-5 dark curved hairs in place."""
    size = image.shape[0]
    colour = np.array([0.10, 0.07, 0.05]) * rng.uniform(0.6, 1.4)
    for _ in range(int(rng.integers(1, 6))):
        r0, c0, r1, c1, r2, c2 = (int(x) for x in rng.integers(-size // 4, size + size // 4, 6))
        rr, cc = bezier_curve(
            r0, c0, r1, c1, r2, c2, weight=float(rng.uniform(0.5, 2.0)), shape=image.shape[:2]
        )
        opacity = rng.uniform(0.35, 0.8)
        image[rr, cc] = (1 - opacity) * image[rr, cc] + opacity * colour
        if rng.uniform() < 0.5 and size >= 96:
            rr2 = np.clip(rr + 1, 0, size - 1)
            image[rr2, cc] = (1 - opacity) * image[rr2, cc] + opacity * colour


def acquire(image: np.ndarray, acq: Acquisition, rng: np.random.Generator) -> np.ndarray:
    """Apply a site's acquisition to a float RGB image in [0, 1]; return uint8 RGB."""
    size = image.shape[0]
    image = image.copy()
    if rng.uniform() < acq.hair:
        _draw_hair(image, rng)
    coords = (np.arange(size) + 0.5) / size - 0.5
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    direction = rng.uniform(0, 2 * np.pi)
    light = 1.0 + acq.gradient * (np.cos(direction) * xx + np.sin(direction) * yy) * 2
    light *= 1.0 - acq.vignette * (xx**2 + yy**2) * 2
    light *= rng.uniform(0.92, 1.08)  # exposure jitter
    image = image * light[..., None] * np.asarray(acq.cast)
    if acq.cast_jitter > 0:
        image = image * np.exp(rng.normal(0.0, acq.cast_jitter, 3))
    if acq.ring:
        radius = rng.uniform(0.48, 0.56)
        field = 1.0 / (1.0 + np.exp(-(radius - np.hypot(xx, yy)) * size / 1.5))
        image *= field[..., None]
    if acq.blur > 0:
        image = gaussian(image, sigma=acq.blur * size, channel_axis=-1)
    image = image + rng.normal(0.0, acq.noise, image.shape)
    if acq.contrast != 1.0 or any(acq.offset):
        image = 0.5 + acq.contrast * (image - 0.5) + np.asarray(acq.offset)
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
