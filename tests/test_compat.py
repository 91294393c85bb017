"""A run folder and an export written by an earlier medfl (tests/data/compat_6c92377, made at commit 6c92377 by
tests/compat_fixture.py) still load: predict and evaluate give what that medfl gave, report writes the same
tables, and export works from the run folder alone (the site configs it names do not exist here, as at a
hospital that receives a run folder)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from medfl.cli import main

pytestmark = pytest.mark.slow

FIXTURE = Path(__file__).parent / "data" / "compat_6c92377"


@pytest.fixture
def old(tmp_path: Path) -> Path:
    """A copy of the fixture (commands must never write into tests/data)."""
    return Path(shutil.copytree(FIXTURE, tmp_path / "old"))


def _predictions(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as stream:
        return {Path(row["image"]).name: row for row in csv.DictReader(stream)}


def _results(report: str) -> str:
    """The report's result tables: from their heading to the next section that is not a result table."""
    start = report.index("## Test results, mean over sites")
    ends = [report.find(heading, start) for heading in ("## Confusion matrices", "## Figures", "## Notes")]
    return report[start:min(end for end in ends if end >= 0)]


def test_the_fixture_names_site_configs_that_do_not_exist_here():
    config = (FIXTURE / "run" / "config.yaml").read_text(encoding="utf-8")
    sites = [line[2:] for line in config.splitlines() if line.startswith("- /") and line.endswith(".yaml")]
    assert len(sites) == 2 and not any(Path(site).exists() for site in sites)


def test_an_old_export_predicts_what_it_predicted(old, tmp_path):
    images = sorted(str(path) for path in (old / "samples" / "images").glob("*.jpg"))
    assert main(["predict", str(old / "export"), *images, "--out", str(tmp_path / "predicted"), "--device", "cpu"]) == 0
    expected = _predictions(old / "expected" / "predict" / "predictions.csv")
    got = _predictions(tmp_path / "predicted" / "predictions.csv")
    assert sorted(got) == sorted(expected) and len(expected) == 6
    assert len({row["predicted"] for row in expected.values()}) > 1  # the model tells the images apart
    for name, row in expected.items():
        assert got[name]["predicted"] == row["predicted"]
        for column in ("prob_nv", "prob_bkl", "prob_mel"):
            assert float(got[name][column]) == pytest.approx(float(row[column]), abs=1e-6)


def test_an_old_export_scores_what_it_scored(old, tmp_path):
    out = tmp_path / "scores.json"
    assert main(["evaluate", str(old / "export"), str(old / "samples" / "site.yaml"), "--split", "all",
                 "--out", str(out), "--device", "cpu"]) == 0
    expected = json.loads((old / "expected" / "evaluate.json").read_text())
    got = json.loads(out.read_text())
    assert got["samples"] == expected["samples"] == 6
    assert got["export"]["weights_sha256"] == expected["export"]["weights_sha256"]
    assert got["metrics"] == pytest.approx(expected["metrics"], abs=1e-9)


def test_an_old_run_folder_reports_the_same_tables(old, tmp_path):
    assert main(["report", str(old / "run"), "--out", str(tmp_path / "report"), "--device", "cpu"]) == 0
    expected = (old / "expected" / "report" / "report.md").read_text(encoding="utf-8")
    got = (tmp_path / "report" / "report.md").read_text(encoding="utf-8")
    assert "### derm_b" in _results(expected) and _results(got) == _results(expected)
    notes = [line for line in got.splitlines() if line.startswith("- confusion matrix of site")]
    assert [note.split(" skipped: ")[0] for note in notes] == [
        "- confusion matrix of site 'derm_a'", "- confusion matrix of site 'derm_b'"]  # their data is not here


def test_an_old_run_folder_exports_what_it_exported(old, tmp_path):
    assert main(["export", str(old / "run"), "--out", str(tmp_path / "new")]) == 0
    assert sorted(path.name for path in (tmp_path / "new").iterdir()) == ["derm_a", "derm_b"]
    new, before = tmp_path / "new" / "derm_a", old / "export" / "derm_a"
    weights = torch.load(new / "model.pt", weights_only=True)
    expected = torch.load(before / "model.pt", weights_only=True)
    assert weights.keys() == expected.keys() and all(torch.equal(weights[k], v) for k, v in expected.items())
    manifest, old_manifest = (json.loads((folder / "manifest.json").read_text()) for folder in (new, before))
    assert manifest["files"]["eval_transforms.yaml"] == old_manifest["files"]["eval_transforms.yaml"]
    # what exports record since: the run's sites (evaluate's advice to a site outside the run)
    assert manifest["experiment"] == {**old_manifest["experiment"], "run_dir": str((old / "run").resolve()),
                                      "sites": ["derm_a", "derm_b"]}
    for key in set(old_manifest) - {"experiment", "files", "versions", "exported_at"}:
        assert manifest[key] == old_manifest[key], key
