"""`medfl export --format bundle`: a MONAI bundle per site that `python -m monai.bundle run` runs where medfl
cannot be imported, whose outputs equal `medfl predict`'s (masks voxel for voxel on the input's grid, NIfTI and
MetaImage; probabilities within 1e-5), whose network passes `verify_net_in_out`, whose metadata has every key
MONAI's bundle specification makes mandatory, and whose configs name MONAI components and a known handful of
expressions only. On folders as hospitals keep them: the site's masks beside the volumes are left out (and the
run says so); a folder holding an image that is not RGB stops the run with one line naming it, before anything
is written; a replaced model file stops the run with one line before it is loaded."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import tomllib
import torch
from PIL import Image
from test_export import tiny_runs

from medfl.cli import main
from medfl.deliver import export_run, load_export, predict
from medfl.deliver.monai_bundle import image_transforms, quiet_jit, volume_transforms
from medfl.errors import ConfigError
from medfl.tasks import task_for

pytestmark = pytest.mark.slow
for runner_package in ("ignite", "fire", "itk"):  # medfl's [bundle] extra, which `make install` installs
    pytest.importorskip(runner_package, reason="the bundle runner's packages: pip install 'medfl[bundle]'")

ROOT = Path(__file__).resolve().parents[1]
# MONAI's bundle specification (docs/source/mb_specification.rst), for metadata schema meta_schema_20240725.json:
# the mandatory keys of metadata.json, and of every tensor format specifier in network_data_format.
MANDATORY = {"version", "monai_version", "pytorch_version", "numpy_version", "required_packages_version", "task",
             "description", "authors", "copyright", "network_data_format"}
TENSOR = {"type", "format", "modality", "num_channels", "spatial_shape", "dtype", "value_range", "is_patch_data",
          "channel_def"}
# Every "$" expression the configs may hold: what the bundle format needs and the bundle's own checks (the
# model's sha256, the inputs), nothing else.
EXPRESSIONS = {
    "$import glob", "$import os", "$import sys", "$from monai.apps.utils import check_hash", "$from PIL import Image",
    "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
    "$os.path.join(@bundle_root, 'models', 'model.ts')",
    "$os.path.join(@bundle_root, 'configs', 'metadata.json')",
    "$(monai.bundle.ConfigParser.load_config_file(@metadata_file) if os.path.isfile(@metadata_file) else {})"
    ".get('sha256', {}).get('models/model.ts')",
    "$@model_file if @model_sha256 and check_hash(@model_file, @model_sha256, 'sha256') else sys.exit(@model_file + "
    "(': not found' if not os.path.isfile(@model_file) else ': differs from the sha256 that ' + @metadata_file + ' "
    "records: the model file is damaged or was replaced' if @model_sha256 else ': ' + @metadata_file + ' records no "
    "sha256 of it') + '; nothing was run (export the bundle again)')",
    "$@network_def.to(@device)",
    "$sorted({path for ext in @input_exts for path in glob.glob(os.path.join(glob.escape(@input_dir), '*' + ext))})",
    "$lambda path: 'not a JPEG or PNG file' if not open(path, 'rb').read(8).hex().startswith(tuple(@image_signatures)) "
    "else None if Image.open(path).mode == 'RGB' else 'image mode is ' + Image.open(path).mode + ', but the model "
    "takes RGB colour images'",
    "$[path + ': ' + problem for path, problem in ((path, @input_problem(path)) for path in @datalist) if problem]",
    "$sys.exit(@input_problems[0] + ' (' + str(len(@input_problems)) + ' of the ' + str(len(@datalist)) + ' files "
    "cannot be predicted); nothing was predicted: the input folder must hold RGB JPEG or PNG images only') if "
    "@input_problems else None",
    "$sorted(glob.glob(os.path.join(glob.escape(@input_dir), '*' + @input_ext)))",
    "$[path for path in @input_files if os.path.basename(path)[:-len(@input_ext)].lower().endswith("
    "@mask_suffix.lower()) and len(os.path.basename(path)) > len(@input_ext) + len(@mask_suffix)]",
    "$[path for path in @input_files if path not in @left_out]",
    "$print('Left out ' + str(len(@left_out)) + ' file(s) whose name ends in the mask suffix ' + repr(@mask_suffix) + "
    "' (masks, not volumes; --mask_suffix sets another): ' + ', '.join(os.path.basename(path) for path in @left_out)) "
    "if @left_out else None",
    "$[{'image': path, 'filename_or_obj': path} for path in @datalist]",
    "$[{'image': path} for path in @datalist]",
    "$@input_report", "$@evaluator.run()",
}

# Runs `python -m monai.bundle` commands (a JSON list of [working folder, arguments]) in one process where
# importing medfl fails, as in an environment with MONAI and torch but without medfl. How each ended (its exit
# status as `python -m monai.bundle` would return it, and the message of a SystemExit, which Python prints on
# stderr without a traceback, or the exception that would end it with a traceback) goes as a JSON list into
# the file named by the second argument.
RUNNER = """
import json, os, runpy, sys, traceback
sys.modules["medfl"] = None
try:
    import medfl
