"""Dermoscopic lesions drawn with numpy and scikit-image: what makes nv, bkl and mel differ.

A lesion is described by five latent features in [0, 1] (size, border irregularity, colour variegation,
"stuck-on" fissure texture, greyness/lightness). Each class has its own mean for every feature, but all
features are drawn from wide, overlapping normal distributions, so no single cue (and no site's small
sample) separates the classes perfectly:

- nv: smaller, round/oval, regular border, fairly uniform brown, faint pigment network;
- bkl: waxy, lighter grey-brown, cerebriform fissures and milia-like dots, moderate border;
- mel: larger, irregular and asymmetric, variegated (dark brown, black, blue-grey, red patches).

`sample_lesion` draws the parameters of one lesion; `render_lesion` draws one view of it (several images of
one lesion share parameters and differ by rotation, zoom, position and acquisition).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.filters import gaussian
from skimage.transform import resize, warp

CLASSES = ("nv", "bkl", "mel")

# Class means of the latent features (size, irregularity, variegation, fissures, greyness).
_MEANS = {
    "nv": (0.32, 0.22, 0.18, 0.15, 0.25),
    "bkl": (0.50, 0.42, 0.30, 0.70, 0.70),
    "mel": (0.66, 0.68, 0.72, 0.22, 0.30),
}
# Spread of every latent feature around its class mean: the knob that sets how hard the task is.
LATENT_SD = 0.15

_PALETTE = {
    "black": (0.10, 0.07, 0.07),
    "dark_brown": (0.28, 0.15, 0.09),
    "blue_grey": (0.42, 0.47, 0.58),
    "red": (0.72, 0.32, 0.30),
    "light_brown": (0.62, 0.42, 0.28),
}


@dataclass(frozen=True)
class Lesion:
    """Parameters of one lesion, shared by all images of it."""

    label: str
    radius: float  # fraction of the image side
    aspect: float  # minor/major axis ratio
    harmonics: np.ndarray  # (k, amplitude, phase) rows of the border's radial function
    softness: float  # border blur, as a fraction of the radius
    colour: tuple[float, float, float]
    opacity: float
    patches: tuple[tuple[str, float], ...]  # variegation colours and their share
    fissures: float
    network: float
    skin: tuple[float, float, float]
    seed: int  # seeds the lesion's own texture fields, so every view shows the same pattern


def _latents(label: str, rng: np.random.Generator) -> np.ndarray:
    mean = np.asarray(_MEANS[label])
    return np.clip(rng.normal(mean, LATENT_SD), 0.0, 1.0)


def sample_lesion(
    label: str, rng: np.random.Generator, skin_tone: tuple[float, float] = (0.0, 1.0)
) -> Lesion:
    """Draw one lesion of class `label` (nv, bkl or mel) from the overlapping class distributions.

    `skin_tone` is the site's range of skin tones (0 = very light, 1 = brown): a site's population.
    """
    if label not in _MEANS:
        raise ValueError(f"unknown lesion class {label!r}; expected one of {CLASSES}")
    size, irregular, variegation, fissures, grey = _latents(label, rng)
    ks = np.arange(2, 10)
    amplitudes = irregular * 0.5 * rng.uniform(0.3, 1.0, ks.size) / ks**0.9
    harmonics = np.stack([ks, amplitudes, rng.uniform(0, 2 * np.pi, ks.size)], axis=1)
    brown = np.array([0.45, 0.27, 0.16]) * rng.uniform(0.75, 1.25)
    colour = (1 - 0.55 * grey) * brown + 0.55 * grey * np.array([0.62, 0.56, 0.52])
    n_patches = int(round(variegation * 3.4))
    names = rng.choice(list(_PALETTE), size=n_patches, replace=False) if n_patches else []
    patches = tuple((str(name), float(rng.uniform(0.5, 1.0) * variegation)) for name in names)
    tone = rng.uniform(*skin_tone)
    skin = (1 - tone) * np.array([0.93, 0.76, 0.66]) + tone * np.array([0.72, 0.50, 0.38])
    return Lesion(
        label=label,
        radius=0.10 + 0.22 * size,
        aspect=float(rng.uniform(0.65, 1.0)),
        harmonics=harmonics,
        softness=float(rng.uniform(0.03, 0.08) + 0.12 * variegation * rng.uniform()),
        colour=tuple(float(c) for c in np.clip(colour, 0, 1)),
        opacity=float(rng.uniform(0.7, 0.95)),
        patches=patches,
        fissures=float(fissures),
        network=float(np.clip(1 - fissures - variegation + rng.normal(0, 0.2), 0, 1)),
        skin=tuple(float(c) for c in skin),
        seed=int(rng.integers(2**31)),
    )


_TEX = 64  # side of the lesion-frame grid on which texture fields live
_TEX_EXTENT = 1.6  # the grid spans lesion coordinates [-extent, extent] (1 = the mean border)


def _smooth_field(rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise on the lesion-frame grid, scaled to zero mean and unit deviation."""
    field = gaussian(rng.standard_normal((_TEX, _TEX)), sigma=sigma, mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-8)


