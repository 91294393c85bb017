"""A tampered export is refused before any of it is used: every file is checked against the manifest's sha256
(eval_transforms.yaml and model.pt2 too), a recipe rewritten together with its hash still meets the recipe
allow-list, weights holding a crafted pickle never run; a run folder's recipe is checked under `medfl report`
and `medfl export`."""

from __future__ import annotations

import hashlib
import json
import pathlib
import shutil

import pytest
import torch
import yaml
from test_export import tiny_runs

from medfl.cli import main
from medfl.deliver import export_run, load_export
from medfl.errors import ConfigError, DataError
from medfl.runfolder import config_digest
from medfl.tasks import task_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    runs = tiny_runs(tmp_path_factory)
    out = tmp_path_factory.mktemp("integrity_exports")
    export_run(runs["classification"], out=out, sites=["derm_a"], task=task_for("classification"))
    configs = runs["federation"] / "site_configs" / "dermoscopy"
    images = sorted((runs["federation"] / "dermoscopy" / "derm_b").rglob("*.jpg"))[:2]
    return {"export": out / "derm_a", "runs": runs, "site_config": configs / "derm_b.yaml", "images": images}


def _copy(setup, tmp_path):
    copy = tmp_path / "derm_a"
    shutil.copytree(setup["export"], copy)
    return copy


def _rehash(folder, name):
    """Rewrite the manifest's sha256 of `name` to match the file: a forger who edits both."""
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _add_step(folder, step):
    recipe = yaml.safe_load((folder / "eval_transforms.yaml").read_text())
    recipe["transforms"].append(step)
    (folder / "eval_transforms.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))


def _refused_by_every_command(setup, folder, tmp_path, capsys, expected):
    """predict and evaluate exit 1 with one line matching `expected`, having written nothing."""
    out = tmp_path / "predictions"
    assert main(["predict", str(folder), *map(str, setup["images"]), "--out", str(out)]) == 1
    assert main(["evaluate", str(folder), str(setup["site_config"]), "--out", str(tmp_path / "scores.json")]) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all(expected in line for line in errors), errors
    assert not out.exists() and not (tmp_path / "scores.json").exists()
    assert not (folder / "evaluations").exists()


def test_the_manifest_covers_every_file_of_the_export(setup):
    manifest = json.loads((setup["export"] / "manifest.json").read_text())
    files = sorted(p.name for p in setup["export"].iterdir() if p.name != "manifest.json")
    assert sorted(manifest["files"]) == files == ["eval_transforms.yaml", "model.pt", "model.pt2"]


@pytest.mark.parametrize("name", ["eval_transforms.yaml", "model.pt2", "model.pt"])
def test_a_changed_file_is_refused_naming_it(setup, tmp_path, capsys, name):
    folder = _copy(setup, tmp_path)
    if name == "eval_transforms.yaml":  # an allowed step, so only the hash can tell
        _add_step(folder, {"RandFlipd": {"keys": ["image"], "prob": 1.0, "spatial_axis": [0]}})
    else:
        with open(folder / name, "ab") as stream:
            stream.write(b"\0")
    with pytest.raises(DataError, match=f"{name}: sha256 differs from the manifest's"):
        load_export(folder)
    _refused_by_every_command(setup, folder, tmp_path, capsys, f"{name}: sha256 differs")


def test_a_recipe_that_copies_inputs_is_refused_even_with_a_matching_hash(setup, tmp_path, capsys):
    folder = _copy(setup, tmp_path)
    copies = tmp_path / "copies"
    _add_step(folder, {"SaveImaged": {"keys": ["image"], "output_dir": str(copies), "output_ext": ".png"}})
    with pytest.raises(DataError, match="eval_transforms.yaml: sha256 differs"):
        load_export(folder)
    _rehash(folder, "eval_transforms.yaml")
    with pytest.raises(ConfigError, match=r"eval_transforms.yaml: transform \d+ \(SaveImaged\)"):
        load_export(folder)
    _refused_by_every_command(setup, folder, tmp_path, capsys, "(SaveImaged): 'SaveImaged' is not a transform")
    assert not copies.exists()


def test_a_reader_that_opens_any_file_is_refused_even_with_a_matching_hash(setup, tmp_path, capsys):
    folder = _copy(setup, tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    recipe = yaml.safe_load((folder / "eval_transforms.yaml").read_text())
    recipe["transforms"][0] = {"LoadImaged": {"keys": ["image"], "reader": "open", "file": str(victim), "mode": "w"}}
    (folder / "eval_transforms.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    _rehash(folder, "eval_transforms.yaml")
    _refused_by_every_command(setup, folder, tmp_path, capsys, "transform 1 (LoadImaged): argument 'file'")
    assert victim.read_text() == "keep me\n"


def test_manifests_that_leave_files_out_or_point_elsewhere_are_refused(setup, tmp_path):
    folder = _copy(setup, tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    for files, expected in [
        ({k: v for k, v in manifest["files"].items() if k != "eval_transforms.yaml"},
         "lists no sha256 for eval_transforms.yaml"),
        ({**manifest["files"], "../manifest.json": "0" * 64}, "'../manifest.json', which is not a file of the export"),
    ]:
        (folder / "manifest.json").write_text(json.dumps({**manifest, "files": files}))
        with pytest.raises(DataError, match=expected):
            load_export(folder)


class _Payload:
    """Unpickling this writes a marker file: proof that loading ran code."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_weights_holding_a_crafted_pickle_never_run(setup, tmp_path, capsys):
    folder = _copy(setup, tmp_path)
    marker = tmp_path / "payload_ran"
    state = torch.load(folder / "model.pt", weights_only=True)
    torch.save({**state, "extra": _Payload(marker)}, folder / "model.pt")
    _rehash(folder, "model.pt")
    with pytest.raises(DataError, match=r"model.pt: refused: it holds Python objects other than tensors"):
        load_export(folder)
    assert main(["predict", str(folder), *map(str, setup["images"]), "--out", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err
    assert "Traceback" not in error and "weights_only=False" not in error
    assert not marker.exists()


def _evil_run(setup, tmp_path):
    """A copy of the finished run whose config.yaml names a recipe that saves every test image elsewhere."""
    run = tmp_path / "run"
    shutil.copytree(setup["runs"]["classification"], run, ignore=shutil.ignore_patterns("export", "report"))
    evil = tmp_path / "evil.yaml"
    evil.write_text(yaml.safe_dump({"transforms": [
        {"LoadImaged": {"keys": ["image"], "reader": "PILReader"}},
        {"SaveImaged": {"keys": ["image"], "output_dir": str(tmp_path / "copies")}}]}))
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"]["eval_recipe"] = str(evil)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    record = json.loads((run / "run.json").read_text())  # rewritten to match: only the allow-list stops it
    (run / "run.json").write_text(json.dumps({**record, "config_sha256": config_digest(config)}))
    return run, evil


def test_a_run_folders_recipe_is_checked_under_report_and_export(setup, tmp_path, capsys):
    from medfl.report.writer import write_report

    run, evil = _evil_run(setup, tmp_path)
    report = write_report([run], out=tmp_path / "report", task=task_for("classification"))
    assert any(f"{evil}: transform 2 (SaveImaged)" in note for note in report.notes), report.notes
    assert main(["export", str(run), "--out", str(tmp_path / "export")]) == 1
    assert f"{evil}: transform 2 (SaveImaged)" in capsys.readouterr().err
    assert not (tmp_path / "copies").exists() and not (tmp_path / "export").exists()