except ImportError:
    print("medfl is not importable")
else:
    raise SystemExit("medfl is importable")
commands, target, outcomes = json.loads(sys.argv[1]), sys.argv[2], []
for folder, arguments in commands:
    os.chdir(folder)
    sys.argv = ["python -m monai.bundle", *arguments]
    try:
        runpy.run_module("monai.bundle", run_name="__main__")
        outcomes.append({"status": 0, "message": None})
    except SystemExit as stop:
        text = isinstance(stop.code, str)
        outcomes.append({"status": 1 if text else stop.code or 0, "message": stop.code if text else None})
    except Exception as error:
        traceback.print_exc()
        outcomes.append({"status": 1, "traceback": type(error).__name__ + ": " + str(error)})
with open(target, "w") as stream:
    json.dump(outcomes, stream)
"""

_C, _S = math.cos(math.radians(20)), math.sin(math.radians(20))
OBLIQUE = (-_C, -_S, 0.0, -_S, _C, 0.0, 0.0, 0.0, -1.0)  # rotated about z, left-right and up-down flipped
SWAPPED = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0)  # rows and columns exchanged


def _phantom(seed: int) -> np.ndarray:
    volume = np.random.default_rng(seed).normal(100.0, 2.0, (6, 20, 24)).astype(np.float32)
    volume[1:5, 4:12, 5:15] += 100.0
    return volume


def _write_volumes(folder: Path, extension: str, case: Path) -> list[Path]:
    """A real case of a site that did not train the model with its mask beside it (as the public layout keeps
    them; that site's suffix `_Segmentation`), and phantoms in oblique and swapped frames. A NIfTI case carries
    qform and sform codes 2 (aligned to another scan), which `medfl predict` keeps and MONAI's writer does not."""
    folder.mkdir(parents=True)
    name = case.name.split(".")[0]
    sitk.WriteImage(sitk.ReadImage(str(case)), str(folder / f"{name}{extension}"))
    mask = case.with_name(f"{name}_Segmentation.nii.gz")
    sitk.WriteImage(sitk.ReadImage(str(mask)), str(folder / f"{name}_Segmentation{extension}"))
    if extension == ".nii.gz":
        image = nib.load(folder / f"{name}{extension}")
        image.set_qform(image.affine, code=2)
        image.set_sform(image.affine, code=2)
        nib.save(image, folder / f"{name}{extension}")
    for name, direction, seed in (("oblique", OBLIQUE, 1), ("swapped", SWAPPED, 2)):
        image = sitk.GetImageFromArray(_phantom(seed))
        image.SetSpacing((0.7, 0.9, 3.0))
        image.SetOrigin((-12.5, 30.0, 7.25))
        image.SetDirection(direction)
        sitk.WriteImage(image, str(folder / f"{name}{extension}"))
    return sorted(folder.glob(f"*{extension}"))


def _volumes(folder: Path, extension: str) -> list[Path]:
    """The volumes of an input folder, without the masks beside them."""
    return [path for path in sorted(folder.glob(f"*{extension}")) if "_segmentation" not in path.name.lower()]


def _constant_program(path: Path) -> None:
    """A TorchScript model that answers the same logits whatever the image: what a replaced model.ts could be."""

    class Constant(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.zeros(x.shape[0], 3) + torch.tensor([0.0, 0.0, 5.0])

    torch.jit.save(quiet_jit(torch.jit.trace, Constant(), torch.zeros(2, 3, 32, 32)), str(path))


def _files(folder: Path) -> dict[Path, int]:
    return {path: path.stat().st_mtime_ns for path in folder.rglob("*")}


@pytest.fixture(scope="module")
def delivered(tmp_path_factory):
    """Both runs exported as medfl exports (for predict) and as bundles; inputs; predict's and the bundles'
    outputs, the bundles run once in a subprocess where medfl cannot be imported."""
    runs = tiny_runs(tmp_path_factory)
    base = tmp_path_factory.mktemp("monai_bundle")
    bundles = {
        "derm": export_run(runs["classification"], out=base / "bundles", sites=["derm_a"], export_format="bundle",
                           task=task_for("classification"))[0],
        "prostate": export_run(runs["segmentation"], out=base / "bundles", export_format="bundle",
                               task=task_for("segmentation"))[0],
    }
    exports = {
        "derm": load_export(export_run(runs["classification"], out=base / "exports", sites=["derm_a"],
                                         task=task_for("classification"))[0].folder),
        "prostate": load_export(export_run(runs["segmentation"], out=base / "exports", task=task_for("segmentation"))[0].folder),
    }
    federation = runs["federation"]
    inputs = {"images": base / "in" / "images"}
    inputs["images"].mkdir(parents=True)
    for path in sorted((federation / "dermoscopy" / "derm_b").rglob("*.jpg"))[:6]:
        shutil.copy(path, inputs["images"] / path.name)
    case = sorted((federation / "prostate" / "prost_b").glob("Case0?.nii.gz"))[0]
    for extension in (".nii.gz", ".mhd"):
        inputs[extension] = base / "in" / extension.strip(".")
        _write_volumes(inputs[extension], extension, case)

    inputs["not rgb"] = base / "in" / "not_rgb"
    inputs["not rgb"].mkdir()
    for path in sorted(inputs["images"].iterdir())[:2]:
        shutil.copy(path, inputs["not rgb"] / path.name)
    Image.new("L", (40, 30), 90).save(inputs["not rgb"] / "grey.png")
    Image.new("RGBA", (40, 30), (90, 60, 30, 255)).save(inputs["not rgb"] / "rgba.png")
    swapped = base / "swapped"
    shutil.copytree(bundles["derm"].folder, swapped)
    _constant_program(swapped / "models" / "model.ts")

    predicted = {key: base / "predict" / key for key in ("images", ".nii.gz", ".mhd")}
    predict(exports["derm"], sorted(inputs["images"].iterdir()), predicted["images"])
    for extension in (".nii.gz", ".mhd"):
        results = predict(exports["prostate"], _volumes(inputs[extension], extension), predicted[extension])
        assert all(result.error is None for result in results)

    ran = {key: base / "bundle_out" / key for key in ("images", ".nii.gz", ".mhd", "not rgb", "swapped")}
    derm, prostate = str(bundles["derm"].folder), str(bundles["prostate"].folder)
    verify = ["verify_net_in_out", "network_def", "--meta_file", "configs/metadata.json",
              "--config_file", "configs/inference.json"]
    commands = [
        [derm, ["run", "--config_file", "configs/inference.json", "--input_dir", str(inputs["images"]),
                "--output_dir", str(ran["images"])]],
        [derm, verify],
        [prostate, ["run", "--config_file", "configs/inference.json", "--input_dir", str(inputs[".nii.gz"]),
                    "--output_dir", str(ran[".nii.gz"])]],
        # from elsewhere: the config's path and --bundle_root
        [str(base), ["run", "--config_file", f"{prostate}/configs/inference.json", "--bundle_root", prostate,
                     "--input_dir", str(inputs[".mhd"]), "--output_dir", str(ran[".mhd"]), "--input_ext", ".mhd"]],
        [prostate, verify],
        [derm, ["run", "--config_file", "configs/inference.json", "--input_dir", str(inputs["not rgb"]),
                "--output_dir", str(ran["not rgb"])]],
        [str(swapped), ["run", "--config_file", "configs/inference.json", "--input_dir", str(inputs["images"]),
                        "--output_dir", str(ran["swapped"])]],
    ]
    before = {key: _files(bundle.folder) for key, bundle in bundles.items()} | {"in": _files(base / "in")}
    outcomes = base / "outcomes.json"
    completed = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(commands), str(outcomes)],
                               capture_output=True, text=True, cwd=base, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    after = {key: _files(bundle.folder) for key, bundle in bundles.items()} | {"in": _files(base / "in")}
    return {"runs": runs, "bundles": bundles, "exports": exports, "inputs": inputs, "predicted": predicted,
            "ran": ran, "log": completed.stdout + completed.stderr, "before": before, "after": after,
            "outcomes": json.loads(outcomes.read_text())}


def test_the_bundles_ran_without_medfl_and_verify_net_in_out_passed(delivered):
    log = delivered["log"]
    assert [outcome["status"] for outcome in delivered["outcomes"]][:5] == [0] * 5
    assert "medfl is not importable" in log
    assert log.count("data shape of network is verified with no error") == 2
    assert delivered["before"] == delivered["after"]  # nothing written into the bundles or the input folders


@pytest.mark.parametrize("extension", [".nii.gz", ".mhd"])
def test_masks_equal_medfl_predicts_voxel_for_voxel_on_the_inputs_grid(delivered, extension):
    predicted, ran = delivered["predicted"][extension], delivered["ran"][extension]
    masks = sorted(p.name for p in predicted.glob(f"*_mask{extension}"))
    assert len(masks) == 3 and sorted(p.name for p in ran.glob(f"*_mask{extension}")) == masks  # no mask of a mask
    case = next(p.name for p in delivered["inputs"][extension].glob(f"*_Segmentation{extension}"))
    assert (f"Left out 1 file(s) whose name ends in the mask suffix '_segmentation' (masks, not volumes; "
            f"--mask_suffix sets another): {case}") in delivered["log"]
    for name in masks:
        mine, theirs = sitk.ReadImage(str(predicted / name)), sitk.ReadImage(str(ran / name))
        source = sitk.ReadImage(str(delivered["inputs"][extension] / name.replace("_mask", "")))
        for image in (theirs, source):
            assert image.GetSize() == mine.GetSize()
            np.testing.assert_allclose(image.GetSpacing(), mine.GetSpacing(), rtol=0, atol=1e-9)
            np.testing.assert_allclose(image.GetOrigin(), mine.GetOrigin(), rtol=0, atol=1e-9)
            np.testing.assert_allclose(image.GetDirection(), mine.GetDirection(), rtol=0, atol=1e-9)
        voxels = sitk.GetArrayFromImage(mine)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(theirs), voxels)
        assert voxels.any() and set(np.unique(voxels).tolist()) <= {0, 1}
        if extension == ".nii.gz":
            np.testing.assert_allclose(nib.load(ran / name).affine, nib.load(predicted / name).affine, rtol=0, atol=1e-6)
            np.testing.assert_array_equal(np.asarray(nib.load(ran / name).dataobj),
                                          np.asarray(nib.load(predicted / name).dataobj))


