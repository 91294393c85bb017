"""Site configs and data settings: validation, path resolution, environment variables, readable errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from medfl.config import DataSettings, SiteConfig, load_site_config, load_yaml_mapping, validate_model
from medfl.errors import ConfigError

SEGMENTATION = {"name": "prost_a", "task": "segmentation", "data_root": "data/prost_a", "layout": "nifti"}
CLASSIFICATION = {"name": "derm_a", "task": "classification", "data_root": "data/derm_a", "layout": "ham10000",
                  "label_map": {"nv": "nv", "mel": "mel", "bkl": "bkl", "akiec": None}}


def test_paths_resolve_against_the_config_folder_and_tables_against_data_root(tmp_path, write_config):
    path = write_config({**CLASSIFICATION, "split_file": "splits/derm_a.csv", "table": "meta/table.csv"})
    site = load_site_config(path)
    assert site.source_path == path.resolve()
    assert site.data_root == (path.parent / "data/derm_a").resolve()
    assert site.split_path == (path.parent / "splits/derm_a.csv").resolve()
    assert site.table_path == site.data_root / "meta/table.csv"


def test_layout_default_tables_and_isic_metadata_only_when_present(tmp_path, write_config):
    assert load_site_config(write_config(CLASSIFICATION)).table_path.name == "HAM10000_metadata.csv"
    isic = {**CLASSIFICATION, "layout": "isic2019", "label_map": {"NV": "nv", "MEL": "mel"}}
    site = load_site_config(write_config(isic))
    assert site.table_path.name == "ISIC_2019_Training_GroundTruth.csv"
    assert site.metadata_path is None
    site.data_root.mkdir(parents=True)
    (site.data_root / "ISIC_2019_Training_Metadata.csv").write_text("image,lesion_id\n")
    assert site.metadata_path == site.data_root / "ISIC_2019_Training_Metadata.csv"


def test_environment_variables_are_expanded_in_paths(tmp_path, write_config, monkeypatch):
    monkeypatch.setenv("MEDFL_TEST_DATA", str(tmp_path / "somewhere"))
    monkeypatch.setenv("SITE", "prost_b")
    site = load_site_config(write_config({**SEGMENTATION, "data_root": "${MEDFL_TEST_DATA}/$SITE"}))
    assert site.data_root == tmp_path / "somewhere" / "prost_b"


def test_unset_environment_variable_names_variable_and_file(write_config, monkeypatch):
    monkeypatch.delenv("MEDFL_UNSET_VARIABLE", raising=False)
    path = write_config({**SEGMENTATION, "data_root": "${MEDFL_UNSET_VARIABLE}/x"})
    with pytest.raises(ConfigError, match="MEDFL_UNSET_VARIABLE") as caught:
        load_site_config(path)
    assert str(path) in str(caught.value) and "prost_a" in str(caught.value)


def test_misspelt_key_names_key_file_and_suggestion(write_config):
    path = write_config({**CLASSIFICATION, "lable_map": {}})
    with pytest.raises(ConfigError) as caught:
        load_site_config(path)
    message = str(caught.value)
    assert "unknown key 'lable_map'" in message and "did you mean 'label_map'" in message and str(path) in message


def test_misspelt_nested_key_is_named_with_its_section(write_config):
    path = write_config({**CLASSIFICATION, "filter": {"column": "dataset", "valeus": ["x"]}})
    with pytest.raises(ConfigError, match=r"unknown key 'filter\.valeus' \(did you mean 'values'\?\)"):
        load_site_config(path)


def test_duplicate_yaml_key_is_an_error(tmp_path):
    path = tmp_path / "site.yaml"
    path.write_text("name: a\nname: b\n")
    with pytest.raises(ConfigError, match="key 'name' is given twice"):
        load_yaml_mapping(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("name: [unclosed\n", "invalid YAML"), ("- a\n- b\n", "expected a mapping")],
)
def test_unreadable_yaml_is_a_config_error(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected):
        load_yaml_mapping(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_site_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"layout": "ham10000"}, "not a segmentation layout"),
        ({"label_map": {"nv": "nv"}}, "key 'label_map' does not apply to a segmentation site"),
        ({"name": "bad name"}, "key 'name'"),
        ({"task": "detection"}, "key 'task'"),
        ({"mask_suffix": " "}, "key 'mask_suffix': must not be empty"),
    ],
)
def test_invalid_segmentation_configs(write_config, changes, expected):
    with pytest.raises(ConfigError, match=expected):
        load_site_config(write_config({**SEGMENTATION, **changes}, name="site.yaml"))


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"mask_suffix": "_seg"}, "key 'mask_suffix' does not apply to a classification site"),
        ({"label_map": {}}, "needs a non-empty 'label_map'"),
        ({"label_map": {"nv": None}}, "every label to null"),
        ({"metadata_table": "meta.csv"}, "isic2019 layout only"),
        ({"layout": "nifti"}, "not a classification layout"),
    ],
)
def test_invalid_classification_configs(write_config, changes, expected):
    with pytest.raises(ConfigError, match=expected):
        load_site_config(write_config({**CLASSIFICATION, **changes}))


def test_label_targets_in_first_seen_order_without_nulls():
    site = SiteConfig.model_validate({**CLASSIFICATION, "label_map": {"a": "mel", "b": None, "c": "nv", "d": "mel"}})
    assert site.label_targets() == ["mel", "nv"]
    assert SiteConfig.model_validate(SEGMENTATION).label_targets() == ["background", "prostate"]


def test_config_built_in_code_keeps_relative_paths():
    site = SiteConfig.model_validate(SEGMENTATION)
    assert site.source_path is None and site.data_root == Path("data/prost_a")
    assert site.effective_mask_suffix == "_segmentation"


def test_data_settings_defaults_and_recipes():
    settings = DataSettings()
    assert settings.split_fractions == (0.7, 0.1, 0.2) and settings.split_seed == 0 and settings.input_size == 64
    assert settings.classes is None and settings.slices == "all" and settings.context_slices == 0
    assert settings.recipe("classification", "train") == "dermoscopy_train"
    assert settings.recipe("segmentation", "eval") == "prostate_eval"
    assert DataSettings(train_recipe="my.yaml").recipe("segmentation", "train") == "my.yaml"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"split_fractions": [0.6, 0.1, 0.2]}, "must sum to 1"),
        ({"split_fractions": [0.9, 0.0, 0.1]}, "validation fractions must be positive"),
        ({"classes": ["nv", "nv", "mel"]}, "class 'nv' is listed twice"),
        ({"classes": ["nv"]}, "at least two classes"),
        ({"slices": "some"}, "key 'slices'"),
        ({"cache_rat": 1.0}, "unknown key 'cache_rat' \\(did you mean 'cache_rate'\\?\\)"),
    ],
)
def test_invalid_data_settings_name_the_key(data, expected):
    with pytest.raises(ConfigError, match=expected):
        validate_model(DataSettings, data, "experiment.yaml")
