"""Progressive Fourier aggregation (PFA): the server step of the personalized retrogress-resilient method.

Each site's weight matrices are moved to the frequency domain; inside a centred low-frequency box every
site receives the federation's (site-weighted) mean amplitude, and by default the mean phase too; outside
the box it keeps its own spectrum. Normalisation entries stay per site, everything else that is not a
kernel or weight matrix is averaged. See docs/algorithm.md, section PFA, for the reference behaviour kept
here (box bounds, linear mean of wrapped phases, reshape rule of convolution kernels).

The work is batched: the K sites' matrices of one entry form one (K, h, w) stack, and all entries whose
matrices have the same shape go through one FFT call, in float64, on the device of the input tensors
(the first site's). Only the half spectrum of the real inputs is computed, and the bins that are real in
theory get an imaginary part of exactly +0, so that their phase (0 or pi) does not depend on the FFT
library's rounding.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from medfl.federated.averaging import normalise_site_weights, weighted_average
from medfl.federated.params import Role

# Upper bound on float64 elements per batched FFT call: 128 MiB of input, peak memory well under 1 GiB.
_MAX_ELEMENTS_PER_CALL = 1 << 24

_SPECTRAL_ROLES = (Role.CONV, Role.CONV_TRANSPOSE, Role.LINEAR, Role.CLASSIFIER)


def pfa_ratio(round: int, rounds: int, start: float, end: float) -> float:
    """Low-frequency ratio of the 0-based ``round`` out of ``rounds``: start + (round/rounds)(end-start).

    ``end`` itself is never reached (the last round gets start + (rounds-1)/rounds * (end-start)).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if not 0 <= round < rounds:
        raise ValueError(f"round must be in [0, {rounds}), got {round}")
    for name, value in (("start", start), ("end", end)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"PFA ratio {name} must be in [0, 1], got {value}")
    return start + (round / rounds) * (end - start)


def pfa_aggregate(
    states: Mapping[str, Mapping[str, Tensor]],
    roles: Mapping[str, Role],
    ratio: float,
    site_weights: Mapping[str, float] | None = None,
    share_phase: bool = True,
) -> dict[str, dict[str, Tensor]]:
    """Aggregate the sites' state dicts with PFA; returns ``{site: state}`` in the input's key order.

    ``roles`` gives the :class:`Role` of every entry. NORM entries are returned as the site's own tensor
    objects; OTHER entries get the weighted average (one copy per site); kernels, weight matrices and the
    final classifier's rows (one per class, its trailing axes flattened, so a (classes, features, 1, 1)
    conv head works too) are mixed in the frequency domain with low-frequency ``ratio`` in [0, 1].
    ``site_weights`` (e.g. sample counts) defaults to uniform. ``share_phase=False`` shares the amplitude
    only (the MICCAI variant). Every output tensor keeps its input's dtype and device.
    """
    sites = list(states)
    keys = _validated_keys(states, roles)
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"PFA ratio must be in [0, 1], got {ratio}")
    weights = normalise_site_weights(sites, site_weights)

    merged: dict[str, dict[str, Tensor]] = {site: {} for site in sites}
    spectral: list[str] = []
    for key in keys:
        tensors = [states[site][key] for site in sites]
        role = Role(roles[key])
        if role is Role.NORM:
            for site, tensor in zip(sites, tensors, strict=True):
                merged[site][key] = tensor
        elif role is Role.OTHER or tensors[0].numel() == 0:
            average = weighted_average(tensors, weights)
            for site, tensor in zip(sites, tensors, strict=True):
                merged[site][key] = average.to(device=tensor.device, copy=True)
        else:
            spectral.append(key)

    mixed = _mix_spectral_entries(states, roles, spectral, weights, ratio, share_phase)
    for key, tensors in mixed.items():
        for site, tensor in zip(sites, tensors, strict=True):
            merged[site][key] = tensor
    return {site: {key: merged[site][key] for key in keys} for site in sites}


def _validated_keys(states: Mapping[str, Mapping[str, Tensor]], roles: Mapping[str, Role]) -> list[str]:
    """Entry names of the first site, after checking that every site has the same entries and shapes."""
    if not states:
        raise ValueError("no site states to aggregate")
    sites = list(states)
    first = states[sites[0]]
    keys = list(first)
    for site in sites[1:]:
        missing = [k for k in keys if k not in states[site]]
        extra = [k for k in states[site] if k not in first]
        if missing or extra:
            problem = f"lacks '{missing[0]}'" if missing else f"has an extra entry '{extra[0]}'"
            raise ValueError(f"site '{site}': state {problem} compared with site '{sites[0]}'")
        for key in keys:
            if states[site][key].shape != first[key].shape:
                raise ValueError(
                    f"site '{site}': entry '{key}' has shape {tuple(states[site][key].shape)}, "
                    f"site '{sites[0]}' has {tuple(first[key].shape)}"
                )
    for key in keys:
        if key not in roles:
            raise ValueError(f"entry '{key}' has no role")
        role = Role(roles[key])
        if role in _SPECTRAL_ROLES:
            _check_spectral_entry(key, role, first[key])
    return keys


