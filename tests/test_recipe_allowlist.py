"""Recipes may only name MONAI transforms that neither read nor write files beyond their input: SaveImaged,
`reader: open` (which once emptied an arbitrary file), free keyword arguments and callables are refused, in a
recipe file, a shipped recipe name, an experiment's recipe and every shipped recipe still passes."""

from __future__ import annotations

import inspect

import monai.transforms
import pytest
import yaml

from medfl.data import load_recipe, resolve_recipe
from medfl.data import recipes as recipes_module
from medfl.data.safe_transforms import ALLOWED_TRANSFORMS, LOAD_READERS
from medfl.errors import ConfigError

SHIPPED = ("dermoscopy_train", "dermoscopy_eval", "prostate_train", "prostate_eval", "prostate3d_train", "prostate3d_eval")


def _write(path, *steps):
    path.write_text(yaml.safe_dump({"transforms": list(steps)}))
    return path


def _victim(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    return victim


def _attacks(tmp_path):
    """(step, fragment of the refusal) pairs: each would read or write a file beyond the input."""
    victim, elsewhere = _victim(tmp_path), tmp_path / "copies"
    return [
        ({"SaveImaged": {"keys": ["image"], "output_dir": str(elsewhere)}}, "'SaveImaged' is not a transform"),
        ({"SaveImage": {"output_dir": str(elsewhere)}}, "'SaveImage' is not a transform"),
        ({"LoadImaged": {"keys": ["image"], "reader": "open", "file": str(victim), "mode": "w"}},
         "argument 'file' is not allowed for LoadImaged"),
        ({"LoadImaged": {"keys": ["image"], "reader": "open"}}, "reader 'open' is not allowed"),
        ({"LoadImaged": {"keys": ["image"], "reader": ["PILReader", "NumpyReader"]}}, "reader 'NumpyReader'"),
        ({"LoadImaged": {"keys": ["image"], "reader": "NumpyReader", "allow_pickle": True}},
         "argument 'allow_pickle' is not allowed"),
        ({"LoadImaged": {"keys": ["id"], "reader": "PILReader"}}, "may only load the record's 'image' file"),
        ({"Lambdad": {"keys": ["image"], "func": "print"}}, "'Lambdad' is not a transform"),
        ({"CropForegroundd": {"keys": ["image"], "source_key": "image", "select_fn": "exec"}},
         "argument 'select_fn' is not allowed"),
        ({"SpatialPadd": {"keys": ["image"], "spatial_size": [8, 8], "kwargs": {"mode": "constant"}}},
         "argument 'kwargs' is not allowed"),
        ({"RandFlipd": {"keys": ["image"], "prob": {1, 2}}}, "must be plain data"),
    ]


def test_attacks_are_refused_naming_file_step_and_transform(tmp_path):
    for number, (step, expected) in enumerate(_attacks(tmp_path)):
        harmless = {"EnsureTyped": {"keys": ["image"]}}
        path = _write(tmp_path / f"evil_{number}.yaml", harmless, step)
        name = next(iter(step))
        with pytest.raises(ConfigError, match=expected) as caught:
            load_recipe(path)
        assert f"{path}: transform 2 ({name})" in str(caught.value)
        with pytest.raises(ConfigError, match=expected):
            resolve_recipe(path)
    assert (tmp_path / "victim.txt").read_text() == "keep me\n"
    assert not (tmp_path / "copies").exists()


def test_a_recipe_named_like_a_shipped_one_is_checked_too(tmp_path, monkeypatch):
    _write(tmp_path / "dermoscopy_eval.yaml", {"SaveImaged": {"keys": ["image"], "output_dir": str(tmp_path)}})
    monkeypatch.setattr(recipes_module, "RECIPES_DIR", tmp_path)
    with pytest.raises(ConfigError, match="dermoscopy_eval.yaml: transform 1 \\(SaveImaged\\)"):
        load_recipe("dermoscopy_eval")


def test_a_variable_cannot_smuggle_a_reader(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"variables": {"r": "open"},
                                    "transforms": [{"LoadImaged": {"keys": ["image"], "reader": "@r"}}]}))
    with pytest.raises(ConfigError, match="reader 'open' is not allowed"):
        load_recipe(path)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_passes(name):
    assert load_recipe(name, input_size=16).transforms


def test_the_allow_list_names_real_transforms_and_their_real_arguments():
    for name, arguments in ALLOWED_TRANSFORMS.items():
        cls = getattr(monai.transforms, name)
        parameters = inspect.signature(cls.__init__).parameters
        named = {p for p, spec in parameters.items() if spec.kind not in (spec.VAR_KEYWORD, spec.VAR_POSITIONAL)}
        assert arguments <= named, (name, sorted(arguments - named))
        assert not name.startswith(("Save", "Lambda", "Write"))
        assert not arguments & {"kwargs", "args", "pad_kwargs", "func", "select_fn", "writer", "output_dir"}
    assert all(getattr(__import__("monai.data", fromlist=[r]), r) for r in LOAD_READERS)


def test_an_experiment_recipe_that_writes_files_stops_the_run_before_training(tmp_path, tiny_federation, capsys):
    from conftest import tiny_experiment

    from medfl.cli import main

    evil = _write(tmp_path / "evil.yaml", {"LoadImaged": {"keys": ["image"], "reader": "PILReader"}},
                  {"SaveImaged": {"keys": ["image"], "output_dir": str(tmp_path / "copies")}})
    config = tiny_experiment(tmp_path / "exp.yaml", tiny_federation, "classification",
                             data={"train_recipe": str(evil)})
    assert main(["run", str(config), "--out", str(tmp_path / "run")]) == 1
    assert f"{evil}: transform 2 (SaveImaged)" in capsys.readouterr().err
    assert not (tmp_path / "copies").exists()


@pytest.mark.parametrize(("arguments", "variables", "shown"), [
    ({"mode": "$area"}, {}, "'$area' starts with '$'"),
    ({"mode": "@m"}, {"m": "$__import__('os').getcwd()"}, "starts with '$'"),
    ({"mode": ["%other.yaml#mode"]}, {}, "'%other.yaml#mode' starts with '%'"),
])
def test_a_value_monai_would_read_as_an_expression_is_refused_at_validation(tmp_path, arguments, variables, shown):
    """A `$` value once reached MONAI and failed on every image with a message printing an object address."""
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"variables": variables, "transforms": [
        {"EnsureChannelFirstd": {"keys": ["image"]}},
        {"Resized": {"keys": ["image"], "spatial_size": [16, 16], **arguments}}]}))
    with pytest.raises(ConfigError) as caught:
        resolve_recipe(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: transform 2 (Resized): argument 'mode': value ") and shown in message
    assert len(message.splitlines()) == 1 and " at 0x" not in message
