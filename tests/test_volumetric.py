"""3-D prostate segmentation (data.dims 3): config, volume records and recipes, the task on a tiny federation,
what `medfl check` says, the report, export, predict, evaluate and the MONAI bundle of a 3-D run (its NVFlare job:
tests/test_nvflare.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import tensors, tiny_3d_experiment

import medfl.data.recipes as recipes_module
from medfl.config import DataSettings, load_site_config, validate_model
from medfl.data import inspect_site
from medfl.data.recipes import load_recipe
from medfl.data.volumetric import resampled_shape
from medfl.errors import ConfigError
from medfl.experiment import ExperimentConfig
from medfl.methods import method_spec
from medfl.tasks import task_for

TRANSFORMS = Path(__file__).resolve().parents[1] / "transforms"
RECIPES_3D = ("prostate3d_train", "prostate3d_eval")


@pytest.fixture(autouse=True)
def this_checkouts_recipes(monkeypatch):
    """The shipped recipes of this checkout (medfl may be installed editable from another one)."""
    monkeypatch.setattr(recipes_module, "RECIPES_DIR", TRANSFORMS)

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


def test_a_two_d_config_yaml_is_what_it_was_before_three_d() -> None:
    """Runs started before 3-D existed resume (resume compares config.yaml key by key) and kept benchmark runs
    compare equal: a 2-D experiment writes no 3-D key."""
    written_before = yaml.safe_load((Path(__file__).parent / "data/compat_6c92377/run/config.yaml").read_text())
    resolved = validate_model(ExperimentConfig, written_before, "config.yaml").resolved()
    assert "evaluation" not in resolved and not {"dims", "spacing", "patch_size"} & set(resolved["data"])
    assert resolved["data"] == written_before["data"]
    assert validate_model(ExperimentConfig, resolved, "config.yaml").resolved() == resolved


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


# ---- volume records and the 3-D recipes --------------------------------------------------------------------

SMALL = {"dims": 3, "spacing": [1.2, 1.2, 3.0], "patch_size": [16, 16, 8], "patches_per_volume": 2,
         "foreground_ratio": 1.0, "num_workers": 0, "split_fractions": [0.5, 0.25, 0.25]}


@pytest.mark.parametrize("layout", ["nifti", "metaimage"])
def test_volume_records_load_as_the_2d_reader_finds_cases(prostate_site, layout) -> None:
    site = load_site_config(prostate_site(layout=layout, cases=("Case00", "Case02", "Case05", "Case07")))
    settings = validate_model(DataSettings, SMALL, "options")
    task = task_for("segmentation", settings)
    data = inspect_site(site, settings, task=task)
    assert not data.report.errors and data.report.samples == {"train": 2, "val": 1, "test": 1}
    record = data.splits["train"][0]
    assert Path(record["image"]).is_file() and Path(record["label"]).is_file() and task.input_channels(record) == 1
    # the eval recipe: RAS, resampled to the spacing, z-scored; the record's shape is the one MONAI makes
    volume = load_recipe("prostate3d_eval", **task.recipe_variables(settings))(record)
    assert tuple(volume["image"].shape) == (1, *record["shape"]) == (1, *resampled_shape(
        data.geometry[record["case_id"]], settings.spacing))
    assert abs(float(volume["image"].mean())) < 0.2 and str(volume["label"].dtype) == "torch.uint8"
    assert int(volume["label"].max()) == 2  # zones kept, as in 2-D: any value > 0 is prostate
    # the train recipe: patches_per_volume patches of the patch size (padded where the volume is smaller), all on
    # prostate at a foreground ratio of 1
    train = load_recipe("prostate3d_train", **task.recipe_variables(settings))
    train.set_random_state(seed=0)
    patches = train(record)
    assert len(patches) == 2 and all(tuple(p["image"].shape) == (1, 16, 16, 8) for p in patches)
    assert all(int((p["label"] > 0).sum()) > 0 for p in patches)
    counts, with_prostate = task.split_counts(task.classes(None), data.splits["train"])
    assert with_prostate == 2 and counts[1] > 0 and sum(counts) == sum(np.prod(r["shape"]) for r in data.splits["train"])


def test_the_3d_recipes_pass_the_allow_list_and_load_only_the_records_files(tmp_path) -> None:
    for name in RECIPES_3D:
        assert (TRANSFORMS / f"{name}.yaml").is_file()
        load_recipe(name)
    evil = tmp_path / "evil.yaml"
    evil.write_text("transforms:\n  - LoadImaged: {keys: [label, case_id]}\n")
    with pytest.raises(ConfigError, match="may only load the record's 'image' file"):
        load_recipe(evil)


# ---- the task on a tiny synthetic 3-D federation --------------------------------------------------------

@pytest.fixture(scope="module")
def federation(tiny_federation) -> Path:
    """`medfl synth`'s first two prostate sites at scale 0.01 (6 cases each; volumes of 64-80 voxels, 20-24 slices):
    the conftest tiny federation's (tests only read it)."""
    return tiny_federation