def test_nifti_masks_of_the_bundle_carry_codes_1_where_predict_keeps_the_inputs(delivered):
    """What docs/bundle.md states: MONAI's NIfTI writer sets qform and sform codes to 1; the affine is the same."""
    source = next(p for p in _volumes(delivered["inputs"][".nii.gz"], ".nii.gz") if p.name.startswith("Case"))
    mask = source.name.replace(".nii.gz", "_mask.nii.gz")
    codes = {key: (int(image.header["qform_code"]), int(image.header["sform_code"])) for key, image in (
        ("input", nib.load(source)), ("predict", nib.load(delivered["predicted"][".nii.gz"] / mask)),
        ("bundle", nib.load(delivered["ran"][".nii.gz"] / mask)))}
    assert codes == {"input": (2, 2), "predict": (2, 2), "bundle": (1, 1)}
    docs = " ".join((ROOT / "docs" / "bundle.md").read_text().split())
    assert "qform and sform codes" in docs and "the codes differ" in docs


def test_an_image_that_is_not_rgb_stops_the_bundle_with_one_line_before_anything_is_written(delivered):
    """The stated choice (docs/bundle.md): fail before writing anything, naming the first such file."""
    outcome = delivered["outcomes"][5]
    folder = delivered["inputs"]["not rgb"]
    assert outcome == {"status": 1, "message": f"{folder / 'grey.png'}: image mode is L, but the model takes RGB "
                       "colour images (2 of the 4 files cannot be predicted); nothing was predicted: the input folder "
                       "must hold RGB JPEG or PNG images only"}
    assert not delivered["ran"]["not rgb"].exists()


