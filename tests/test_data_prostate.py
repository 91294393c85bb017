"""Prostate sites: pairing by name, slice selection, 2.5-D records, case splits."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import phantom_case, write_csv, write_volume

from medfl.config import DataSettings, load_site_config
from medfl.data.problems import ProblemLog
from medfl.data.prostate import find_cases, read_segmentation_site, select_slices, slice_record
from medfl.data.volumes import PreparedCase


def _read(path, **settings):
    site = load_site_config(path)
    log = ProblemLog(site.name)
    return site, read_segmentation_site(site, DataSettings(input_size=16, **settings), log), log


@pytest.mark.parametrize("layout", ["nifti", "metaimage"])
def test_cases_pair_by_name_whatever_the_suffix_case(prostate_site, layout):
    site = load_site_config(prostate_site(layout=layout, cases=("Case00", "Case07", "Case13")))
    log = ProblemLog(site.name)
    cases = find_cases(site, log)
    assert not log.problems()
    assert [c.case_id for c in cases] == ["Case00", "Case07", "Case13"]
    assert cases[1].mask.name.startswith("Case07_Segmentation")


def test_custom_mask_suffix(tmp_path, write_config):
    image, mask = phantom_case()
    write_volume(tmp_path / "d" / "P1.nii.gz", image)
    write_volume(tmp_path / "d" / "P1_MASK.nii.gz", mask)
    path = write_config({"name": "p", "task": "segmentation", "data_root": "../d", "layout": "nifti",
                         "mask_suffix": "_mask"})
    site = load_site_config(path)
    assert [(c.case_id, c.mask.name) for c in find_cases(site, ProblemLog("p"))] == [("P1", "P1_MASK.nii.gz")]


def test_unpaired_and_duplicate_cases_are_errors(prostate_site):
    site = load_site_config(prostate_site(cases=("Case01", "Case02", "Case03")))
    (site.data_root / "Case01_segmentation.nii.gz").unlink()
    (site.data_root / "Case02.nii.gz").unlink()
    image, _ = phantom_case()
    write_volume(site.data_root / "sub" / "case03.nii.gz", image)
    log = ProblemLog(site.name)
    assert find_cases(site, log) == []
    messages = {p.message for p in log.problems()}
    assert "no mask for this image (expected Case01_segmentation.nii.gz)" in messages
    assert "mask without an image of the same case" in messages
    assert "duplicate case id 'case03' (files: Case03.nii.gz, case03.nii.gz, Case03_segmentation.nii.gz)" in messages


def test_slice_selection_all_or_foreground_plus_a_share_of_empty():
    mask = np.zeros((10, 4, 4), np.uint8)
    mask[3:6, 1, 1] = 1
    assert select_slices(mask, "all", 0.5, 0, "c") == list(range(10))
    assert select_slices(mask, "foreground", 0.0, 0, "c") == [3, 4, 5]
    kept = select_slices(mask, "foreground", 0.3, 0, "c")
    assert len(kept) == 5 and {3, 4, 5} <= set(kept)
    assert select_slices(mask, "foreground", 0.3, 0, "c") == kept
    assert select_slices(mask, "foreground", 1.0, 0, "c") == list(range(10))


def test_slice_records_with_context_repeat_edges_and_share_memory():
    image = np.arange(5 * 2 * 2, dtype=np.float32).reshape(5, 2, 2)
    mask = np.zeros((5, 2, 2), np.uint8)
    case = PreparedCase("Case04", image, mask, geometry=None)
    middle = slice_record(case, 2, 1, "prost_a")
    assert middle["image"].shape == (3, 2, 2) and np.shares_memory(middle["image"], image)
    assert middle["label"].shape == (1, 2, 2) and middle["label"].dtype == np.uint8
    assert {k: middle[k] for k in ("case_id", "slice_index", "num_slices", "site")} == \
        {"case_id": "Case04", "slice_index": 2, "num_slices": 5, "site": "prost_a"}
    edge = slice_record(case, 0, 2, "prost_a")
    assert [int(s[0, 0]) for s in edge["image"]] == [0, 0, 0, 4, 8]
    assert slice_record(case, 4, 0, "prost_a")["image"].shape == (1, 2, 2)


def test_site_splits_by_case_and_val_test_keep_every_slice(prostate_site):
    site, content, log = _read(prostate_site(depth=8), slices="foreground", empty_slice_fraction=0.0,
                               context_slices=1)
    assert not log.problems()
    assert content.groups == {"train": 5, "val": 1, "test": 2}
    cases = {split: {r["case_id"] for r in records} for split, records in content.splits.items()}
    assert not (cases["train"] & cases["val"]) and not (cases["train"] & cases["test"])
    assert len(content.splits["val"]) == 8 and len(content.splits["test"]) == 16
    assert all(r["label"].any() for r in content.splits["train"]) and len(content.splits["train"]) == 5 * 5
    record = content.splits["train"][0]
    assert record["image"].shape == (3, 16, 16) and record["image"].dtype == np.float32
    assert set(content.geometry) == {c for names in cases.values() for c in names}


def test_official_case_split_matches_ids_case_insensitively(prostate_site, tmp_path):
    cases = ("Case00", "Case02", "Case05", "Case07")
    write_csv(tmp_path / "configs" / "split.csv", ["id", "split"],
              [("case00", "train"), ("CASE02", "train"), ("Case05", "val"), ("Case07", "test"), ("Case99", "test")])
    _, content, log = _read(prostate_site(cases=cases, split_file="split.csv"))
    assert {split: sorted({r["case_id"] for r in records}) for split, records in content.splits.items()} == \
        {"train": ["Case00", "Case02"], "val": ["Case05"], "test": ["Case07"]}
    assert [(p.severity, p.message) for p in log.problems()] == \
        [("warning", "case 'case99' is listed but not among the site's usable cases")]


def test_a_corrupt_case_is_reported_and_left_out(prostate_site):
    path = prostate_site(cases=("Case00", "Case01", "Case02", "Case03"))
    site = load_site_config(path)
    broken = site.data_root / "Case02.nii.gz"
    broken.write_bytes(broken.read_bytes()[:200])
    _, content, log = _read(path)
    assert [p.file for p in log.problems()] == [str(broken)]
    assert sum(content.groups.values()) == 3 and "Case02" not in content.geometry


def test_a_metaimage_case_without_its_raw_file_names_the_raw_file(prostate_site):
    path = prostate_site(layout="metaimage", cases=("Case00", "Case01", "Case02", "Case03"))
    site = load_site_config(path)
    raw = site.data_root / "Case01.raw"
    raw.unlink()
    _, content, log = _read(path)
    (problem,) = log.problems()
    assert problem.file == str(site.data_root / "Case01.mhd") and str(raw) in str(problem)
    assert "is missing" in str(problem) and "Case01" not in content.geometry


@pytest.mark.parametrize(("values", "expected"), [(0.0, "value(s) 0: a blank volume"),
                                                  (None, "value(s) 0, 1, 2: a mask, not an MRI volume")])
def test_a_blank_or_mask_like_image_volume_is_an_error_naming_its_file(prostate_site, values, expected):
    """An all-zero image with a non-empty mask was trained on without a word (predict refused it)."""
    path = prostate_site(cases=("Case00", "Case01", "Case02", "Case03"))
    site = load_site_config(path)
    image, mask = phantom_case(seed=1)
    blank = write_volume(site.data_root / "Case01.nii.gz", np.zeros_like(image) if values is not None else mask)
    _, content, log = _read(path)
    (problem,) = log.problems()
    assert problem.severity == "error" and problem.file == str(blank) and expected in problem.message
    assert f"its mask marks {int((mask > 0).sum())} voxels" in problem.message
    assert "Case01" not in content.geometry
