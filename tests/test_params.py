"""Parameter roles: decided by module type on whole MONAI networks, aliases and container entries."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medfl.federated.params import (
    Role,
    classifier_keys,
    keys_with_role,
    norm_statistics_keys,
    parameter_roles,
)
from medfl.models import MODEL_NAMES, build_model

ALL_MODELS = [(task, name) for task, names in MODEL_NAMES.items() for name in names]
# Concrete torch norm classes, listed independently of the implementation's base classes.
NORM_CLASSES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
    nn.GroupNorm, nn.LayerNorm,
)  # fmt: skip


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {name: build_model(name, task, 3, 1, width=0.125) for task, name in ALL_MODELS}


def _entries_of(model: nn.Module, types: tuple[type, ...]) -> dict[str, nn.Module]:
    """state-dict key -> owning module, for modules of `types`."""
    return {
        f"{prefix}.{key}": module
        for prefix, module in model.named_modules()
        if isinstance(module, types)
        for key in module.state_dict(keep_vars=True)
        if "." not in key
    }


@pytest.mark.parametrize(("task", "name"), ALL_MODELS)
def test_every_entry_gets_one_role_and_norm_entries_are_exactly_those_of_norm_modules(models, task, name):
    model = models[name]
    roles = parameter_roles(model)
    assert list(roles) == list(model.state_dict())
    assert all(isinstance(role, Role) for role in roles.values())
    norm_keys = set(_entries_of(model, NORM_CLASSES))
    assert norm_keys, "every network here has normalisation weights"
    assert set(keys_with_role(roles, Role.NORM)) == norm_keys


@pytest.mark.parametrize(("task", "name"), ALL_MODELS)
def test_final_classifier_weight_is_classifier_and_its_bias_other(models, task, name):
    model = models[name]
    roles = parameter_roles(model)
    assert keys_with_role(roles, Role.CLASSIFIER) == ["final_classifier.weight"]
    if model.final_classifier.bias is None:  # the reference slim VGG-16 is bias-free
        assert name == "slim_vgg16" and "final_classifier.bias" not in roles
        assert classifier_keys(model) == {"final_classifier.weight"}
    else:
        assert roles["final_classifier.bias"] is Role.OTHER
        assert classifier_keys(model) == {"final_classifier.weight", "final_classifier.bias"}
    features = (
        model.final_classifier.in_features if task == "classification" else model.final_classifier.in_channels
    )
    assert model.state_dict()["final_classifier.weight"].shape[:2] == (3, features)


@pytest.mark.parametrize(("task", "name"), ALL_MODELS)
def test_convolution_and_linear_weights_by_type(models, task, name):
    model = models[name]
    roles = parameter_roles(model)
    for prefix, module in model.named_modules():
        if module is model.final_classifier:
            continue
        if isinstance(module, (nn.ConvTranspose2d, nn.Conv2d, nn.Linear)):
            expected = {nn.ConvTranspose2d: Role.CONV_TRANSPOSE, nn.Conv2d: Role.CONV, nn.Linear: Role.LINEAR}
            assert roles[f"{prefix}.weight"] is expected[type(module)]
            if module.bias is not None:
                assert roles[f"{prefix}.bias"] is Role.OTHER


def test_unet_prelu_weights_under_conv_names_are_other_and_norm_weights_are_norm(models):
    model = models["unet"]
    roles = parameter_roles(model)
    prelu_keys = set(_entries_of(model, (nn.PReLU,)))
    assert any(".conv." in key for key in prelu_keys)
    assert all(roles[key] is Role.OTHER for key in prelu_keys)
    conv_named_norms = [key for key in keys_with_role(roles, Role.NORM) if ".conv." in key]
    assert conv_named_norms and all(key.endswith((".weight", ".bias")) for key in conv_named_norms)
    residual = [
        f"{prefix}.weight"
        for prefix, module in model.named_modules()
        if prefix.endswith(".residual") and isinstance(module, nn.Conv2d)
    ]
    assert residual and all(roles[key] is Role.CONV for key in residual)
    assert keys_with_role(roles, Role.CONV_TRANSPOSE)


def test_efficientnet_squeeze_excitation_convs_are_conv(models):
    roles = parameter_roles(models["efficientnet-b0"])
    squeeze = [key for key in roles if "_se_reduce.weight" in key or "_se_expand.weight" in key]
    assert squeeze and all(roles[key] is Role.CONV for key in squeeze)


def test_norm_statistics_keys_are_the_running_buffers(models):
    vgg = models["slim_vgg16"]
    expected = {
        key
        for key in _entries_of(vgg, NORM_CLASSES)
        if key.endswith(("running_mean", "running_var", "num_batches_tracked"))
    }
    assert len(expected) == 14 * 3
    assert norm_statistics_keys(vgg) == expected
    assert norm_statistics_keys(models["unet"]) == set()  # affine instance norm keeps no statistics


class _Toy(nn.Module):
    """Names that lie about types, a shared norm, an aliased classifier and entries on containers."""

    def __init__(self) -> None:
        super().__init__()
        shared_norm = nn.BatchNorm2d(4)
        self.bn = nn.Conv2d(1, 4, 3)  # a conv named like a norm
        self.first = nn.Sequential(shared_norm, nn.PReLU())
        self.second = nn.Sequential(shared_norm, nn.GroupNorm(2, 4), nn.LayerNorm(4))
        self.second.register_parameter("scale", nn.Parameter(torch.ones(4)))  # on a container
        self.register_buffer("step", torch.zeros(()))  # on the root
        self.register_buffer("cache", torch.zeros(3), persistent=False)  # not in the state dict
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2, bias=False)
        self.norm = nn.Linear(4, 4)  # a linear named like a norm
        self.final_classifier = nn.Conv2d(4, 3, 1)
        self.head = self.final_classifier  # the same module under a second name


def test_roles_follow_module_types_through_aliases_and_containers():
    model = _Toy()
    roles = parameter_roles(model)
    assert list(roles) == list(model.state_dict())
    assert roles == {
        "step": Role.OTHER,
        "bn.weight": Role.CONV,
        "bn.bias": Role.OTHER,
        **{f"{alias}.{entry}": Role.NORM
           for alias in ("first.0", "second.0")
           for entry in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")},
        "first.1.weight": Role.OTHER,
        "second.scale": Role.OTHER,
        "second.1.weight": Role.NORM,
        "second.1.bias": Role.NORM,
        "second.2.weight": Role.NORM,
        "second.2.bias": Role.NORM,
        "up.weight": Role.CONV_TRANSPOSE,
        "norm.weight": Role.LINEAR,
        "norm.bias": Role.OTHER,
        "final_classifier.weight": Role.CLASSIFIER,
        "final_classifier.bias": Role.OTHER,
        "head.weight": Role.CLASSIFIER,
        "head.bias": Role.OTHER,
    }  # fmt: skip
    assert classifier_keys(model) == {
        "final_classifier.weight",
        "final_classifier.bias",
        "head.weight",
        "head.bias",
    }
    assert norm_statistics_keys(model) == {
        f"{alias}.{entry}"
        for alias in ("first.0", "second.0")
        for entry in ("running_mean", "running_var", "num_batches_tracked")
    }


def test_without_a_final_classifier_linear_weights_stay_linear():
    model = nn.Sequential(
        nn.Linear(4, 8), nn.InstanceNorm1d(8, affine=True, track_running_stats=True), nn.Linear(8, 2)
    )
    roles = parameter_roles(model)
    assert keys_with_role(roles, Role.LINEAR) == ["0.weight", "2.weight"]
    assert keys_with_role(roles, Role.NORM) == ["1.weight", "1.bias", "1.running_mean", "1.running_var",
                                                 "1.num_batches_tracked"]  # fmt: skip
    assert norm_statistics_keys(model) == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
    with pytest.raises(ValueError, match="final_classifier"):
        classifier_keys(model)


def test_keys_with_role_keeps_order_and_accepts_several_roles():
    roles = {"a": Role.CONV, "b": Role.NORM, "c": Role.OTHER, "d": Role.CONV}
    assert keys_with_role(roles, Role.CONV) == ["a", "d"]
    assert keys_with_role(roles, Role.OTHER, Role.CONV) == ["a", "c", "d"]
    assert keys_with_role(roles) == []