def test_a_replaced_model_stops_the_bundle_before_it_is_loaded(delivered):
    outcome = delivered["outcomes"][6]
    assert outcome == {"status": 1, "message": "./models/model.ts: differs from the sha256 that "
                       "./configs/metadata.json records: the model file is damaged or was replaced; nothing was run "
                       "(export the bundle again)"}
    assert not delivered["ran"]["swapped"].exists()


def test_probabilities_equal_medfl_predicts_within_1e5(delivered):
    with open(delivered["predicted"]["images"] / "predictions.csv", newline="") as stream:
        expected = {Path(row["image"]).name: [float(row[f"prob_{c}"]) for c in ("nv", "bkl", "mel")]
                    for row in csv.DictReader(stream)}
    with open(delivered["ran"]["images"] / "predictions.csv", newline="") as stream:
        got = {Path(row[0]).name: [float(value) for value in row[1:]] for row in csv.reader(stream)}
    assert len(expected) == 6 and got.keys() == expected.keys()
    for name, probabilities in expected.items():
        np.testing.assert_allclose(got[name], probabilities, rtol=0, atol=1e-5)


@pytest.mark.parametrize("key", ["derm", "prostate"])
def test_metadata_has_monais_mandatory_keys_and_medfls_provenance(delivered, key):
    bundle = delivered["bundles"][key]
    meta = json.loads((bundle.folder / "configs" / "metadata.json").read_text())
    assert meta["schema"].endswith("/meta_schema_20240725.json")
    assert MANDATORY <= meta.keys()
    for kind in ("inputs", "outputs", "post_processed_outputs"):
        for tensor in meta["network_data_format"][kind].values():
            assert TENSOR <= tensor.keys()
    assert meta["network_data_format"]["inputs"]["image"]["num_channels"] == (3 if key == "derm" else 1)
    assert meta["pytorch_version"] == torch.__version__.split("+")[0] and "+" not in meta["pytorch_version"]

    task = "classification" if key == "derm" else "segmentation"
    run = delivered["runs"][task]
    summary = json.loads((run / "summary.json").read_text())
    site = bundle.site
    assert meta["site"] == site and meta["medfl_task"] == task and meta["method"] == "prr"
    assert meta["class_names"] == (["nv", "bkl", "mel"] if key == "derm" else ["background", "prostate"])
    assert meta["round"]["selected"] == summary["sites"][site]["selected_round"]
    metric = "macro_f1" if key == "derm" else "dice"
    assert meta["eval_metrics"]["validation"][metric] == pytest.approx(summary["sites"][site][f"val_{metric}"])
    assert meta["eval_metrics"]["test"][metric] == pytest.approx(summary["sites"][site]["test"][metric])
    for name in ("models/model.ts", "models/model.pt", "configs/inference.json", "docs/README.md"):
        assert meta["sha256"][name] == hashlib.sha256((bundle.folder / name).read_bytes()).hexdigest()
    assert any("2110.00394" in r and "MICCAI 2021" in r for r in meta["references"])
    assert any("Medical Imaging 41(12)" in r and "2022" in r for r in meta["references"])
    assert "research" in meta["intended_use"].lower() and "diagnosis" in meta["intended_use"]

    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["bundle"]
    names = {re.split(r"[<>=!\[ ]", requirement)[0] for requirement in extra}
    packages = meta["required_packages_version"]
    assert {"pytorch-ignite", "fire"} <= packages.keys() and {"pytorch-ignite", "fire", "itk-io"} == names
    assert ("itk-io" in packages) == (key == "prostate")


