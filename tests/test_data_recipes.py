"""Transform recipes: the shipped ones run on real records; bad recipes are readable ConfigErrors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from conftest import write_jpeg
from monai.data import CacheDataset, Dataset
from monai.utils import set_determinism

from medfl.data import build_dataset, load_recipe
from medfl.data.recipes import RECIPES_DIR
from medfl.errors import ConfigError


@pytest.fixture
def derm_records(tmp_path):
    return [{"image": str(write_jpeg(tmp_path / f"{i}.jpg", seed=i, size=(60, 45))), "label": i % 3,
             "id": f"img{i}", "lesion_id": None, "site": "derm_a"} for i in range(4)]


@pytest.fixture
def slice_records():
    rng = np.random.default_rng(0)
    records = []
    for i in range(4):
        label = np.zeros((1, 16, 16), np.uint8)
        label[0, 4:12, 5:11] = 1
        records.append({"image": rng.normal(size=(3, 16, 16)).astype(np.float32), "label": label,
                        "case_id": "Case01", "slice_index": i, "num_slices": 4, "site": "prost_a"})
    return records


def _write(tmp_path, recipe) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_shipped_recipes_exist():
    assert {p.stem for p in RECIPES_DIR.glob("*.yaml")} >= {
        "dermoscopy_train", "dermoscopy_eval", "prostate_train", "prostate_eval"}


@pytest.mark.parametrize("recipe", ["dermoscopy_train", "dermoscopy_eval"])
def test_dermoscopy_recipes_give_normalised_rgb_tensors_at_input_size(derm_records, recipe):
    set_determinism(0)
    dataset = build_dataset(derm_records, load_recipe(recipe, input_size=32), cache_rate=1.0, num_workers=2)
    item = dataset[1]
    assert isinstance(dataset, CacheDataset)
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert set(item) == {"image", "label", "id", "site"} and item["label"] == 1
    assert -3 < float(item["image"].mean()) < 3
    set_determinism(None)


def test_dermoscopy_train_caches_uint8_and_augments(derm_records):
    dataset = build_dataset(derm_records, load_recipe("dermoscopy_train", input_size=24))
    assert dataset._cache[0]["image"].dtype == torch.uint8
    draws = torch.stack([dataset[0]["image"] for _ in range(8)])
    assert float(draws.std(dim=0).mean()) > 0


@pytest.mark.parametrize("recipe", ["prostate_train", "prostate_eval"])
def test_prostate_recipes_keep_masks_binary(slice_records, recipe):
    set_determinism(1)
    dataset = build_dataset(slice_records, load_recipe(recipe, input_size=16), cache_rate=0.0)
    assert type(dataset) is Dataset
    for _ in range(3):
        item = dataset[0]
        assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
        assert item["label"].shape == (1, 16, 16) and item["label"].dtype == torch.uint8
        assert set(torch.unique(item["label"]).tolist()) <= {0, 1}
    set_determinism(None)


def test_variables_are_substituted_and_overridable(tmp_path):
    path = _write(tmp_path, {"variables": {"size": 8}, "transforms": [
        {"Resized": {"keys": ["image"], "spatial_size": ["@size", "@size"]}}]})
    image = torch.zeros(1, 20, 20)
    assert load_recipe(path)({"image": image})["image"].shape == (1, 8, 8)
    assert load_recipe(path, size=5)({"image": image})["image"].shape == (1, 5, 5)


@pytest.mark.parametrize(
    ("recipe", "expected"),
    [
        ({"transforms": [{"FancyFlipd": {"keys": ["image"]}}]}, r"transform 1 \(FancyFlipd\): 'FancyFlipd' is not"),
        ({"transforms": [{"RandFlipd": {"keys": ["image"], "probability": 0.5}}]},
         r"transform 1 \(RandFlipd\): argument 'probability' is not allowed for RandFlipd"),
        ({"transforms": [{"RandFlipd": {"keys": ["image"], "prob": "often"}}]},
         r"transform 1 \(RandFlipd\): bad arguments"),
        ({"transforms": [{"Resized": {"keys": ["image"], "spatial_size": "@size"}}]}, "unknown variable '@size'"),
        ({"transforms": [{"LoadImaged": {"keys": ["image"], "reader": "os.system"}}]}, "looks like an import path"),
        ({"transforms": [{"Compose": {}}]}, "'Compose' is not a transform recipes may use"),
        ({"transforms": [{"RandFlipd": {}, "RandRotated": {}}]}, "transform 1 must be a mapping of one"),
        ({"transforms": []}, "non-empty list"),
        ({"transform": []}, "unknown key 'transform'"),
    ],
)
def test_bad_recipes_name_file_and_entry(tmp_path, recipe, expected):
    path = _write(tmp_path, recipe)
    with pytest.raises(ConfigError, match=expected) as caught:
        load_recipe(path)
    assert path in str(caught.value)


def test_missing_recipe_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match="transform recipe not found .*dermoscopy_eval"):
        load_recipe("no_such_recipe")


def test_batches_collate(derm_records, slice_records):
    from monai.data import DataLoader

    derm = next(iter(DataLoader(build_dataset(derm_records, load_recipe("dermoscopy_eval", input_size=16)),
                                batch_size=4)))
    assert derm["image"].shape == (4, 3, 16, 16) and derm["label"].tolist() == [0, 1, 2, 0]
    prostate = next(iter(DataLoader(build_dataset(slice_records, load_recipe("prostate_eval")), batch_size=4)))
    assert prostate["label"].shape == (4, 1, 16, 16) and prostate["slice_index"].tolist() == [0, 1, 2, 3]
    assert prostate["case_id"] == ["Case01"] * 4


def test_uncached_training_draws_leave_the_records_untouched(slice_records):
    originals = [(r["image"].copy(), r["label"].copy()) for r in slice_records]
    dataset = build_dataset(slice_records, load_recipe("prostate_train", input_size=16), cache_rate=0.0)
    for _ in range(5):
        for i in range(len(dataset)):
            dataset[i]
    for record, (image, label) in zip(slice_records, originals, strict=True):
        np.testing.assert_array_equal(record["image"], image)
        np.testing.assert_array_equal(record["label"], label)


@pytest.mark.parametrize("recipe", ["dermoscopy_train", "prostate_train"])
def test_training_draws_never_write_into_the_cache(derm_records, slice_records, recipe):
    """build_dataset reads the cache without copying each item: the random tail must return new arrays."""
    from monai.data import DataLoader

    records = derm_records if recipe.startswith("dermoscopy") else slice_records
    dataset = build_dataset(records, load_recipe(recipe, input_size=16), cache_rate=1.0)
    cached = [{key: torch.as_tensor(value).clone() for key, value in item.items() if key in ("image", "label")
               and not isinstance(value, int)} for item in dataset._cache]
    dataset.transform.set_random_state(seed=3)
    for _ in range(6):
        for batch in DataLoader(dataset, batch_size=2, shuffle=True):
            batch["image"] += 1.0  # what a careless caller could do to a batch
    for item, before in zip(dataset._cache, cached, strict=True):
        for key, value in before.items():
            assert torch.equal(torch.as_tensor(item[key]), value), key
