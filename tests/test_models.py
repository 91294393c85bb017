"""Networks: (logits, features) shapes, features feed the final classifier, configs rebuild the network."""

from __future__ import annotations

import json

import monai.networks.nets as monai_nets
import pytest
import torch
from torch import nn

from medfl.errors import ConfigError
from medfl.models import MODEL_NAMES, FeatureNet, build_model
from medfl.models.vgg import VGG16_BLOCKS

ALL_MODELS = [(task, name) for task, names in MODEL_NAMES.items() for name in names]
NUM_CLASSES, IN_CHANNELS, WIDTH = 3, 2, 0.125


def _tiny(task: str, name: str, spatial_dims: int = 2) -> FeatureNet:
    return build_model(name, task, NUM_CLASSES, IN_CHANNELS, width=WIDTH, spatial_dims=spatial_dims)


def _check_forward(model: FeatureNet, task: str, spatial: tuple[int, ...]) -> None:
    x = torch.randn(2, IN_CHANNELS, *spatial)
    logits, features = model(x)
    if task == "classification":
        assert logits.shape == (2, NUM_CLASSES)
        assert features.shape == (2, model.final_classifier.in_features)
    else:
        assert logits.shape == (2, NUM_CLASSES, *spatial)
        assert features.shape == (2, model.final_classifier.in_channels, *spatial)
    assert torch.equal(model.final_classifier(features), logits)


def test_model_names_per_task():
    assert MODEL_NAMES["classification"] == ("slim_vgg16", "densenet121", "efficientnet-b0", "resnet18")
    assert MODEL_NAMES["segmentation"] == ("unet", "basicunet")


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize(("task", "name"), ALL_MODELS)
def test_forward_returns_logits_and_classifier_input(task, name, mode):
    model = _tiny(task, name)
    model.train(mode == "train")
    with torch.no_grad():
        _check_forward(model, task, (32, 32))


@pytest.mark.parametrize(
    ("task", "name"),
    [("segmentation", "unet"), ("segmentation", "basicunet"), ("classification", "resnet18")],
)
def test_three_dimensional_networks(task, name):
    model = _tiny(task, name, spatial_dims=3)
    assert isinstance(model.final_classifier, nn.Linear if task == "classification" else nn.Conv3d)
    with torch.no_grad():
        _check_forward(model, task, (32, 32, 32) if task == "segmentation" else (16, 16, 16))


@pytest.mark.parametrize(("task", "name"), ALL_MODELS)
def test_config_rebuilds_the_same_architecture(task, name):
    model = _tiny(task, name)
    config = json.loads(json.dumps(model.config))  # as written into and read back from a manifest
    assert config["name"] == name and config["task"] == task
    rebuilt = build_model(**config)
    assert type(rebuilt) is type(model)
    assert rebuilt.config == model.config
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert {key: tuple(value.shape) for key, value in rebuilt.state_dict().items()} == shapes
    rebuilt.load_state_dict(model.state_dict())


@pytest.mark.parametrize(("task", "name"), ALL_MODELS)
def test_smallest_accepted_input_trains(task, name):
    model = _tiny(task, name)
    size = model.min_input_size
    model.check_input_size((size, size))
    logits, _ = model(torch.randn(2, IN_CHANNELS, size, size))
    logits.sum().backward()


def test_check_input_size_names_the_problem():
    unet = _tiny("segmentation", "unet")
    unet.check_input_size((48, 64))
    with pytest.raises(ConfigError, match="multiple of 16"):
        unet.check_input_size((40, 40))
    with pytest.raises(ConfigError, match="at least 32"):
        _tiny("classification", "slim_vgg16").check_input_size((16, 16))
    with pytest.raises(ConfigError, match="2-D"):
        unet.check_input_size((32, 32, 32))


def test_slim_vgg16_matches_the_reference_layout():
    model = build_model("slim_vgg16", "classification", num_classes=3, in_channels=3)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [c for block in VGG16_BLOCKS for c in block]
    assert all(c.bias is None and c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 13
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 5
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(256, 64), (64, 3)]
    assert model.final_classifier is linears[-1]
    assert all(m.bias is None for m in linears), "the reference network is bias-free throughout"
    assert not any(name.endswith(".bias") and "embedding.1" not in name and not name.startswith("features")
                   for name, _ in model.named_parameters())


def test_slim_vgg16_biased_variant_is_an_option_and_rebuilds_from_its_config():
    biased = build_model("slim_vgg16", "classification", num_classes=3, in_channels=3, width=0.25, bias=True)
    linears = [m for m in biased.modules() if isinstance(m, nn.Linear)]
    assert all(m.bias is not None for m in linears)
    assert biased.config["bias"] is True
    rebuilt = build_model(**biased.config)
    assert rebuilt.state_dict().keys() == biased.state_dict().keys()