@pytest.mark.parametrize("key", ["derm", "prostate"])
def test_configs_name_monai_components_and_known_expressions_only(delivered, key):
    folder = delivered["bundles"][key].folder
    config = json.loads((folder / "configs" / "inference.json").read_text())
    targets, expressions = [], []

    def walk(value):
        if isinstance(value, dict):
            targets.extend([value["_target_"]] if "_target_" in value else [])
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)
        elif isinstance(value, str) and value.startswith("$"):
            expressions.append(value)

    walk(config)
    assert set(expressions) <= EXPRESSIONS
    import monai.data
    import monai.engines
    import monai.handlers
    import monai.inferers
    import monai.transforms

    modules = (monai.transforms, monai.data, monai.inferers, monai.engines, monai.handlers)
    for target in targets:
        assert target == "torch.jit.load" or any(hasattr(module, target) for module in modules), target
    assert config["input_dir"] is None and config["output_dir"] is None  # nothing is read or written unless named
    readme = (folder / "docs" / "README.md").read_text()
    assert "python -m monai.bundle run --config_file configs/inference.json --input_dir" in readme
    assert "verify_net_in_out network_def" in readme and "research only" in readme.lower()
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) == [
        "configs/inference.json", "configs/metadata.json", "docs/README.md", "models/model.pt", "models/model.ts"]