def _check_spectral_entry(key: str, role: Role, tensor: Tensor) -> None:
    if not tensor.is_floating_point():
        raise ValueError(f"entry '{key}' ({role.value}) must be a floating tensor, got {tensor.dtype}")
    minimum_ndim = 2 if role in (Role.LINEAR, Role.CLASSIFIER) else 3
    if tensor.ndim < minimum_ndim or (role is Role.LINEAR and tensor.ndim > 2):
        raise ValueError(f"entry '{key}' ({role.value}) has unexpected shape {tuple(tensor.shape)}")


@dataclass(frozen=True)
class _Layout:
    """Where one entry's tensor goes in a batch of signals, and how it gets there and back.

    The stored tensor, with its axes permuted by ``permutation``, is written into ``rows`` consecutive
    signals of shape ``signal`` (one 2-D matrix, or one 1-D row per class), so copying in and out are
    each one strided copy per site.
    """

    key: str
    shape: tuple[int, ...]
    permutation: tuple[int, ...]
    rows: int
    signal: tuple[int, ...]

    @property
    def permuted_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[axis] for axis in self.permutation)

    @property
    def inverse_permutation(self) -> tuple[int, ...]:
        return tuple(self.permutation.index(axis) for axis in range(len(self.shape)))


def _layout(key: str, role: Role, shape: Sequence[int]) -> _Layout:
    """The reference's reshape rules: conv (N, C, k1, ..., kn) -> (C, k1, ..., kn, N) -> (C*k1, k2*...*kn*N);
    transposed conv (C, N, k...) -> the same after swapping the first two axes; linear as is; classifier
    one row per class."""
    shape = tuple(shape)
    ndim = len(shape)
    if role is Role.CLASSIFIER:
        return _Layout(key, shape, tuple(range(ndim)), shape[0], (math.prod(shape[1:]),))
    if role is Role.LINEAR:
        return _Layout(key, shape, (0, 1), 1, shape)
    if role is Role.CONV:
        permutation = (*range(1, ndim), 0)
    else:
        permutation = (0, *range(2, ndim), 1)
    permuted = [shape[axis] for axis in permutation]
    return _Layout(key, shape, permutation, 1, (permuted[0] * permuted[1], math.prod(permuted[2:])))


def _mix_spectral_entries(
    states: Mapping[str, Mapping[str, Tensor]],
    roles: Mapping[str, Role],
    keys: Sequence[str],
    weights: Tensor,
    ratio: float,
    share_phase: bool,
) -> dict[str, list[Tensor]]:
    """PFA of every kernel / matrix / classifier entry; returns ``{key: [tensor per site]}``.

    Entries whose signals have the same shape share one batch of shape (B, K, *signal), float64.
    """
    sites = list(states)
    groups: dict[tuple[int, ...], list[_Layout]] = defaultdict(list)
    for key in keys:
        layout = _layout(key, Role(roles[key]), states[sites[0]][key].shape)
        groups[layout.signal].append(layout)

    mixed: dict[str, list[Tensor]] = {}
    for signal, layouts in groups.items():
        for chunk in _chunks(layouts, len(sites)):
            device = states[sites[0]][chunk[0].key].device
            batch = torch.empty(
                (sum(layout.rows for layout in chunk), len(sites), *signal),
                dtype=torch.float64,
                device=device,
            )
            for layout, slots in _slots(batch, chunk):
                for index, site in enumerate(sites):
                    slots[:, index].view(layout.permuted_shape).copy_(
                        states[site][layout.key].permute(layout.permutation)
                    )
            out = _share_low_frequencies(batch, weights.to(device), ratio, share_phase, len(signal))
            for layout, slots in _slots(out, chunk):
                mixed[layout.key] = [
                    _copy_out(slots[:, index], layout, states[site][layout.key])
                    for index, site in enumerate(sites)
                ]
    return mixed


def _slots(batch: Tensor, layouts: Sequence[_Layout]) -> list[tuple[_Layout, Tensor]]:
    """Each layout with its (rows, K, *signal) part of the batch, in order."""
    return list(zip(layouts, batch.split([layout.rows for layout in layouts]), strict=True))


def _copy_out(slot: Tensor, layout: _Layout, original: Tensor) -> Tensor:
    """A fresh tensor shaped, typed and placed like ``original`` (never a view of the batch)."""
    result = torch.empty(layout.shape, dtype=original.dtype, device=original.device)
    return result.copy_(slot.view(layout.permuted_shape).permute(layout.inverse_permutation))


def _chunks(layouts: list[_Layout], sites: int) -> list[list[_Layout]]:
    """Split a group so that one FFT call handles at most about _MAX_ELEMENTS_PER_CALL elements."""
    chunks: list[list[_Layout]] = [[]]
    size = 0
    for layout in layouts:
        elements = sites * math.prod(layout.shape)
        if chunks[-1] and size + elements > _MAX_ELEMENTS_PER_CALL:
            chunks.append([])
            size = 0
        chunks[-1].append(layout)
        size += elements
    return chunks


