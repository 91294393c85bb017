"""load_site / validate_site / inspect_site: counts, reports and every bad input as one DataError."""

from __future__ import annotations

import pytest
from conftest import default_derm_rows

from medfl.config import DataSettings, load_site_config
from medfl.data import CaseGeometry, inspect_site, load_site, validate_site
from medfl.errors import DataError
from medfl.tasks import task_for

CLASSIFICATION, SEGMENTATION = task_for("classification"), task_for("segmentation")


def test_classification_site_counts_and_report(ham10000_site):
    data = load_site(load_site_config(ham10000_site(dataset=lambda i: "a" if i < 40 else "b",
                                                    filter={"column": "dataset", "values": ["a"]})),
                     task=CLASSIFICATION)
    assert data.name == "derm_a" and data.task == "classification" and data.classes == ["nv", "bkl", "mel"]
    assert data.class_counts("train") == data.report.counts["train"]
    assert [sum(c) for c in zip(*data.report.counts.values(), strict=True)] == [14, 14, 12]
    assert data.report.samples == {split: len(data.splits[split]) for split in ("train", "val", "test")}
    assert data.report.dropped == {} and data.report.filtered_out == 4
    assert data.report.problems == [] and data.geometry == {}


def test_segmentation_site_counts_pixels_and_keeps_geometry(prostate_site):
    data = load_site(load_site_config(prostate_site()), DataSettings(input_size=16), task=SEGMENTATION)
    assert data.classes == ["background", "prostate"]
    background, prostate = data.class_counts("train")
    assert background + prostate == data.report.samples["train"] * 16 * 16 and prostate > 0
    assert data.report.groups == {"train": 5, "val": 1, "test": 2}
    assert data.report.foreground_slices["val"] == 3
    assert all(isinstance(g, CaseGeometry) for g in data.geometry.values()) and len(data.geometry) == 8


def test_load_site_raises_one_error_listing_every_problem(ham10000_site):
    rows = default_derm_rows() + [("ISIC_y", "melanoma", "L9"), ("ISIC_nv001a", "nv", "HAM_nv001")]
    path = ham10000_site(rows=rows)
    site = load_site_config(path)
    next(site.data_root.rglob("ISIC_bkl003a.jpg")).write_bytes(b"junk")
    with pytest.raises(DataError) as caught:
        load_site(site, task=CLASSIFICATION)
    lines = str(caught.value).splitlines()
    assert lines[0] == "site 'derm_a' has 3 data problem(s):"
    assert all(line.strip().startswith("site 'derm_a': ") for line in lines[1:])
    assert len(validate_site(site, task=CLASSIFICATION)) == 3


def test_missing_data_root(write_config):
    path = write_config({"name": "p", "task": "segmentation", "data_root": "../nowhere", "layout": "nifti"})
    problems = validate_site(load_site_config(path), task=SEGMENTATION)
    assert [(p.message, p.severity) for p in problems] == [("data_root folder not found", "error")]


def test_site_without_samples(write_config, tmp_path):
    (tmp_path / "empty").mkdir()
    path = write_config({"name": "p", "task": "segmentation", "data_root": "../empty", "layout": "metaimage"})
    assert [p.message for p in validate_site(load_site_config(path), task=SEGMENTATION)] == ["the site has no samples"]


def test_site_too_small_for_validation_is_an_error(prostate_site):
    data = inspect_site(load_site_config(prostate_site(cases=("Case01",))), DataSettings(input_size=8), task=SEGMENTATION)
    assert [p.message for p in data.report.errors] == ["the val split is empty (0 groups)"]
    assert [p.message for p in data.report.warnings] == ["the test split is empty"]


def test_class_absent_from_training_is_a_warning_not_an_error(ham10000_site):
    rows = [r for r in default_derm_rows() if r[1] != "mel"] + [("ISIC_m1", "mel", "L1")]
    data = inspect_site(load_site_config(ham10000_site(rows=rows)), task=CLASSIFICATION)
    assert data.report.errors == []
    messages = [p.message for p in data.report.warnings]
    assert "class 'mel' is absent from the val split" in messages
    assert "class 'mel' is absent from the test split" in messages
    assert data.class_counts("train")[2] == 1
    rows = [r for r in default_derm_rows() if r[1] != "mel"]
    data = inspect_site(load_site_config(ham10000_site(rows=rows, name="derm_b")), DataSettings(classes=["nv", "mel"]),
                        task=CLASSIFICATION)
    assert "class 'mel' is absent from the train split" in [p.message for p in data.report.warnings]
    assert data.report.dropped == {"akiec": 2, "bkl": 14}


@pytest.mark.parametrize("fixture", ["isic2019_site", "csv_site"])
def test_every_classification_layout_loads(request, fixture):
    data = load_site(load_site_config(request.getfixturevalue(fixture)()), DataSettings(classes=["nv", "bkl", "mel"]),
                     task=CLASSIFICATION)
    assert sum(data.report.samples.values()) == 42 and sum(data.report.dropped.values()) == 2