@pytest.fixture(scope="module")
def run_of(federation, tmp_path_factory):
    """method -> the folder of a 1-round tiny 3-D run of it (each method runs once per module)."""
    import torch

    from medfl.experiment import load_experiment_config
    from medfl.federated.coordinator import Coordinator

    runs: dict[str, Path] = {}

    def run(method: str) -> Path:
        if method not in runs:
            folder = tmp_path_factory.mktemp(f"run3d_{method}")
            previous = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                config = load_experiment_config(tiny_3d_experiment(folder / "exp.yaml", federation, method))
                Coordinator(config, folder / "run", torch.device("cpu"), task=task_for(config.task, config)).run()
            finally:
                torch.set_num_threads(previous)
            runs[method] = folder
        return runs[method]

    return run


@pytest.mark.parametrize("method", ["local", "fedavg", "prr", "ditto", "pooled"])
def test_federated_methods_run_unchanged_in_3d(federation, run_of, tmp_path, method) -> None:
    import csv
    import json

    import torch

    from medfl.experiment import load_experiment_config
    from medfl.federated.coordinator import Coordinator
    from medfl.tasks.volumetric import VolumetricSegmentation

    config = load_experiment_config(tiny_3d_experiment(tmp_path / "exp.yaml", federation, method))
    task = task_for(config.task, config)
    assert isinstance(task, VolumetricSegmentation) and task.sliding_window["sw_mode"] == "gaussian"
    with pytest.raises(ValueError, match="2-D segmentation task cannot run the 3-D experiment"):
        Coordinator(config, tmp_path / "wrong", torch.device("cpu"), task=task_for(config.task))
    run = run_of(method) / "run"
    with open(run / "metrics.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    dice = [float(r["value"]) for r in rows if r["metric"] == "dice"]
    assert dice and all(0.0 <= value <= 1.0 for value in dice)
    cases = {(r["site"], r["split"]): float(r["value"]) for r in rows if r["metric"] == "num_cases"}
    assert cases[("prost_a", "val")] >= 1 and cases[("prost_a", "test")] >= 1  # whole volumes, scored per case
    models = {r["model"] for r in rows}
    assert models == ({"P", "D"} if method_spec(method).two_models else {"M"})
    saved = torch.load(next(run.rglob("round_*.pt")), weights_only=True)
    assert saved["network"]["spatial_dims"] == 3
    summary = json.loads((run / "summary.json").read_text())
    for site in summary["sites"].values():  # test scores on each case's own voxel grid too
        assert 0.0 <= site["test"]["dice_original"] <= 1.0
        assert {"hd95_original", "hd95_original_missing"} <= set(site["test"])
    assert not any(r["metric"] == "dice_original" for r in rows if r["split"] != "test")


def test_3d_sites_side_by_side_equal_one_after_another(federation, run_of, tmp_path) -> None:
    """Worker processes train 3-D sites as the coordinator's own process does: the same scores and weights."""
    import torch

    from medfl.experiment import load_experiment_config
    from medfl.federated.coordinator import Coordinator
    from medfl.federated.parallel import ParallelSites

    config = load_experiment_config(tiny_3d_experiment(tmp_path / "exp.yaml", federation, "prr"))
    coordinator = Coordinator(config, tmp_path / "parallel", torch.device("cpu"), parallel=2,
                              task=task_for(config.task, config))
    assert isinstance(coordinator.federation, ParallelSites)
    coordinator.run()
    sequential = run_of("prr") / "run"
    assert (sequential / "metrics.csv").read_bytes() == (tmp_path / "parallel" / "metrics.csv").read_bytes()
    files = sorted(p.relative_to(sequential) for p in sequential.rglob("*.pt"))
    assert files and files == sorted(p.relative_to(tmp_path / "parallel") for p in (tmp_path / "parallel").rglob("*.pt"))
    for file in files:
        one, other = (dict(tensors(torch.load(run / file, weights_only=True)))
                      for run in (sequential, tmp_path / "parallel"))
        assert one and one.keys() == other.keys(), file
        assert all(torch.equal(value, other[key]) for key, value in one.items()), file


# ---- the report of a 3-D run ------------------------------------------------------------------------------

def test_report_of_a_3d_run_draws_three_planes_through_each_example_case(run_of, tmp_path, capsys) -> None:
    import torch

    from medfl.cli import main
    from medfl.experiment import load_experiment_config
    from medfl.report.predictions import VIEWS, SplitCache, choose_volume_examples, predict_volume_examples
    from medfl.report.runs import load_run

    run_dir = run_of("fedavg") / "run"
    out = tmp_path / "report"
    assert main(["report", str(run_dir), "--out", str(out), "--examples", "1", "--device", "cpu"]) == 0
    assert "report written to" in capsys.readouterr().out
    text = (out / "report.md").read_text()
    assert "(validation_curves.png)" in text  # curves and tables as in 2-D
    assert "![Segmentation examples, three planes per case](segmentation_planes.png)" in text
    assert "## Test results per site" in text and "dice" in text.lower()
    assert (out / "segmentation_planes.png").stat().st_size > 0 and not (out / "segmentation_examples.png").exists()
    # the planes: axial, coronal, sagittal through the mask's centre of mass, the prediction cut the same way
    run = load_run(run_dir)
    config = load_experiment_config(run_dir / "config.yaml")
    splits = SplitCache(task_for(config.task, config))
    examples = choose_volume_examples(run, splits, 1)
    predicted = predict_volume_examples(run, examples, splits, torch.device("cpu"))
    for site, planes in examples.items():
        assert [p.view for p in planes] == list(VIEWS) and len({p.case_id for p in planes}) == 1
        x, y, z = planes[0].centre
        assert [p.slice_index for p in planes] == [z, y, x] and all(p.truth.any() for p in planes)
        assert [m.shape for m in predicted[site]] == [p.image.shape for p in planes] == [p.truth.shape for p in planes]
        assert planes[1].aspect == planes[2].aspect == 1.0  # 6 mm voxels: square pixels
    from medfl.report.writer import write_report

    with pytest.raises(ConfigError, match="a 3-D run, and the report's task is 2-D"):
        write_report([run_dir], tmp_path / "wrong", task=task_for("segmentation"))


# ---- export, predict, evaluate and the MONAI bundle of a 3-D run ------------------------------------------------

_COS, _SIN = float(np.cos(np.radians(15))), float(np.sin(np.radians(15)))
OBLIQUE = (_COS, -_SIN, 0.0, _SIN, _COS, 0.0, 0.0, 0.0, -1.0)  # rotated about z, superior-inferior flipped


def _inputs(federation: Path, folder: Path) -> list[Path]:
    """A prost_b case as NIfTI (LPS voxel axes: flipped against RAS) with qform code 2, and the same voxels as a
    MetaImage volume on an oblique grid (another origin and spacing)."""
    import nibabel as nib
    import SimpleITK as sitk

    folder.mkdir(parents=True)
    case = sorted(p for p in (federation / "prostate" / "prost_b").glob("*.nii.gz") if "_seg" not in p.name.lower())[0]
    nifti = folder / "case.nii.gz"
    image = nib.load(case)
    image.set_qform(image.affine, code=2)
    nib.save(image, nifti)
    oblique = sitk.ReadImage(str(case))
    oblique.SetDirection(OBLIQUE)
    oblique.SetOrigin((-12.5, 30.0, 7.25))
    oblique.SetSpacing((1.9, 1.6, 3.3))
    sitk.WriteImage(oblique, str(folder / "oblique.mha"))
    return [nifti, folder / "oblique.mha"]


def test_3d_inference_steps_are_the_eval_recipe_on_the_image_with_its_metadata() -> None:
    from medfl.data.recipes import resolve_recipe
    from medfl.deliver.volumes3d import build_transforms, inference_steps

    steps = inference_steps(resolve_recipe("prostate3d_eval", spacing=[3.0, 3.0, 4.0]))
    assert all(step["keys"] == "image" for step in steps)
    spacing = next(step for step in steps if step["_target_"] == "Spacingd")
    assert spacing["mode"] == "bilinear" and spacing["pixdim"] == [3.0, 3.0, 4.0]
    assert next(step for step in steps if step["_target_"] == "CastToTyped")["dtype"] == "float32"
    assert "track_meta" not in next(step for step in steps if step["_target_"] == "EnsureTyped")
    assert len(build_transforms(steps).transforms) == len(steps)
    random = {"transforms": [{"RandFlipd": {"keys": ["image", "label"], "prob": 0.5}}]}
    with pytest.raises(ConfigError, match=r"transform 1 \(RandFlipd\): not a deterministic"):
        inference_steps(random)
    assert inference_steps({"transforms": [{"EnsureTyped": {"keys": ["label"]}}]}) == []


@pytest.fixture(scope="module")
def export_3d(run_of, tmp_path_factory) -> Path:
    """`medfl export` of the tiny 3-D prr run (personalized models, best round)."""
    from medfl.cli import main

    out = tmp_path_factory.mktemp("export3d") / "export"
    assert main(["export", str(run_of("prr") / "run"), "--out", str(out)]) == 0
    return out


def test_a_3d_export_records_what_3d_inference_needs(export_3d) -> None:
    import json

    manifest = json.loads((export_3d / "prost_a" / "manifest.json").read_text())
    pre = manifest["preprocessing"]
    assert (pre["dims"], pre["orientation"], pre["spacing"], pre["patch_size"]) == (3, "RAS", [6.0, 6.0, 6.0], [16, 16, 8])
    assert pre["sliding_window"] == {"sw_overlap": 0.25, "sw_mode": "gaussian", "sw_batch_size": 2}
    assert [next(iter(step)) for step in pre["transforms"]][:6] == [
        "LoadImaged", "EnsureChannelFirstd", "Orientationd", "ClipIntensityPercentilesd", "NormalizeIntensityd", "Spacingd"]
    assert next(iter(pre["transforms"][5].values()))["pixdim"] == [6.0, 6.0, 6.0]  # the run's spacing, not the recipe's
    assert manifest["input"]["size"] == [16, 16, 8] and manifest["output"]["logits"] == ["batch", 2, 16, 16, 8]


def test_predict_a_3d_export_writes_masks_on_the_inputs_grid(federation, export_3d, tmp_path, capsys) -> None:
    import nibabel as nib
    import SimpleITK as sitk

    from medfl.cli import main

    inputs = _inputs(federation, tmp_path / "in")
    assert main(["predict", str(export_3d / "prost_a"), *map(str, inputs), "--out", str(tmp_path / "masks")]) == 0
    assert "2 of 2 input(s) predicted" in capsys.readouterr().out
    source, mask = nib.load(inputs[0]), nib.load(tmp_path / "masks" / "case_mask.nii.gz")
    assert mask.shape == source.shape and np.allclose(mask.affine, source.affine, atol=1e-5)
    assert (int(mask.header["qform_code"]), int(mask.header["sform_code"])) == (2, int(source.header["sform_code"]))
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
    image, predicted = sitk.ReadImage(str(inputs[1])), sitk.ReadImage(str(tmp_path / "masks" / "oblique_mask.mha"))
    assert predicted.GetSize() == image.GetSize() and np.allclose(predicted.GetDirection(), OBLIQUE)
    assert np.allclose(predicted.GetOrigin(), image.GetOrigin()) and np.allclose(predicted.GetSpacing(), image.GetSpacing())
    assert set(np.unique(sitk.GetArrayFromImage(predicted))) <= {0, 1}


def test_evaluate_a_3d_export_gives_the_runs_test_dice(federation, export_3d, tmp_path, capsys) -> None:
    """The same recipe, sliding window and scorer as the run's test scoring: the same Dice per site."""
    import json

    from medfl.cli import main

    manifest = json.loads((export_3d / "prost_a" / "manifest.json").read_text())
    site = federation / "site_configs" / "prostate" / "prost_a.yaml"
    out = tmp_path / "scores.json"
    assert main(["evaluate", str(export_3d / "prost_a"), str(site), "--out", str(out)]) == 0
    scores = json.loads(out.read_text())
    assert scores["metrics"]["num_cases"] == manifest["metrics"]["test"]["num_cases"]
    for metric in ("dice", "hd95"):
        assert scores["metrics"][metric] == pytest.approx(manifest["metrics"]["test"][metric], abs=1e-6, nan_ok=True)


# Runs `python -m monai.bundle` commands (a JSON list of argument lists) in one process where importing medfl fails;
# stops at the first that does not end with status 0.
BUNDLE_RUNNER = """
import json, runpy, sys
sys.modules["medfl"] = None
for arguments in json.loads(sys.argv[1]):
    sys.argv = ["python -m monai.bundle", *arguments]
    try:
        runpy.run_module("monai.bundle", run_name="__main__")
    except SystemExit as stop:
        if stop.code:
            raise
"""


@pytest.mark.slow
def test_a_3d_bundle_runs_without_medfl_and_equals_predict(federation, run_of, tmp_path, capsys) -> None:
    import json
    import subprocess
    import sys

    import nibabel as nib
    import SimpleITK as sitk

    from medfl.cli import main

    for package in ("ignite", "fire", "itk"):
        pytest.importorskip(package, reason="the bundle runner's packages: pip install 'medfl[bundle]'")
    bundle = tmp_path / "bundle"
    assert main(["export", str(run_of("prr") / "run"), "--format", "bundle", "--site", "prost_a", "--out",
                 str(bundle)]) == 0
    config = json.loads((bundle / "prost_a" / "configs" / "inference.json").read_text())
    assert config["inferer"] == {"_target_": "SlidingWindowInferer", "roi_size": [16, 16, 8], "sw_batch_size": 2,
                                 "overlap": 0.25, "mode": "gaussian"}
    steps = [step["_target_"] for step in config["preprocessing"]["transforms"]]
    assert steps[:6] == ["LoadImaged", "EnsureChannelFirstd", "Orientationd", "ClipIntensityPercentilesd",
                         "NormalizeIntensityd", "Spacingd"]
    assert [step["_target_"] for step in config["postprocessing"]["transforms"]] == ["AsDiscreted", "Invertd", "SaveImaged"]
    inputs = _inputs(federation, tmp_path / "in")
    export = tmp_path / "export"
    assert main(["export", str(run_of("prr") / "run"), "--site", "prost_a", "--out", str(export)]) == 0
    assert main(["predict", str(export / "prost_a"), *map(str, inputs), "--out", str(tmp_path / "predicted")]) == 0
    outputs = {extension: tmp_path / f"bundle_out{extension.replace('.', '_')}" for extension in (".nii.gz", ".mha")}
    commands = [["verify_net_in_out", "network_def", "--meta_file", "configs/metadata.json", "--config_file",
                 "configs/inference.json"]]
    commands += [["run", "--config_file", "configs/inference.json", "--input_dir", str(tmp_path / "in"), "--output_dir",
                  str(out), "--input_ext", extension] for extension, out in outputs.items()]
    result = subprocess.run([sys.executable, "-c", BUNDLE_RUNNER, json.dumps(commands)], cwd=bundle / "prost_a",
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for extension, name in ((".nii.gz", "case"), (".mha", "oblique")):
        out = outputs[extension]
        ours = tmp_path / "predicted" / f"{name}_mask{extension}"
        theirs = out / f"{name}_mask{extension}"
        if extension == ".nii.gz":
            a, b = nib.load(ours), nib.load(theirs)
            assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj)) and np.allclose(a.affine, b.affine, atol=1e-5)
        else:
            a, b = sitk.ReadImage(str(ours)), sitk.ReadImage(str(theirs))
            assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
            for get in ("GetOrigin", "GetSpacing", "GetDirection"):
                assert np.allclose(getattr(a, get)(), getattr(b, get)(), atol=1e-5), get


