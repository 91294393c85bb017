"""Weighted averaging of site tensors and state dicts: the shared core of FedAvg, FedBN and PFA.

Weights are normalised and accumulated in float64 so that the average does not depend on the order of
the sites beyond rounding, and the result keeps the input's dtype and device. Non-floating entries
(integer counters such as BatchNorm's ``num_batches_tracked``) are not averaged: a mean of counters
has no meaning, so the first site's value is returned (as a copy).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor


def normalise_site_weights(site_names: Sequence[str], site_weights: Mapping[str, float] | None) -> Tensor:
    """Site weights as a float64 vector in the order of ``site_names``, summing to 1.

    ``None`` gives uniform weights. A missing, negative or non-finite weight, or weights summing to zero,
    raise ValueError naming the site (or the sites) at fault.
    """
    if len(site_names) == 0:
        raise ValueError("no sites to weight")
    if site_weights is None:
        return torch.full((len(site_names),), 1.0 / len(site_names), dtype=torch.float64)
    values = []
    for name in site_names:
        if name not in site_weights:
            raise ValueError(f"site '{name}': no weight given")
        value = float(site_weights[name])
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"site '{name}': weight must be finite and >= 0, got {value}")
        values.append(value)
    weights = torch.tensor(values, dtype=torch.float64)
    total = weights.sum()
    if total <= 0:
        raise ValueError(f"sites {', '.join(repr(n) for n in site_names)}: weights sum to zero")
    return weights / total


def _check_weights(count: int, weights: Tensor) -> None:
    if weights.ndim != 1 or weights.shape[0] != count:
        raise ValueError(f"expected {count} site weights, got shape {tuple(weights.shape)}")


def weighted_average(tensors: Sequence[Tensor], weights: Tensor) -> Tensor:
    """Weighted average of equally shaped site tensors, accumulated in float64.

    ``weights`` (one per tensor) should sum to 1 (see :func:`normalise_site_weights`). The result has the
    dtype and device of the first tensor. Non-floating tensors are returned as a copy of the first one.
    """
    if len(tensors) == 0:
        raise ValueError("no tensors to average")
    _check_weights(len(tensors), weights)
    first = tensors[0]
    if not (first.is_floating_point() or first.is_complex()):
        return first.clone()
    stacked = torch.stack([t.to(device=first.device) for t in tensors])
    return _average_stacked(stacked, weights).to(dtype=first.dtype)


def _average_stacked(stacked: Tensor, weights: Tensor) -> Tensor:
    """Average along the first (site) axis of a stacked float tensor, in float64 (complex128)."""
    accumulate = torch.complex128 if stacked.is_complex() else torch.float64
    w = weights.to(device=stacked.device, dtype=torch.float64)
    return torch.tensordot(w.to(accumulate), stacked.to(accumulate), dims=1)


def average_states(
    states: Mapping[str, Mapping[str, Tensor]], weights: Tensor, keys: Iterable[str]
) -> dict[str, Tensor]:
    """Weighted average of the entries ``keys`` over site state dicts ``{site: {key: tensor}}``.

    ``weights`` follows the order of ``states``. Each key's site tensors are stacked once and averaged in
    one call; dtype and device of the first site's entry are kept. Non-floating entries are copied from
    the first site. A key missing at some site raises ValueError naming both.
    """
    sites = list(states)
    if not sites:
        raise ValueError("no site states to average")
    _check_weights(len(sites), weights)
    averaged: dict[str, Tensor] = {}
    for key in keys:
        tensors = []
        for site in sites:
            if key not in states[site]:
                raise ValueError(f"site '{site}': state has no entry '{key}'")
            tensors.append(states[site][key])
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) != 1:
            raise ValueError(f"entry '{key}': shapes differ between sites: {sorted(shapes)}")
        averaged[key] = weighted_average(tensors, weights)
    return averaged
