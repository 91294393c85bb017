"""Parameter roles: what kind of module each state-dict entry belongs to.

PFA, FedBN and the personalisation baselines route tensors by role. Roles are decided by module type,
never by substrings of entry names (MONAI nets put PReLU and norm weights under names containing "conv").
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum

from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.conv import _ConvNd


class Role(str, Enum):
    """The role of one state-dict entry."""

    NORM = "normalisation"  # weights, biases, running statistics and counters of norm layers
    CONV = "convolution"  # convolution kernels (N_out, C_in/groups, k...)
    CONV_TRANSPOSE = "transposed_convolution"  # transposed kernels (C_in, N_out/groups, k...)
    LINEAR = "linear"  # linear weights (out, in), except the final classifier
    CLASSIFIER = "final_classifier"  # the final classifier's weight (classes, features[, 1...])
    OTHER = "other"  # biases, PReLU slopes, scalars: plain weighted average


# Module types whose every state-dict entry is a normalisation entry (the torch base classes).
NORM_TYPES: tuple[type[nn.Module], ...] = (
    _NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    nn.CrossMapLRN2d,
    nn.RMSNorm,
)


def _entry_owners(model: nn.Module) -> dict[str, tuple[nn.Module, str, bool]]:
    """Map every parameter and buffer key, under every alias of a shared module, to (owner, name, is_buffer)."""
    owners: dict[str, tuple[nn.Module, str, bool]] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        head = f"{prefix}." if prefix else ""
        for name in module._parameters:
            owners[head + name] = (module, name, False)
        for name in module._buffers:
            owners[head + name] = (module, name, True)
    return owners


def _final_classifier(model: nn.Module) -> nn.Module | None:
    classifier = getattr(model, "final_classifier", None)
    return classifier if isinstance(classifier, nn.Module) else None


def _role(module: nn.Module, name: str, classifier: nn.Module | None) -> Role:
    if isinstance(module, NORM_TYPES):
        return Role.NORM
    if name != "weight":
        return Role.OTHER
    if module is classifier:
        return Role.CLASSIFIER
    if isinstance(module, _ConvNd):
        return Role.CONV_TRANSPOSE if module.transposed else Role.CONV
    if isinstance(module, nn.Linear):
        return Role.LINEAR
    return Role.OTHER


def parameter_roles(model: nn.Module) -> dict[str, Role]:
    """Role of every state-dict entry of `model`, keyed and ordered as `model.state_dict()`.

    Decided by the type of the module that owns the entry. `model.final_classifier`, when present, gives
    the CLASSIFIER weight (its bias is OTHER). Entries no module owns directly (extra state) are OTHER.
    """
    owners = _entry_owners(model)
    classifier = _final_classifier(model)
    roles: dict[str, Role] = {}
    for key in model.state_dict(keep_vars=True):
        owner = owners.get(key)
        roles[key] = _role(owner[0], owner[1], classifier) if owner else Role.OTHER
    return roles


def classifier_keys(model: nn.Module) -> set[str]:
    """State-dict keys of `model.final_classifier` (its weight and bias), under every alias it has."""
    classifier = _final_classifier(model)
    if classifier is None:
        raise ValueError(f"{type(model).__name__} has no final_classifier module")
    keys = set(model.state_dict(keep_vars=True))
    return {key for key, (owner, _, _) in _entry_owners(model).items() if owner is classifier and key in keys}


def norm_statistics_keys(model: nn.Module) -> set[str]:
    """State-dict keys of normalisation buffers (running statistics, batch counters).

    SiloBN shares normalisation weights and biases but keeps these statistics local to each site.
    """
    keys = set(model.state_dict(keep_vars=True))
    return {
        key
        for key, (owner, _, is_buffer) in _entry_owners(model).items()
        if is_buffer and isinstance(owner, NORM_TYPES) and key in keys
    }


def keys_with_role(roles: Mapping[str, Role], *role: Role) -> list[str]:
    """Keys of `roles` whose role is one of `role`, in the order of `roles`."""
    wanted = set(role)
    return [key for key, key_role in roles.items() if key_role in wanted]
