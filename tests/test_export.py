"""`medfl export`: per-site folders, manifest contents, weights_only loading, the torch.export program without
medfl, round and model choice, refusal to overwrite; reading an export back (find_export, sha256 check).

`tiny_runs` is imported by test_predict and test_evaluate_command: the runs are built once per session.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml
from conftest import tiny_experiment, tiny_federation_root, tiny_run

from medfl.cli import main
from medfl.data import load_site
from medfl.deliver import export_run, find_export, load_export, read_manifest
from medfl.errors import ConfigError, DataError, MedflError
from medfl.experiment import load_experiment_config
from medfl.runfolder import config_digest
from medfl.tasks import task_for

CLASSIFICATION = task_for("classification")

pytestmark = pytest.mark.slow

DERM_SITES = ("derm_a", "derm_b")


def tiny_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two finished tiny runs, built once per session (conftest.tiny_run, whose runs other modules share):
    classification (2 dermoscopy sites, 2 rounds) and segmentation (1 prostate site, 1 round, 2.5-D input with
    one context slice on each side). "federation" is the synthetic data folder (with prost_b and derm sites' data
    and site configs)."""
    return {"federation": tiny_federation_root(tmp_path_factory),
            "classification": tiny_run(tmp_path_factory, "classification", sites=DERM_SITES)[0],
            "segmentation": tiny_run(tmp_path_factory, "segmentation", sites=["prost_a"], data={"context_slices": 1},
                                     rounds=1)[0]}


SITE_VARIABLES = {"derm_a": "MEDFL_TEST_DERM_A_ROOT", "derm_b": "MEDFL_TEST_DERM_B_ROOT"}