def _texture(lesion: Lesion) -> np.ndarray:
    """Per-channel multiplicative and additive texture of the lesion, (_TEX, _TEX, 3), in its own frame.

    Textures live in the lesion's frame so that every view of one lesion shows the same pattern.
    """
    rng = np.random.default_rng(lesion.seed)
    rgb = np.broadcast_to(np.asarray(lesion.colour), (_TEX, _TEX, 3)).copy()
    for name, share in lesion.patches:
        blob = _smooth_field(rng, sigma=5.0)
        weight = np.clip((blob - (1.0 - share)) * 2.0, 0, 1)[..., None]
        rgb = (1 - weight) * rgb + weight * np.asarray(_PALETTE[name])
    if lesion.fissures > 0:
        band = _smooth_field(rng, 1.3) - 0.6 * _smooth_field(rng, 3.5)
        cracks = np.exp(-((band / 0.3) ** 2)) * lesion.fissures
        rgb *= (1.0 - 0.6 * cracks)[..., None]
        dots = (rng.uniform(size=(_TEX, _TEX)) > 1.0 - 0.015 * lesion.fissures).astype(float)
        rgb += 0.6 * gaussian(dots, sigma=0.8)[..., None]
    if lesion.network > 0:
        mesh = _smooth_field(rng, 1.0)
        rgb *= (1.0 - 0.3 * lesion.network * (mesh > 0.4))[..., None]
    return rgb


def render_lesion(
    lesion: Lesion, size: int, view_rng: np.random.Generator, magnification: float = 1.0
) -> np.ndarray:
    """One float RGB view (size, size, 3) in [0, 1] of `lesion` on skin, before any site acquisition effect.

    `magnification` scales the lesion in the frame (a dermatoscope's field of view and working distance).
    """
    coords = (np.arange(size) + 0.5) / size
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    centre = 0.5 + view_rng.normal(0, 0.04, 2)
    angle = view_rng.uniform(0, 2 * np.pi)
    radius = lesion.radius * view_rng.uniform(0.9, 1.1) * magnification
    dy, dx = yy - centre[0], xx - centre[1]
    u = (np.cos(angle) * dx + np.sin(angle) * dy) / radius
    v = (-np.sin(angle) * dx + np.cos(angle) * dy) / (radius * lesion.aspect)
    k, amp, phase = lesion.harmonics.T
    table = np.linspace(-np.pi, np.pi, 721)
    border = 1.0 + (amp[:, None] * np.cos(k[:, None] * table + phase[:, None])).sum(0)
    dist = np.hypot(u, v) / np.maximum(np.interp(np.arctan2(v, u), table, border), 0.3)
    alpha = lesion.opacity / (1.0 + np.exp(np.clip(-(1.0 - dist) / lesion.softness, -50, 50)))

    rows, cols = np.nonzero(alpha.max(1) > 1e-3)[0], np.nonzero(alpha.max(0) > 1e-3)[0]
    box = (
        (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
        if rows.size
        else (slice(0, 0),) * 2
    )
    grid = (np.stack([v[box], u[box]]) + _TEX_EXTENT) * (_TEX - 1) / (2 * _TEX_EXTENT)
    pattern = _texture(lesion)
    texture = np.zeros((size, size, 3))
    if rows.size:
        texture[box] = np.stack(
            [warp(pattern[..., c], grid, order=1, mode="edge") for c in range(3)], axis=-1
        )
    texture *= (0.75 + 0.35 * np.clip(dist, 0, 1) ** 2)[..., None]  # darker centre

    coarse = max(4, size // 10)
    mottling = resize(view_rng.standard_normal((coarse, coarse)), (size, size), order=3, mode="reflect")
    mottling /= mottling.std() + 1e-8
    skin = np.asarray(lesion.skin) * (1.0 + 0.04 * mottling)[..., None]
    image = (1 - alpha[..., None]) * skin + alpha[..., None] * texture
    return np.clip(image, 0.0, 1.0)
