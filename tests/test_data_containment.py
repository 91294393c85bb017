"""Sites stay inside their folders: files a site config names or its table lists must resolve (symlinks
followed) inside data_root or the config's folder; refused files are never opened, their contents never shown.

The fixtures write configs to tmp_path/configs and data to tmp_path/data/<site>; tmp_path/outside is neither.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from conftest import phantom_case, write_jpeg, write_volume

from medfl.config import load_site_config
from medfl.data import SiteData, load_site, validate_site
from medfl.errors import ConfigError, DataError
from medfl.tasks import task_for

SECRET = "SECRET-FIRST-LINE-must-never-be-printed"


def _outside(tmp_path: Path) -> Path:
    folder = tmp_path / "outside"
    folder.mkdir(exist_ok=True)
    return folder


def _secret(tmp_path: Path) -> Path:
    path = _outside(tmp_path) / "secret.txt"
    path.write_text(f"{SECRET}\nmore,private,lines\n")
    return path


def _errors(config: Path) -> list[str]:
    site = load_site_config(config)
    return [str(p) for p in validate_site(site, task=task_for(site.task)) if p.severity == "error"]


def _load(config: Path) -> SiteData:
    site = load_site_config(config)
    return load_site(site, task=task_for(site.task))


def _append_rows(table: Path, rows: list[list[str]]) -> None:
    with table.open("a", newline="") as stream:
        csv.writer(stream).writerows(rows)


@pytest.mark.parametrize("table", ["../../outside/secret.txt", "ABSOLUTE", "SYMLINK"])
def test_a_table_outside_the_site_is_refused_unread(csv_site, tmp_path, table):
    secret = _secret(tmp_path)
    config = csv_site()
    root = load_site_config(config).data_root
    if table == "ABSOLUTE":
        table = str(secret)
    elif table == "SYMLINK":
        (root / "link.csv").symlink_to(secret)
        table = "link.csv"
    config = csv_site(table=table)
    errors = _errors(config)
    assert len(errors) == 1
    assert "site 'derm_csv'" in errors[0] and "secret.txt" in errors[0]
    assert "table lies outside data_root and the site config's folder" in errors[0]
    with pytest.raises(DataError) as caught:
        _load(config)
    assert SECRET not in str(caught.value) and "private" not in str(caught.value)


def test_a_table_that_is_not_a_table_is_never_quoted(csv_site):
    config = csv_site()
    root = load_site_config(config).data_root
    (root / "notes.txt").write_text(f"{SECRET}\n")
    (errors,) = _errors(csv_site(table="notes.txt"))
    assert "lacks column(s) image, label" in errors and "its first line holds none of them" in errors
    assert SECRET not in errors


def test_metadata_and_split_files_outside_are_refused(isic2019_site, csv_site, tmp_path):
    secret = _secret(tmp_path)
    errors = _errors(isic2019_site(metadata_table=str(secret)))
    assert len(errors) == 1 and "metadata table lies outside" in errors[0]
    errors = _errors(csv_site(name="derm_split", split_file="../outside/secret.txt"))
    assert len(errors) == 1 and "split file lies outside" in errors[0] and SECRET not in errors[0]


def test_dotdot_is_fine_while_the_result_stays_inside(csv_site, tmp_path, write_config):
    config = csv_site()
    root = load_site_config(config).data_root
    # A table reached through `..` that lands back in data_root, and one in the config's own folder.
    (root / "sub").mkdir()
    assert not _errors(csv_site(table="sub/../labels.csv"))
    (tmp_path / "configs" / "labels.csv").write_bytes((root / "labels.csv").read_bytes())
    assert not _errors(csv_site(table="../../configs/labels.csv"))


def test_data_root_itself_may_be_anywhere_even_behind_a_symlink(csv_site, tmp_path):
    config = csv_site()
    real = load_site_config(config).data_root
    link = _outside(tmp_path) / "root_link"
    link.symlink_to(real, target_is_directory=True)
    data = _load(csv_site(data_root=str(link)))
    assert sum(len(records) for records in data.splits.values()) > 0


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_images_outside_the_site_are_refused_by_name(csv_site, tmp_path, kind):
    outside_image = write_jpeg(_outside(tmp_path) / "stolen.jpg", seed=99)
    config = csv_site()
    root = load_site_config(config).data_root
    image = {"dotdot": "../../outside/stolen.jpg", "absolute": str(outside_image), "symlink": "nv/stolen.jpg"}[kind]
    if kind == "symlink":
        (root / "nv" / "stolen.jpg").symlink_to(outside_image)
    _append_rows(root / "labels.csv", [[image, "naevus", "L_stolen"]])
    errors = _errors(config)
    assert len(errors) == 1
    assert f"image '{image}' lies outside data_root" in errors[0]
    assert "stolen.jpg" in errors[0]


def test_a_symlinked_image_found_by_its_id_is_refused(ham10000_site, tmp_path):
    outside_image = write_jpeg(_outside(tmp_path) / "ISIC_nv000a.jpg", seed=5)
    config = ham10000_site()
    root = load_site_config(config).data_root
    original = next(root.rglob("ISIC_nv000a.jpg"))
    original.unlink()
    original.symlink_to(outside_image)
    (error,) = _errors(config)
    assert "site 'derm_a'" in error and "image 'ISIC_nv000a' lies outside data_root" in error


def test_symlinked_volumes_and_metaimage_data_files_outside_are_refused(prostate_site, tmp_path):
    config = prostate_site(cases=("Case00", "Case01", "Case02", "Case03"))
    root = load_site_config(config).data_root
    image, _ = phantom_case()
    elsewhere = write_volume(_outside(tmp_path) / "Case01.nii.gz", image)
    (root / "Case01.nii.gz").unlink()
    (root / "Case01.nii.gz").symlink_to(elsewhere)
    (error,) = _errors(config)
    assert "Case01.nii.gz: image lies outside data_root" in error

    config = prostate_site(layout="metaimage", name="prost_m", cases=("Case00", "Case01", "Case02", "Case03"))
    root = load_site_config(config).data_root
    header = root / "Case02_segmentation.mhd"
    raw = next(line for line in header.read_text().splitlines() if line.startswith("ElementDataFile"))
    data_file = root / raw.split("=")[1].strip()
    moved = _outside(tmp_path) / data_file.name
    data_file.rename(moved)
    header.write_text(header.read_text().replace(raw, "ElementDataFile = ../../outside/" + moved.name))
    (error,) = _errors(config)
    assert moved.name in error and "data file of the mask lies outside data_root" in error


@pytest.mark.parametrize("name", [".", "..", ""])
def test_folder_alias_and_empty_site_names_are_refused(write_config, name):
    config = write_config({"name": name, "task": "segmentation", "data_root": "d", "layout": "nifti"}, name="s.yaml")
    with pytest.raises(ConfigError, match="key 'name'"):
        load_site_config(config)


def test_site_names_keep_their_alphabet(write_config):
    config = write_config({"name": "site.A-1_b", "task": "segmentation", "data_root": "d", "layout": "nifti"})
    assert load_site_config(config).name == "site.A-1_b"
    bad = write_config({"name": "a/b", "task": "segmentation", "data_root": "d", "layout": "nifti"}, name="t.yaml")
    with pytest.raises(ConfigError, match="key 'name'"):
        load_site_config(bad)


def test_check_reports_the_refusal_as_a_data_problem(csv_site, tmp_path, capsys):
    from medfl.cli import main

    secret = _secret(tmp_path)
    config = csv_site(table=str(secret))
    assert main(["check", str(config)]) != 0
    captured = capsys.readouterr()
    assert "table lies outside data_root" in captured.out + captured.err
    assert SECRET not in captured.out + captured.err

