"""3-D prostate segmentation (data.dims 3): config, volume records and recipes, the task on a tiny federation,
what `medfl check` says, and the commands that refuse 3-D runs for now."""

from __future__ import annotations

import pytest

from medfl.config import DataSettings, validate_model
from medfl.errors import ConfigError
from medfl.experiment import ExperimentConfig

_BASE = {"task": "segmentation", "sites": ["site.yaml"], "model": {"name": "unet"}}


def _experiment(**changes) -> ExperimentConfig:
    return validate_model(ExperimentConfig, {**_BASE, **changes}, "exp.yaml")


# ---- config ------------------------------------------------------------------------------------------------

def test_two_d_stays_the_default_and_three_d_fills_its_defaults() -> None:
    flat = _experiment()
    assert flat.data.dims == 2 and flat.data.spacing is None and flat.evaluation.sw_overlap is None
    volume = _experiment(data={"dims": 3})
    assert volume.data.spacing == (2.0, 2.0, 3.0) and volume.data.patch_size == (64, 64, 16)
    assert (volume.data.patches_per_volume, volume.data.foreground_ratio) == (2, 0.5)
    assert (volume.evaluation.sw_overlap, volume.evaluation.sw_mode, volume.evaluation.sw_batch_size) == (
        0.25, "constant", 2)
    assert volume.data.recipe("segmentation", "train") == "prostate3d_train"
    assert flat.data.recipe("segmentation", "eval") == "prostate_eval"
    # a 3-D run's config.yaml states its defaults and reads back as the same config
    assert validate_model(ExperimentConfig, volume.resolved(), "exp.yaml").resolved() == volume.resolved()


@pytest.mark.parametrize(("changes", "message"), [
    ({"data": {"spacing": [1, 1, 1]}}, "'spacing' applies to 3-D experiments only"),
    ({"data": {"patch_size": [32, 32, 16]}}, "'patch_size' applies to 3-D experiments only"),
    ({"evaluation": {"sw_mode": "gaussian"}}, "'evaluation.sw_mode' applies to 3-D experiments only"),
    ({"data": {"dims": 3, "patch_size": [64, 64, 20]}},
     r"key 'data.patch_size' \[64, 64, 20\]: edge z \(20\) is not a multiple of 16"),
    ({"data": {"dims": 3, "patch_size": [32, 32, 8]}, "model": {"name": "unet", "options": {"strides": [2, 2, 2]}}},
     None),
    ({"data": {"dims": 3, "patch_size": [32, 32, 8]}, "model": {"name": "basicunet"}}, r"edge z \(8\).*of 16"),
    ({"data": {"dims": 3, "context_slices": 1}}, "'context_slices' \\(1\\) is 2.5-D input"),
    ({"data": {"dims": 3, "spacing": [0, 1, 1]}}, "every spacing must be above 0"),
    ({"data": {"dims": 3}, "evaluation": {"sw_overlap": 1.0}}, "evaluation.sw_overlap"),
])
def test_three_d_keys_are_validated(changes, message) -> None:
    if message is None:
        assert _experiment(**changes).data.patch_size == tuple(changes["data"]["patch_size"])
        return
    with pytest.raises(ConfigError, match=message):
        _experiment(**changes)


def test_three_d_is_for_segmentation_only() -> None:
    with pytest.raises(ConfigError, match="data.dims 3 is for segmentation experiments only"):
        validate_model(ExperimentConfig, {"task": "classification", "sites": ["s.yaml"],
                                          "data": {"dims": 3, "classes": ["a", "b"]}}, "exp.yaml")
    assert validate_model(DataSettings, {"dims": 3}, "options").patch_size == (64, 64, 16)