def variable_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A finished tiny run (2 dermoscopy sites, fedavg, 1 round) whose site configs name their data through
    environment variables (`data_root: ${MEDFL_TEST_DERM_A_ROOT}`), as hospitals' configs do; built once per
    session. Returns the run folder and the variables with the values the run had."""
    from medfl.federated.coordinator import Coordinator

    federation = tiny_federation_root(tmp_path_factory)
    base = tmp_path_factory.getbasetemp() / "variable_run"
    values = {SITE_VARIABLES[site]: str((federation / "dermoscopy" / site).resolve()) for site in DERM_SITES}
    if (base / "done").exists():
        return base / "run", values
    shutil.rmtree(base, ignore_errors=True)
    for site in DERM_SITES:
        config = yaml.safe_load((federation / "site_configs" / "dermoscopy" / f"{site}.yaml").read_text())
        path = base / "site_configs" / "dermoscopy" / f"{site}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump({**config, "data_root": "${" + SITE_VARIABLES[site] + "}"}))
    experiment = tiny_experiment(base / "experiment.yaml", base, "classification", sites=DERM_SITES,
                                 method="fedavg", rounds=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with mock.patch.dict(os.environ, values):
            Coordinator(load_experiment_config(experiment), base / "run", torch.device("cpu"), task=CLASSIFICATION).run()
    finally:
        torch.set_num_threads(threads)
    (base / "done").touch()
    return base / "run", values


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tiny_runs(tmp_path_factory)


@pytest.fixture(scope="module")
def derm_export(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("derm_export")
    return out, export_run(runs["classification"], out=out, task=task_for("classification"))


@pytest.fixture(scope="module")
def prostate_export(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("prostate_export")
    return out, export_run(runs["segmentation"], out=out, task=task_for("segmentation"))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _checkpoint(run: Path, site: str, round_: int) -> dict:
    return torch.load(run / "sites" / site / "models" / f"round_{round_:04d}.pt", weights_only=True)


def test_export_writes_one_folder_per_site_and_nothing_else(derm_export):
    out, exports = derm_export
    assert sorted(p.name for p in out.iterdir()) == list(DERM_SITES)
    for export in exports:
        assert export.folder == out / export.site
        assert sorted(p.name for p in export.folder.iterdir()) == [
            "eval_transforms.yaml", "manifest.json", "model.pt", "model.pt2"]


def test_manifest_describes_the_site_model_and_its_provenance(runs, derm_export):
    run = runs["classification"]
    summary = json.loads((run / "summary.json").read_text())
    config = yaml.safe_load((run / "config.yaml").read_text())
    out, _ = derm_export
    for site in DERM_SITES:
        manifest = read_manifest(out / site)
        selected = summary["sites"][site]["selected_round"]
        assert manifest["site"] == site and manifest["task"] == "classification"
        assert manifest["classes"] == ["nv", "bkl", "mel"]
        assert manifest["model"] == {"role": "personalized", "name": "P", "method": "prr"}
        assert manifest["network"] == _checkpoint(run, site, selected)["network"]
        assert manifest["network"]["name"] == "slim_vgg16" and manifest["network"]["width"] == 0.125
        assert manifest["input"]["channels"] == 3 and manifest["input"]["size"] == [32, 32]
        assert manifest["round"]["requested"] == "best" and manifest["round"]["selected"] == selected
        assert manifest["metrics"]["metric"] == "macro_f1"
        assert manifest["metrics"]["validation"]["macro_f1"] == summary["sites"][site]["val_macro_f1"]
        assert manifest["metrics"]["test"] == summary["sites"][site]["test"]
        assert manifest["experiment"]["config_sha256"] == _sha256(run / "config.yaml")
        assert manifest["data_settings"] == config["data"]
        assert set(manifest["versions"]) >= {"medfl", "monai", "torch"}
        for name, digest in manifest["files"].items():
            assert _sha256(out / site / name) == digest


def test_manifest_preprocessing_is_the_resolved_eval_recipe(derm_export):
    out, _ = derm_export
    manifest = read_manifest(out / "derm_a")
    transforms = manifest["preprocessing"]["transforms"]
    assert yaml.safe_load((out / "derm_a" / "eval_transforms.yaml").read_text())["transforms"] == transforms
    resized = next(entry["Resized"] for entry in transforms if "Resized" in entry)
    assert resized["spatial_size"] == [32, 32]
    assert "@" not in json.dumps(transforms)  # every variable substituted
    assert not any(name.startswith("Rand") for entry in transforms for name in entry)


def test_training_file_hash_covers_the_sites_training_images(runs, derm_export):
    config = load_experiment_config(runs["classification"] / "config.yaml")
    out, _ = derm_export
    for site in config.load_sites():
        data = load_site(site, config.data, task=task_for(config.task))
        files = sorted(str(Path(r["image"]).resolve().relative_to(site.data_root.resolve()))
                       for r in data.splits["train"])
        expected = hashlib.sha256("".join(f + "\n" for f in files).encode()).hexdigest()
        recorded = read_manifest(out / site.name)["training_files"]
        assert recorded["count"] == len(data.splits["train"]) and recorded["sha256"] == expected


def test_segmentation_manifest_records_volume_preprocessing(runs, prostate_export):
    out, (export,) = prostate_export
    manifest = export.manifest
    assert manifest["classes"] == ["background", "prostate"]
    assert manifest["input"]["channels"] == 3  # one context slice on each side
    preprocessing = manifest["preprocessing"]
    assert preprocessing["orientation"] == "LPS" and preprocessing["context_slices"] == 1
    assert preprocessing["intensity_percentiles"] == [0.5, 99.5] and preprocessing["in_plane_size"] == [32, 32]
    config = load_experiment_config(runs["segmentation"] / "config.yaml")
    data = load_site(config.load_sites()[0], config.data, task=task_for(config.task))
    train_cases = {r["case_id"] for r in data.splits["train"]}
    assert manifest["training_files"]["count"] == len(train_cases)
    assert manifest["output"]["logits"] == ["batch", 2, 32, 32]


def test_weights_load_with_weights_only_and_are_the_selected_rounds(runs, derm_export):
    out, exports = derm_export
    for export in exports:
        state = torch.load(export.folder / "model.pt", weights_only=True)
        expected = _checkpoint(runs["classification"], export.site, export.manifest["round"]["selected"])["models"]["P"]
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[k], expected[k]) for k in state)


def test_program_runs_without_medfl_with_any_batch_size(prostate_export, tmp_path):
    out, (export,) = prostate_export
    script = (
        "import sys, torch\n"
        "sys.modules['medfl'] = None  # importing medfl now fails\n"
        f"program = torch.export.load({str(export.folder / 'model.pt2')!r}).module()\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r})\n"
        f"torch.save([program(x[:1]), program(x)], {str(tmp_path / 'y.pt')!r})\n"
    )
    x = torch.randn(3, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    one, three = torch.load(tmp_path / "y.pt")
    with torch.no_grad():
        expected = load_export(export.folder).network(x)[0]
    assert one.shape == (1, 2, 32, 32) and three.shape == (3, 2, 32, 32)
    torch.testing.assert_close(three, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(one, expected[:1], rtol=1e-4, atol=1e-5)


def test_an_export_is_never_overwritten(runs, derm_export):
    out, _ = derm_export
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(ConfigError, match="never overwritten.*--out"):
        export_run(runs["classification"], out=out, round_="last", task=task_for("classification"))
    with pytest.raises(ConfigError, match="derm_b"):
        export_run(runs["classification"], out=out, sites=["derm_b"], task=task_for("classification"))
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing written, no temporary left


def test_round_and_model_choices(runs, tmp_path):
    run = runs["classification"]
    (last,) = export_run(run, out=tmp_path / "last", round_="last", sites=["derm_b"], task=CLASSIFICATION)
    assert last.manifest["round"]["selected"] == 1 and last.manifest["round"]["requested"] == "last"
    (deputy,) = export_run(run, out=tmp_path / "deputy", round_="0", role="deputy", sites=["derm_a"], task=CLASSIFICATION)
    assert deputy.manifest["model"]["name"] == "D" and deputy.manifest["round"]["selected"] == 0
    state = torch.load(deputy.folder / "model.pt", weights_only=True)
    expected = _checkpoint(run, "derm_a", 0)["models"]["D"]
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    for bad in ("2", "latest", "-1"):
        with pytest.raises(ConfigError, match="round"):
            export_run(run, out=tmp_path / bad, round_=bad, task=CLASSIFICATION)
    with pytest.raises(ConfigError, match="no site 'elsewhere'"):
        export_run(run, out=tmp_path / "x", sites=["elsewhere"], task=CLASSIFICATION)


def test_a_method_without_federation_has_no_deputy(runs, tmp_path):
    run = tmp_path / "local_run"
    run.mkdir()
    for name in ("summary.json", "metrics.csv", "run.json"):
        shutil.copy(runs["classification"] / name, run / name)
    config = {**yaml.safe_load((runs["classification"] / "config.yaml").read_text()), "method": "local"}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    record = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**record, "config_sha256": config_digest(config)}))
    with pytest.raises(ConfigError, match="no deputy"):
        export_run(run, role="deputy", task=CLASSIFICATION)
    with pytest.raises(MedflError, match="no such run folder"):
        export_run(tmp_path / "nothing", task=CLASSIFICATION)


def test_cli_export_prints_each_site_and_refuses_a_second_time(runs, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["export", str(runs["classification"]), "--out", str(out), "--site", "derm_a"]) == 0
    printed = capsys.readouterr().out
    assert "derm_a: personalized model P of round" in printed and str(out / "derm_a") in printed
    assert main(["export", str(runs["classification"]), "--out", str(out), "--site", "derm_a"]) == 1
    assert "never overwritten" in capsys.readouterr().err


def test_find_export_takes_a_site_folder_or_a_root_with_site(derm_export):
    out, _ = derm_export
    assert find_export(out / "derm_b") == out / "derm_b"
    assert find_export(out, "derm_a") == out / "derm_a"
    with pytest.raises(ConfigError, match="derm_a, derm_b; choose one with --site"):
        find_export(out)
    with pytest.raises(ConfigError, match="no export of site 'derm_c'"):
        find_export(out, "derm_c")
    with pytest.raises(ConfigError, match="not 'derm_a'"):
        find_export(out / "derm_b", "derm_a")
    with pytest.raises(ConfigError, match="not an export folder"):
        find_export(out.parent)


def test_load_export_refuses_weights_that_changed(derm_export, tmp_path):
    out, _ = derm_export
    copy = tmp_path / "derm_a"
    shutil.copytree(out / "derm_a", copy)
    export = load_export(copy)
    assert export.site == "derm_a" and not export.network.training
    state = torch.load(copy / "model.pt", weights_only=True)
    next(iter(state.values())).add_(1.0)
    torch.save(state, copy / "model.pt")
    with pytest.raises(DataError, match="sha256 differs"):
        load_export(copy)


# ---------------------------------------------------------------- a command that serves one site reads only its own
@pytest.fixture(scope="module")
def variable(tmp_path_factory):
    return variable_run(tmp_path_factory)


def test_export_of_one_site_never_reads_another_sites_config(variable, tmp_path, monkeypatch, capsys):
    run, values = variable
    monkeypatch.setenv(SITE_VARIABLES["derm_a"], values[SITE_VARIABLES["derm_a"]])
    monkeypatch.delenv(SITE_VARIABLES["derm_b"], raising=False)  # derm_b's data lies at another hospital
    assert main(["export", str(run), "--site", "derm_a", "--out", str(tmp_path / "a")]) == 0, capsys.readouterr().err
    assert read_manifest(tmp_path / "a" / "derm_a")["site"] == "derm_a"
    monkeypatch.delenv(SITE_VARIABLES["derm_a"])  # nor its own: the run folder holds what an export needs
    assert main(["export", str(run), "--out", str(tmp_path / "all")]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == list(DERM_SITES)
    assert _sha256(tmp_path / "all" / "derm_a" / "model.pt") == _sha256(tmp_path / "a" / "derm_a" / "model.pt")


def test_export_refuses_a_site_whose_part_of_the_run_is_elsewhere_before_writing(variable, tmp_path):
    run = Path(shutil.copytree(variable[0], tmp_path / "run"))
    shutil.rmtree(run / "sites" / "derm_b")
    with pytest.raises(ConfigError, match=r"site 'derm_b' keeps its part of the run elsewhere \(no .*derm_b\)"):
        export_run(run, out=tmp_path / "out", task=CLASSIFICATION)
    assert not (tmp_path / "out").exists()
    (exported,) = export_run(run, out=tmp_path / "out", sites=["derm_a"], task=CLASSIFICATION)
    assert exported.site == "derm_a"


def test_export_refuses_a_run_config_changed_after_the_run(variable, tmp_path, capsys):
    run = Path(shutil.copytree(variable[0], tmp_path / "run"))
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump(config, default_flow_style=True))  # the same config, rewritten
    assert main(["export", str(run), "--site", "derm_a", "--out", str(tmp_path / "same")]) == 0
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "rounds": 5}))  # rounds may change (a resume)
    assert main(["export", str(run), "--site", "derm_a", "--out", str(tmp_path / "longer")]) == 0
    capsys.readouterr()
    config["optimizer"]["lr"] = 0.5
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["export", str(run), "--out", str(tmp_path / "changed")]) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"medfl export: error: {run / 'config.yaml'}: changed after the run")
    assert len(error.splitlines()) == 1 and "Traceback" not in error
    assert not (tmp_path / "changed").exists()
