"""Tests for medfl.synth and `medfl synth`: determinism, layouts, counts, volumes, configs, extra sites."""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import yaml
from PIL import Image

from medfl.commands import synth as synth_command
from medfl.config import DataSettings, load_site_config
from medfl.data import load_site
from medfl.errors import ConfigError
from medfl.synth import DEFAULT_OUT, DEFAULT_SCALE, Minimums, generate
from medfl.synth.site_configs import config_yaml, derm_config, prostate_config
from medfl.synth.sites import REFERENCE_DERM, REFERENCE_PROSTATE, site_name
from medfl.tasks import task_for

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
TINY = Minimums(train=2, val=1, test=1, cases=3)  # 12 lesions per class, 3 cases per prostate site
ARGS = {"seed": 3, "scale": 0.01, "n_derm": 6, "n_prostate": 8, "minimums": TINY}


def _hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _table(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("synth")
    return generate(out, **ARGS)


def test_same_arguments_give_identical_files_in_another_process(synth, tmp_path: Path) -> None:
    script = (
        "import sys; from medfl.synth import Minimums, generate; "
        "generate(sys.argv[1], seed=3, scale=0.01, n_derm=6, n_prostate=8, minimums=Minimums(2, 1, 1, 3))"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, cwd=REPO)
    first, second = _hashes(synth.out), _hashes(tmp_path)
    assert len(first) > 300
    assert first == second


def test_mild_preset_keeps_todays_extra_sites_bit_for_bit(synth) -> None:
    """The mild preset (the default shift) writes the bytes stored before `--shift` existed, the randomly drawn
    extra sites included (tests/data/README.md; tests/test_synth_shift.py guards the default command's data)."""
    expected = json.loads((DATA / "synth_mild_small_sha256.json").read_text())
    written = _hashes(synth.out)
    assert len(expected) == 445 and sorted(k for k in written.keys() | expected.keys()
                                           if written.get(k) != expected.get(k)) == []


def test_another_seed_gives_other_images(synth, tmp_path: Path) -> None:
    other = generate(tmp_path, **{**ARGS, "seed": 4, "n_derm": 1, "n_prostate": 0})
    image = next(p for p in other.derm[0].folder.rglob("*.jpg"))
    twin = synth.derm[0].folder / image.relative_to(other.derm[0].folder)
    assert not twin.exists() or twin.read_bytes() != image.read_bytes()


def test_rerun_changes_nothing_and_prunes_stale_files(tmp_path: Path) -> None:
    args = {**ARGS, "n_derm": 1, "n_prostate": 1}
    generate(tmp_path, **args)
    stale = tmp_path / "prostate" / "prost_a" / "Case99.nii.gz"
    stale.write_bytes(b"left over from a bigger run")
    before = _hashes(tmp_path)
    again = generate(tmp_path, **args)
    assert again.changed == 0
    assert not stale.exists()
    del before["prostate/prost_a/Case99.nii.gz"]
    assert _hashes(tmp_path) == before


def test_refuses_a_site_folder_it_did_not_write(tmp_path: Path) -> None:
    foreign = tmp_path / "dermoscopy" / "derm_a"
    foreign.mkdir(parents=True)
    (foreign / "my_image.jpg").write_bytes(b"someone's data")
    with pytest.raises(ConfigError, match="not written by medfl synth"):
        generate(tmp_path, **{**ARGS, "n_derm": 1, "n_prostate": 0})
    assert (foreign / "my_image.jpg").read_bytes() == b"someone's data"


@pytest.mark.parametrize(
    ("changes", "message"),
    [({"scale": 0}, "--scale"), ({"scale": 99}, "--scale"), ({"n_derm": -1}, "--derm-sites"),
     ({"n_prostate": 65}, "--prostate-sites"), ({"minimums": Minimums(val=0)}, "minimums"),
     ({"minimums": Minimums(val=1000)}, "more than")],
)  # fmt: skip
def test_bad_arguments_are_config_errors(tmp_path: Path, changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        generate(tmp_path, **{**ARGS, **changes})
    assert not any(tmp_path.iterdir())


def test_site_names_and_layouts(synth) -> None:
    assert [s.name for s in synth.derm] == ["derm_a", "derm_b", "derm_c", "derm_d", "derm_e", "derm_f"]
    assert [s.name for s in synth.prostate] == [f"prost_{c}" for c in "abcdefgh"]
    assert {s.layout for s in synth.derm[:4]} == {"ham10000", "csv", "isic2019"}
    assert site_name("derm", 26) == "derm_aa"
    configs = {p.relative_to(synth.out).as_posix() for p in synth.configs}
    assert (
        "site_configs/dermoscopy/derm_f.yaml" in configs and "site_configs/prostate/prost_h.yaml" in configs
    )


def test_ham10000_site_with_filter_and_left_out_labels(synth) -> None:
    derm_a, derm_b = synth.derm[0].folder, synth.derm[1].folder
    rows = _table(derm_a / "HAM10000_metadata.csv")
    assert list(rows[0]) == [
        "lesion_id",
        "image_id",
        "dx",
        "dx_type",
        "age",
        "sex",
        "localization",
        "dataset",
    ]
    images = {p.stem: p for p in derm_a.rglob("*.jpg")}
    assert {r["image_id"] for r in rows} == set(images)
    assert {p.parent.name for p in images.values()} == {"HAM10000_images_part_1", "HAM10000_images_part_2"}
    assert {r["dataset"] for r in rows} == {"vidir_modern"}
    assert Counter(r["dx"] for r in rows)["bcc"] == 3
    lesion_sizes = Counter(r["lesion_id"] for r in rows).values()
    assert max(lesion_sizes) >= 2 and min(lesion_sizes) == 1
    assert all(r["image_id"].startswith("ISIC_") and len(r["image_id"]) == 12 for r in rows)
    assert all(r["lesion_id"].startswith("HAM_") and len(r["lesion_id"]) == 11 for r in rows)
    b_rows = _table(derm_b / "HAM10000_metadata.csv")
    assert Counter(r["dataset"] for r in b_rows)["vienna_dias"] == synth.derm[1].filtered == 12
    assert yaml.safe_load((synth.out / "site_configs/dermoscopy/derm_b.yaml").read_text())["filter"] == {
        "column": "dataset",
        "values": ["vidir_molemax"],
    }


def test_isic2019_site_one_hot_downsampled_and_metadata(synth) -> None:
    folder = synth.derm[3].folder
    truth = _table(folder / "ISIC_2019_Training_GroundTruth.csv")
    metadata = _table(folder / "ISIC_2019_Training_Metadata.csv")
    assert list(truth[0]) == ["image", "MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
    assert list(metadata[0]) == ["image", "age_approx", "anatom_site_general", "lesion_id", "sex"]
    for row in truth:
        values = [row[c] for c in list(row)[1:]]
        assert sorted(values) == ["0.0"] * 8 + ["1.0"]
    names = [r["image"] for r in truth]
    assert any(n.endswith("_downsampled") for n in names)
    assert {p.stem for p in folder.rglob("*.jpg")} == set(names)
    assert [r["image"] for r in metadata] == names
    lesions = [r["lesion_id"] for r in metadata]
    assert "" in lesions and max(Counter(x for x in lesions if x).values()) >= 2


def test_csv_site_paths_and_label_names(synth) -> None:
    folder = synth.derm[2].folder
    rows = _table(folder / "labels.csv")
    assert list(rows[0]) == ["image", "label", "lesion_id"]
    assert all((folder / r["image"]).is_file() and r["image"].endswith(".jpg") for r in rows)
    config = yaml.safe_load((synth.out / "site_configs/dermoscopy/derm_c.yaml").read_text())
    assert {r["label"] for r in rows} <= set(config["label_map"])
    assert list(config["label_map"].values())[:3] == ["nv", "bkl", "mel"]


def test_images_are_rgb_jpegs_at_the_site_resolution(synth) -> None:
    for site, spec in zip(synth.derm[:4], REFERENCE_DERM, strict=True):
        image_path = next(site.folder.rglob("*.jpg"))
        with Image.open(image_path) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert image.size == (spec.acquisition.resolution,) * 2


def test_every_class_keeps_its_minimum_number_of_lesions(synth) -> None:
    for site in synth.derm:
        lesions = Counter(label for _, label in {(r["lesion_id"], r["label"]) for r in site.records})
        assert set(lesions) == {"nv", "bkl", "mel"}
        assert min(lesions.values()) >= TINY.lesions() == 12
        assert sum(site.class_counts.values()) == len(site.records)


def test_default_counts_follow_the_reference_mix_with_minimums() -> None:
    assert Minimums().lesions() == 60
    derm_b = REFERENCE_DERM[1]
    assert derm_b.totals(0.1) == (372, 12, 2)
    assert derm_b.totals(1.0)[0] == round(2604 / 0.7)


def test_prostate_layouts_suffixes_and_case_ids(synth) -> None:
    by_name = {s.name: s for s in synth.prostate}
    assert sorted(p.name for p in by_name["prost_b"].folder.glob("*_Segmentation.nii.gz"))
    prost_d = by_name["prost_d"].folder
    assert by_name["prost_d"].layout == "metaimage"
    for case in by_name["prost_d"].cases:
        assert {(prost_d / f"{case}{s}").is_file() for s in (".mhd", ".raw", "_segmentation.mhd")} == {True}
    for site in synth.prostate:
        numbers = [int(case[4:]) for case in site.cases]
        assert numbers == sorted(set(numbers))
        assert numbers[-1] - numbers[0] >= len(numbers)  # gaps: not contiguous
    split = _table(by_name["prost_f"].folder / "split.csv")
    assert [r["id"] for r in split] == by_name["prost_f"].cases
    assert {r["split"] for r in split} == {"train", "val", "test"}


def test_nifti_affines_spacing_and_masks(synth) -> None:
    for site, spec in zip(synth.prostate[:6], REFERENCE_PROSTATE, strict=True):
        if site.layout != "nifti":
            continue
        scanner = spec.scanner
        for case in site.cases:
            image = nib.load(site.folder / f"{case}.nii.gz")
            mask = nib.load(site.folder / f"{case}{spec.mask_suffix}.nii.gz")
            assert image.shape == mask.shape == scanner.shape()
            np.testing.assert_allclose(image.header.get_zooms(), scanner.zooms(), rtol=1e-6)
            np.testing.assert_allclose(
                image.affine[:3, :3], np.asarray(scanner.direction) @ np.diag(scanner.zooms()), atol=1e-5
            )
            np.testing.assert_allclose(image.affine, mask.affine)
            assert image.header["qform_code"] == image.header["sform_code"] == 1
            assert image.get_data_dtype() == np.dtype(scanner.dtype)
            values = np.asarray(mask.dataobj)
            assert np.issubdtype(values.dtype, np.integer) and values.min() >= 0
            expected = {"zones": {0, 1, 2}, "binary": {0, 1}, "255": {0, 255}}[scanner.labels]
            assert set(np.unique(values)) == expected


def test_metaimage_geometry(synth) -> None:
    site, spec = synth.prostate[3], REFERENCE_PROSTATE[3]
    for case in site.cases:
        image = sitk.ReadImage(str(site.folder / f"{case}.mhd"))
        mask = sitk.ReadImage(str(site.folder / f"{case}_segmentation.mhd"))
        np.testing.assert_allclose(image.GetSpacing(), spec.scanner.zooms(), rtol=1e-6)
        np.testing.assert_allclose(image.GetDirection(), mask.GetDirection())
        assert image.GetSize() == spec.scanner.shape()
        values = sitk.GetArrayFromImage(mask)
        assert set(np.unique(values)) == {0, 1}


def test_gland_sits_where_the_affine_says(synth) -> None:
    """The mask's world-space centroid is near the pelvis centre for every scanner, whatever the direction."""
    for site in synth.prostate:
        if site.layout != "nifti":
            continue
        for case in site.cases:
            mask = nib.load(next(site.folder.glob(f"{case}_*.nii.gz")))
            ijk = np.argwhere(np.asarray(mask.dataobj) > 0).mean(0)
            world = mask.affine[:3, :3] @ ijk + mask.affine[:3, 3]
            assert np.linalg.norm(world - np.array([0.0, -4.0, 0.0])) < 25


def test_configs_point_at_the_data(synth) -> None:
    for path in synth.configs:
        config = yaml.safe_load(path.read_text())
        assert set(config) <= {"name", "task", "data_root", "layout", "table", "metadata_table", "filter",
                               "label_map", "split_file", "mask_suffix"}  # fmt: skip
        assert config["name"] == path.stem
        assert (path.parent / config["data_root"]).resolve() == (
            synth.out / path.parent.name / config["name"]
        ).resolve()
        if config.get("split_file"):
            assert (path.parent / config["split_file"]).is_file()


def test_medfl_reader_loads_every_site_with_the_class_minimums(synth) -> None:
    settings = DataSettings(classes=["nv", "bkl", "mel"], input_size=16, num_workers=1)
    for path in synth.configs:
        config = load_site_config(path)
        site = load_site(config, settings, task=task_for(config.task))
        assert not site.report.errors, site.report.errors
        if site.task == "classification":
            for split, minimum in (("train", TINY.train), ("val", TINY.val), ("test", TINY.test)):
                assert min(site.class_counts(split)) >= minimum, (site.name, split, site.class_counts(split))
        else:
            cases = {split: {r["case_id"] for r in records} for split, records in site.splits.items()}
            assert sum(map(len, cases.values())) == TINY.cases and all(cases.values())
            assert all(site.class_counts(split)[1] > 0 for split in cases)


def test_shipped_site_configs_match_the_generator() -> None:
    for site in REFERENCE_DERM:
        expected = config_yaml(derm_config(site, f"../../data/synth/dermoscopy/{site.name}"))
        assert (REPO / "site_configs" / "dermoscopy" / f"{site.name}.yaml").read_text() == expected
    for site in REFERENCE_PROSTATE:
        expected = config_yaml(prostate_config(site, f"../../data/synth/prostate/{site.name}"))
        assert (REPO / "site_configs" / "prostate" / f"{site.name}.yaml").read_text() == expected


def test_command_writes_and_summarises(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    synth_command.add_arguments(parser)
    args = parser.parse_args(
        ["--out", str(tmp_path), "--scale", "0.01", "--min-per-class", "2,1,1",
         "--derm-sites", "1", "--prostate-sites", "1"]
    )  # fmt: skip
    assert synth_command.run(args) == 0
    printed = capsys.readouterr().out
    assert "derm_a" in printed and "prost_a" in printed and "bcc=3" in printed
    assert (tmp_path / "site_configs" / "prostate" / "prost_a.yaml").is_file()
    with pytest.raises(SystemExit):
        parser.parse_args(["--min-per-class", "10,5"])
    defaults = parser.parse_args([])
    assert (Path(defaults.out), defaults.scale) == (DEFAULT_OUT, DEFAULT_SCALE)  # the light module's copies