def _share_low_frequencies(
    batch: Tensor, weights: Tensor, ratio: float, share_phase: bool, signal_ndim: int
) -> Tensor:
    """Steps 1-5 of PFA on a (B, K, *signal) float64 batch; returns the same shape, float64.

    Computed on the half spectrum of real input, which gives the same result with half the work: the
    real part of ifft(X) is the inverse real FFT of X's Hermitian part (X[u] + conj(X[-u])) / 2. Where
    the mixed spectrum X is F outside the box and the shared S inside it, and both F and S are Hermitian,
    that part is F + w (S - F) with w = ([u in box] + [-u in box]) / 2. The box is one bin asymmetric,
    so w is 1/2 on its rim. Only the bins with w > 0 (a prefix of the last axis; of the other axis, its
    first and last rows) are transformed to amplitude and phase.
    """
    dims = tuple(range(-signal_ndim, 0))
    signal_shape = tuple(batch.shape[-signal_ndim:])
    halves = [math.floor(n * ratio / 2) for n in signal_shape]
    if min(halves) == 0:
        return batch
    spectrum = torch.fft.rfftn(batch, dim=dims)
    _zero_imaginary_of_real_bins(spectrum, signal_shape)
    blend = _blend_weights(signal_shape, halves, batch.device).to(spectrum.dtype)
    site_weights = weights.view(1, -1, *([1] * signal_ndim))
    columns = slice(0, halves[-1] + 1)
    if signal_ndim == 1:
        regions = [(columns,)]
    elif 2 * halves[0] + 1 < signal_shape[0]:
        regions = [(slice(0, halves[0] + 1), columns), (slice(signal_shape[0] - halves[0], None), columns)]
    else:
        regions = [(slice(None), columns)]
    for region in regions:
        _blend_shared_spectrum(spectrum[(..., *region)], blend[region], site_weights, share_phase)
    # A real bin's Hermitian part is the real part of its (mixed) value.
    _zero_imaginary_of_real_bins(spectrum, signal_shape)
    return torch.fft.irfftn(spectrum, s=signal_shape, dim=dims)


def _blend_shared_spectrum(region: Tensor, blend: Tensor, site_weights: Tensor, share_phase: bool) -> None:
    """In place on a (B, K, ...) part of the sites' spectra: region += blend * (shared - region)."""
    amplitude = region.abs()
    phase = region.angle()
    shared_amplitude = (amplitude * site_weights).sum(dim=1, keepdim=True)
    if share_phase:
        shared = torch.polar(shared_amplitude, (phase * site_weights).sum(dim=1, keepdim=True))
    else:
        shared = torch.polar(shared_amplitude.expand_as(phase), phase)
    region.lerp_(shared.expand_as(region), blend)


def _blend_weights(signal_shape: Sequence[int], halves: Sequence[int], device: torch.device) -> Tensor:
    """w = ([u in box] + [-u in box]) / 2 on the half spectrum's first halves[-1] + 1 bins of the last axis.

    In shifted order the box spans [c - b, c + b) per axis (c = floor(n/2), b = floor(n*ratio/2)); in FFT
    order that is the indices u < b or u >= n - b; the mirror bin of u is (n - u) mod n.
    """
    in_box, in_mirror = [], []
    for axis, (n, half) in enumerate(zip(signal_shape, halves, strict=True)):
        last = axis == len(signal_shape) - 1
        index = torch.arange(half + 1 if last else n, device=device)
        mirror = (n - index) % n
        in_box.append((index < half) | (index >= n - half))
        in_mirror.append((mirror < half) | (mirror >= n - half))
    return (_outer_and(in_box).double() + _outer_and(in_mirror).double()) / 2


def _outer_and(masks: Sequence[Tensor]) -> Tensor:
    result = masks[0]
    for mask in masks[1:]:
        result = result.unsqueeze(-1) & mask
    return result


def _zero_imaginary_of_real_bins(spectrum: Tensor, signal_shape: Sequence[int]) -> None:
    """In place: imaginary part +0 on the bins that are real for real input (DC and Nyquist per axis).

    Their angle is then exactly 0 or +pi. Left alone, rounding noise or the sign of a zero picks +pi or
    -pi depending on the FFT library, and the mean phase would differ between numpy, MKL and cuFFT.
    The last axis is the half spectrum's, whose Nyquist bin (even n) is its last element.
    """
    per_axis = [[0, n // 2] if n % 2 == 0 else [0] for n in signal_shape[:-1]]
    per_axis.append([0, spectrum.shape[-1] - 1] if signal_shape[-1] % 2 == 0 else [0])
    imaginary = spectrum.imag
    for index in itertools.product(*per_axis):
        imaginary[(..., *index)] = 0.0