# ---- medfl check --experiment --------------------------------------------------------------------------------

def test_check_experiment_states_spacing_patch_fit_and_memory(federation, tmp_path, capsys) -> None:
    from medfl.cli import main

    experiment = tiny_3d_experiment(tmp_path / "exp.yaml", federation, "prr",
                          data={"dims": 3, "spacing": [4.0, 4.0, 4.0], "patch_size": [32, 32, 32], "num_workers": 0})
    assert main(["check", "--experiment", str(experiment)]) == 0
    out = capsys.readouterr().out
    assert "spacing 4 x 4 x 4 mm, patch 32 x 32 x 32 voxels" in out
    assert "3-D: volumes resampled to 4 x 4 x 4 mm" in out
    assert "site 'prost_a' (segmentation, 3-D)" in out and "cases with prostate" in out
    # prost_a: 64 x 64 x 20 voxels of 2.2 x 2.2 x 3.6 mm -> 36 x 36 x 18 at 4 mm: 14 voxels short of the patch in z
    assert ("site 'prost_a': smallest volume 'Case02' resampled to 36 x 36 x 18 voxels against the patch 32 x 32 x 32 "
            "voxels: smaller than the patch along z by 14 voxel(s)") in out
    memory = next(line for line in out.splitlines() if line.startswith("memory of one training batch"))
    assert float(memory.split("about ")[1].split(" MiB")[0]) > 0 and "2 model(s)" in memory
    assert main(["check", "--experiment", str(experiment), str(experiment)]) == 1
    assert "give no site configs with it" in capsys.readouterr().err
    flat = tiny_3d_experiment(tmp_path / "flat.yaml", federation, "prr", data={"num_workers": 0, "input_size": 32}, evaluation={})
    assert main(["check", "--experiment", str(flat)]) == 0
    out = capsys.readouterr().out
    assert "input size 32" in out and "slices with prostate" in out and "3-D" not in out and "memory of" not in out


