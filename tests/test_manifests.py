"""Export manifests are checked by one pydantic model (medfl.manifests.ExportManifest) before any of an export
is used: every manifest the current code writes passes; one that lacks a key the commands read is one line
naming the file and the key under `medfl predict` and `medfl evaluate`, with nothing written. `medfl predict`
refuses an --out that is a file (one of its inputs) in one line, before torch loads and before anything is
written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from test_export import tiny_runs

from medfl.cli import main
from medfl.deliver import export_run
from medfl.errors import ConfigError
from medfl.manifests import ExportManifest, check_manifest, read_manifest
from medfl.tasks import task_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    runs = tiny_runs(tmp_path_factory)
    out = tmp_path_factory.mktemp("manifest_exports")
    export_run(runs["classification"], out=out / "derm", sites=["derm_a"], task=task_for("classification"))
    export_run(runs["segmentation"], out=out / "prostate", task=task_for("segmentation"))
    configs = runs["federation"] / "site_configs"
    return {"derm": out / "derm" / "derm_a", "prostate": out / "prostate" / "prost_a",
            "derm_b": configs / "dermoscopy" / "derm_b.yaml",
            "image": sorted((runs["federation"] / "dermoscopy" / "derm_b").rglob("*.jpg"))[0]}


@pytest.mark.parametrize("export", ["derm", "prostate"])
def test_every_manifest_the_current_code_writes_passes_the_model(setup, export):
    manifest = json.loads((setup[export] / "manifest.json").read_text())
    assert read_manifest(setup[export]) == manifest
    ExportManifest.model_validate(manifest)
    assert ("mask_suffix" in manifest["preprocessing"]) == (export == "prostate")


def _without(setup, tmp_path, key: str):
    folder = tmp_path / "derm_a"
    shutil.copytree(setup["derm"], folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    parent, _, leaf = key.rpartition(".")
    del (manifest[parent] if parent else manifest)[leaf]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.mark.parametrize("key", ["site", "classes", "network", "input", "input.size", "network.in_channels",
                                 "round.selected", "data_settings"])
def test_a_manifest_without_a_key_is_one_line_naming_the_file_and_key(setup, tmp_path, capsys, key):
    folder = _without(setup, tmp_path, key)
    out, scores = tmp_path / "predictions", tmp_path / "scores.json"
    assert main(["predict", str(folder), str(setup["image"]), "--out", str(out)]) == 1
    assert main(["evaluate", str(folder), str(setup["derm_b"]), "--out", str(scores)]) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    expected = f"{folder / 'manifest.json'}: key '{key}': Field required"
    assert len(errors) == 2 and all(expected in line for line in errors), errors
    assert not out.exists() and not scores.exists() and not (folder / "evaluations").exists()


def test_values_of_the_wrong_kind_and_foreign_manifests_are_refused(setup):
    manifest = json.loads((setup["derm"] / "manifest.json").read_text())
    for change, expected in [({"input": {**manifest["input"], "size": [32]}}, "key 'input.size'"),
                             ({"site": "../elsewhere"}, "key 'site'"),
                             ({"task": "detection"}, "unknown task 'detection'"),
                             ({"files": {"model.pt": "not a hash"}}, "key 'files.model.pt'"),
                             ({"format": "other/1"}, "not a medfl export manifest")]:
        with pytest.raises(ConfigError, match=expected):
            check_manifest({**manifest, **change}, "manifest.json")
    volumes = json.loads((setup["prostate"] / "manifest.json").read_text())
    del volumes["preprocessing"]["context_slices"]  # what medfl predict reads to build the slice-wise program
    with pytest.raises(ConfigError, match=r"manifest.json: key 'preprocessing.context_slices': Field required"):
        check_manifest(volumes, "manifest.json")


def test_predict_refuses_an_output_that_is_one_of_its_inputs_before_torch_loads(setup, tmp_path):
    image = tmp_path / "a.jpg"
    shutil.copy(setup["image"], image)
    before = image.read_bytes()
    code = ("import sys, medfl.cli\n"
            f"status = medfl.cli.main(['predict', {str(setup['derm'])!r}, {str(image)!r}, '--out', {str(image)!r}])\n"
            "print('torch' in sys.modules, 'monai' in sys.modules, status)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["False", "False", "1"], result.stderr
    assert result.stderr.strip() == (f"medfl predict: error: {image}: --out (where predictions.csv or the masks go) "
                                     "must be a folder, but it is a file; nothing was written")
    assert image.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["a.jpg"]