def test_recipe_values_that_a_bundle_config_would_evaluate_are_refused():
    recipe = {"transforms": [{"Resized": {"keys": ["image"], "spatial_size": [32, 32], "mode": "$print('x')"}}]}
    with pytest.raises(ConfigError, match="would evaluate or resolve"):
        image_transforms(recipe)
    recipe = {"transforms": [{"Resized": {"keys": ["image"], "spatial_size": {"_target_": "os.system"}}}]}
    with pytest.raises(ConfigError, match="_target_"):
        image_transforms(recipe)
    kept = image_transforms({"transforms": [{"SelectItemsd": {"keys": ["image", "label"]}}]})
    assert kept == [{"_target_": "SelectItemsd", "keys": ["image", "label", "filename_or_obj"],
                     "allow_missing_keys": True}]


def test_cli_format_bundle_writes_into_run_dir_bundle(delivered, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(delivered["runs"]["classification"], run)
    assert main(["export", str(run), "--format", "bundle", "--site", "derm_b"]) == 0
    assert str(run / "bundle" / "derm_b") in capsys.readouterr().out
    assert (run / "bundle" / "derm_b" / "models" / "model.ts").is_file()
    assert not (run / "export").exists()
    with pytest.raises(SystemExit):
        main(["export", str(run), "--format", "onnx"])


def test_a_slice_recipe_beyond_types_cannot_be_bundled():
    shipped = {"transforms": [{"EnsureTyped": {"keys": ["image", "label"], "track_meta": False}},
                              {"CastToTyped": {"keys": ["image", "label"], "dtype": ["float32", "uint8"]}}]}
    assert [step["_target_"] for step in volume_transforms(shipped)][-3:] == [
        "CastToTyped", "ClipIntensityPercentilesd", "NormalizeIntensityd"]
    for step in ({"ScaleIntensityd": {"keys": ["image"]}},
                 {"CastToTyped": {"keys": ["label", "image"], "dtype": ["uint8", "float16"]}}):
        with pytest.raises(ConfigError, match="can only carry slice recipes that set types"):
            volume_transforms({"transforms": [*shipped["transforms"], step]})
