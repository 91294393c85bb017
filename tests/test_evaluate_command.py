"""`medfl evaluate`: an export scored on its own site reproduces the run's test metrics; other sites, all
their data, the printed and written scores, and mistakes (wrong task, unknown split)."""

from __future__ import annotations

import json

import pytest
from test_export import tiny_runs

from medfl.cli import main
from medfl.config import load_site_config
from medfl.data import load_site
from medfl.deliver import evaluate_export, export_run, load_export
from medfl.deliver.evaluate import split_note
from medfl.errors import ConfigError
from medfl.experiment import load_experiment_config
from medfl.tasks import task_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    runs = tiny_runs(tmp_path_factory)
    out = tmp_path_factory.mktemp("evaluate_exports")
    export_run(runs["classification"], out=out / "derm", sites=["derm_a"], task=task_for("classification"))
    export_run(runs["segmentation"], out=out / "prostate", task=task_for("segmentation"))
    configs = runs["federation"] / "site_configs"
    return {
        "derm": out / "derm" / "derm_a", "prostate": out / "prostate" / "prost_a",
        "derm_a": configs / "dermoscopy" / "derm_a.yaml", "derm_b": configs / "dermoscopy" / "derm_b.yaml",
        "prost_a": configs / "prostate" / "prost_a.yaml", "prost_b": configs / "prostate" / "prost_b.yaml",
        "runs": runs,
    }


@pytest.mark.parametrize(("export", "site"), [("derm", "derm_a"), ("prostate", "prost_a")])
def test_own_test_split_reproduces_the_runs_test_metrics(setup, export, site):
    exported = load_export(setup[export])
    result = evaluate_export(exported, setup[site], "test", task=task_for(exported.task))
    assert result["site"] == site and result["split"] == "test"
    assert result["metrics"] == pytest.approx(exported.manifest["metrics"]["test"], rel=1e-6, nan_ok=True)


@pytest.mark.parametrize(("export", "site", "task"), [("derm", "derm_b", "classification"),
                                                      ("prostate", "prost_b", "segmentation")])
def test_another_site_is_scored_on_all_its_data(setup, export, site, task):
    exported = load_export(setup[export])
    result = evaluate_export(exported, setup[site], "all", task=task_for(exported.task))
    config = load_experiment_config(setup["runs"][task] / "config.yaml")
    data = load_site(load_site_config(setup[site]), config.data.model_copy(update={"slices": "all"}),
                     task=task_for(config.task))
    assert result["samples"] == sum(len(records) for records in data.splits.values())
    metric = "macro_f1" if task == "classification" else "dice"
    assert result["metric"] == metric and 0.0 <= result["metrics"][metric] <= 1.0
    if task == "segmentation":
        assert result["metrics"]["num_cases"] == sum(data.report.groups.values())


def test_cli_prints_and_writes_the_scores(setup, tmp_path, capsys):
    assert main(["evaluate", str(setup["derm"]), str(setup["derm_b"]), "--split", "val"]) == 0
    printed = capsys.readouterr().out
    written = setup["derm"] / "evaluations" / "derm_b_val.json"
    result = json.loads(written.read_text())
    assert result["site"] == "derm_b" and result["export"]["site"] == "derm_a"
    assert result["export"]["weights_sha256"] == json.loads((setup["derm"] / "manifest.json").read_text())[
        "files"]["model.pt"]
    assert "on site 'derm_b', val split" in printed and "macro_f1" in printed and str(written) in printed
    assert f"{result['metrics']['macro_f1']:.4f}" in printed
    out = tmp_path / "scores.json"
    assert main(["evaluate", str(setup["prostate"].parent), str(setup["prost_a"]), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["metric"] == "dice"


def test_mistakes_are_one_line_errors(setup, capsys):
    assert main(["evaluate", str(setup["derm"]), str(setup["prost_a"])]) == 1
    error = capsys.readouterr().err
    assert "a segmentation site cannot score the classification model" in error and len(error.splitlines()) == 1
    with pytest.raises(ConfigError, match="--split must be one of"):
        evaluate_export(load_export(setup["derm"]), setup["derm_a"], "holdout", task=task_for("classification"))


def test_segmentation_scores_are_described_per_case(setup, capsys):
    assert main(["evaluate", str(setup["prostate"]), str(setup["prost_a"]), "--out", str(setup["prostate"] / "x.json")]) == 0
    out = capsys.readouterr().out
    cases = json.loads((setup["prostate"] / "x.json").read_text())["metrics"]["num_cases"]
    header = out.splitlines()[0]
    assert f"test split ({cases} cases, " in header and "metrics per case" in header and "samples" not in header


def test_a_site_that_was_not_in_the_run_is_told_that_split_all_scores_all_its_data(setup, tmp_path, capsys):
    out = str(tmp_path / "scores.json")
    assert main(["evaluate", str(setup["prostate"]), str(setup["prost_b"]), "--out", out]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "--split all" in line]
    assert len(notes) == 1 and "site 'prost_b' did not take part in run" in notes[0] and "20%" in notes[0]
    for site in ("prost_a", "prost_b"):  # its own site, or --split all: nothing to say
        split = ["--split", "all"] if site == "prost_b" else []
        assert main(["evaluate", str(setup["prostate"]), str(setup[site]), "--out", out, *split]) == 0
        assert "--split all" not in capsys.readouterr().err
    assert main(["evaluate", str(setup["derm"]), str(setup["derm_b"]), "--out", out]) == 0  # derm_b was in the run
    assert "--split all" not in capsys.readouterr().err


def test_an_export_without_its_runs_sites_gives_the_advice_conditionally(setup):
    manifest = json.loads((setup["prostate"] / "manifest.json").read_text())
    assert manifest["experiment"]["sites"] == ["prost_a"]
    del manifest["experiment"]["sites"]  # as exports made before the list was recorded
    note = split_note(manifest, load_site_config(setup["prost_b"]), "test")
    assert note.startswith("this export does not list its run's sites: if site 'prost_b' did not take part")
    assert "`--split all` scores all of it" in note
    assert split_note(manifest, load_site_config(setup["prost_a"]), "test") is None