def test_check_and_run_refuse_a_3d_experiment_whose_batch_cannot_fit(federation, tmp_path, capsys, monkeypatch) -> None:
    import medfl.devices
    from medfl.cli import main

    experiment = tiny_3d_experiment(tmp_path / "exp.yaml", federation, "prr")
    monkeypatch.setattr(medfl.devices, "available_memory_bytes", lambda device: 100 * 2**10)  # 100 KiB left
    assert main(["check", "--experiment", str(experiment)]) == 1
    captured = capsys.readouterr()
    error = next(line for line in captured.err.splitlines() if "cannot fit in memory" in line)
    assert "one training batch needs about" in error and "2 model(s), 2 patch(es) of 16 x 16 x 8 voxels" in error
    assert "only 100.0 KiB is available in RAM" in error and "smaller data.patch_size, batch_size" in error
    assert "does not fit in memory" in captured.out
    out = tmp_path / "run"
    assert main(["run", str(experiment), "--out", str(out), "--quiet"]) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "cannot fit in memory" in error and not out.exists()
    monkeypatch.setattr(medfl.devices, "available_memory_bytes", lambda device: 2**40)
    assert main(["check", "--experiment", str(experiment)]) == 0


def test_available_memory_is_read_from_meminfo(tmp_path, monkeypatch) -> None:
    import torch

    import medfl.devices

    assert medfl.devices.available_memory_bytes(torch.device("cpu")) > 0
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemFree:  100 kB\nMemAvailable:    8000000 kB\n")
    monkeypatch.setattr(medfl.devices, "MEMINFO", meminfo)
    assert medfl.devices.available_memory_bytes(torch.device("cpu")) == 8000000 * 1024


def test_the_shipped_3d_experiment_checks_on_the_synthetic_sites(federation, tmp_path, capsys) -> None:
    """site_configs/experiments/prostate3d.yaml (the README's 3-D walkthrough) as shipped, on synth's sites."""
    from medfl.cli import main

    shipped = yaml.safe_load((TRANSFORMS.parent / "site_configs" / "experiments" / "prostate3d.yaml").read_text())
    assert shipped["data"]["dims"] == 3
    shipped["sites"] = [str(federation / "site_configs" / "prostate" / f"prost_{s}.yaml") for s in "ab"]
    shipped["data"]["num_workers"] = 0
    path = tmp_path / "prostate3d.yaml"
    path.write_text(yaml.safe_dump(shipped), encoding="utf-8")
    assert main(["check", "--experiment", str(path)]) == 0
    out = capsys.readouterr().out
    assert "spacing 2 x 2 x 3 mm, patch 64 x 64 x 16 voxels" in out and "memory of one training batch" in out