def test_width_scales_every_channel_count_with_a_floor_of_four():
    model = build_model("slim_vgg16", "classification", num_classes=3, in_channels=1, width=0.25)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 8, 16, 16, 32, 32, 32, 32, 32, 32, 64, 64, 64]
    assert model.final_classifier.in_features == 16
    tiny = build_model("slim_vgg16", "classification", num_classes=3, in_channels=1, width=0.01)
    assert min(m.out_channels for m in tiny.modules() if isinstance(m, nn.Conv2d)) == 4


def test_initialisation_follows_the_global_rng():
    torch.manual_seed(7)
    first = build_model("slim_vgg16", "classification", 3, 1, width=WIDTH).state_dict()
    second = build_model("slim_vgg16", "classification", 3, 1, width=WIDTH).state_dict()
    torch.manual_seed(7)
    again = build_model("slim_vgg16", "classification", 3, 1, width=WIDTH).state_dict()
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not all(torch.equal(first[key], second[key]) for key in first)


def test_network_options_are_passed_and_recorded():
    model = build_model(
        "unet",
        "segmentation",
        NUM_CLASSES,
        IN_CHANNELS,
        width=0.25,
        channels=(8, 16, 32),
        strides=(2, 2),
        num_res_units=1,
        norm="batch",
    )
    assert model.config["channels"] == [8, 16, 32] and model.config["norm"] == "batch"
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) > 0
    assert model.input_size_multiple == 4
    _check_forward(model.eval(), "segmentation", (16, 16))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            {"name": "vgg", "task": "classification"},
            "valid names: slim_vgg16, densenet121, efficientnet-b0, resnet18",
        ),
        ({"name": "unet", "task": "classification"}, "unknown classification model 'unet'"),
        ({"name": "unet", "task": "detection"}, "valid tasks: classification, segmentation"),
        (
            {"name": "unet", "task": "segmentation", "kernel": 5},
            "unknown option.*kernel.*valid options: channels",
        ),
        ({"name": "resnet18", "task": "classification", "num_classes": 0}, "num_classes must be a positive"),
        ({"name": "resnet18", "task": "classification", "width": -1.0}, "width must be a positive"),
        ({"name": "resnet18", "task": "classification", "spatial_dims": 1}, "spatial_dims must be 2 or 3"),
    ],
)
def test_bad_arguments_raise_config_errors(arguments, message):
    arguments = {"num_classes": 3, "in_channels": 1, **arguments}
    with pytest.raises(ConfigError, match=message):
        build_model(**arguments)


@pytest.mark.parametrize(
    ("name", "monai_net"),
    [
        ("densenet121", lambda: monai_nets.DenseNet121(spatial_dims=2, in_channels=1, out_channels=3)),
        ("efficientnet-b0", lambda: monai_nets.EfficientNetBN("efficientnet-b0", pretrained=False, in_channels=1,
                                                               num_classes=3)),
        ("resnet18", lambda: monai_nets.resnet18(spatial_dims=2, n_input_channels=1, conv1_t_stride=2,
                                                 feed_forward=False)),
    ],
)  # fmt: skip
def test_full_width_bodies_are_monai_networks_without_their_last_linear(name, monai_net):
    body = build_model(name, "classification", num_classes=3, in_channels=1).body.state_dict()
    reference = {
        key: value
        for key, value in monai_net().state_dict().items()
        if not key.startswith(("_fc.", "class_layers.out."))
    }
    assert {key: value.shape for key, value in body.items()} == {
        key: value.shape for key, value in reference.items()
    }


def test_3d_unet_takes_thin_patches_and_keeps_the_head_and_features_cpa_reads():
    # prostate volumes have few slices: a 3-D patch may be thin along z as long as it is a multiple of the
    # UNet's downsampling (16) and the bottom map holds more than one voxel
    unet = _tiny("segmentation", "unet", spatial_dims=3)
    unet.check_input_size((32, 32, 16))
    with pytest.raises(ConfigError, match=r"multiple of 16.*got \(32, 32, 8\)"):
        unet.check_input_size((32, 32, 8))
    with pytest.raises(ConfigError, match="at least one edge to be 32"):
        unet.check_input_size((16, 16, 16))
    assert isinstance(unet.final_classifier, nn.Conv3d) and unet.config["spatial_dims"] == 3
    logits, features = unet(torch.randn(2, IN_CHANNELS, 32, 32, 16))
    assert logits.shape == (2, NUM_CLASSES, 32, 32, 16)
    assert features.shape == (2, unet.final_classifier.in_channels, 32, 32, 16)
    logits.sum().backward()
