"""Parameter roles: what kind of module each state-dict entry belongs to.

PFA, FedBN and the personalisation baselines route tensors by role. Roles are decided by module type,
never by substrings of entry names (MONAI nets put PReLU and norm weights under names containing "conv").
"""

from __future__ import annotations

from enum import Enum


class Role(str, Enum):
    """The role of one state-dict entry."""

    NORM = "normalisation"  # weights, biases, running statistics and counters of norm layers
    CONV = "convolution"  # convolution kernels (N_out, C_in/groups, k...)
    CONV_TRANSPOSE = "transposed_convolution"  # transposed kernels (C_in, N_out/groups, k...)
    LINEAR = "linear"  # linear weights (out, in), except the final classifier
    CLASSIFIER = "final_classifier"  # the final classifier's weight (classes, features[, 1...])
    OTHER = "other"  # biases, PReLU slopes, scalars: plain weighted average
