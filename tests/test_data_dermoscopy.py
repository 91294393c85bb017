"""Reading the dermoscopy layouts (ham10000, isic2019, csv) into source rows."""

from __future__ import annotations

import shutil

from conftest import write_csv, write_jpeg

from medfl.config import load_site_config
from medfl.data.dermoscopy import duplicate_ids, read_source_rows
from medfl.data.problems import ProblemLog


def _read(path):
    site = load_site_config(path)
    log = ProblemLog(site.name)
    return site, read_source_rows(site, log), log


def test_ham10000_finds_images_in_both_part_folders_with_lesion_ids(ham10000_site):
    site, table, log = _read(ham10000_site())
    assert not log.problems()
    assert len(table.rows) == 44 and table.filtered_out == 0
    row = next(r for r in table.rows if r.id == "ISIC_nv000b")
    assert row.label == "nv" and row.lesion_id == "HAM_nv000" and row.path.is_file()
    assert {r.path.parent.name for r in table.rows} == {"HAM10000_images_part_1", "HAM10000_images_part_2"}


def test_ham10000_filter_keeps_one_dataset_and_counts_the_rest(ham10000_site):
    path = ham10000_site(dataset=lambda i: "vidir_modern" if i % 3 else "rosendahl",
                         filter={"column": "dataset", "values": ["rosendahl"]})
    _, table, log = _read(path)
    assert len(table.rows) == 15 and table.filtered_out == 29 and not log.problems()


def test_a_filter_value_matching_nothing_lists_the_values_there_are(ham10000_site):
    dataset = {"dataset": lambda i: "vidir_modern" if i % 3 else "rosendahl"}
    _, table, log = _read(ham10000_site(filter={"column": "dataset", "values": ["vidir_modren"]}, **dataset))
    assert table.rows == [] and table.filtered_out == 44
    (problem,) = log.problems()
    assert problem.severity == "error" and problem.file.endswith("HAM10000_metadata.csv")
    assert "filter value(s) 'vidir_modren' match no row of column 'dataset' (its values: 'rosendahl', " \
           "'vidir_modern')" in str(problem)
    _, table, log = _read(ham10000_site(name="derm_b", filter={"column": "dataset",
                                                               "values": ["rosendahl", "vidir_modren"]}, **dataset))
    assert len(table.rows) == 15
    (problem,) = log.problems()
    assert problem.severity == "warning" and "'vidir_modren' match no row" in str(problem)


def test_filter_on_a_missing_column_is_an_error(ham10000_site):
    _, table, log = _read(ham10000_site(filter={"column": "hospital", "values": ["x"]}))
    assert table is None
    assert "filter column 'hospital' is not a column" in str(log.problems()[0])


def test_missing_table_and_missing_columns_are_errors(ham10000_site):
    path = ham10000_site()
    site = load_site_config(path)
    write_csv(site.table_path, ["image", "diagnosis"], [["a", "nv"]])
    _, table, log = _read(path)
    assert table is None and "lacks column(s) image_id, dx" in str(log.problems()[0])
    site.table_path.unlink()
    _, table, log = _read(path)
    assert table is None
    assert log.problems()[0].message == "table not found" and log.problems()[0].file == str(site.table_path)


def test_image_listed_but_absent_or_twice_is_explained(ham10000_site):
    path = ham10000_site()
    site = load_site_config(path)
    next(site.data_root.rglob("ISIC_mel001a.jpg")).unlink()
    write_jpeg(site.data_root / "extra_copy" / "ISIC_bkl002a.jpg")
    _, table, _ = _read(path)
    rows = {r.id: r for r in table.rows}
    assert rows["ISIC_mel001a"].path is None and "is not under data_root" in rows["ISIC_mel001a"].missing
    assert rows["ISIC_bkl002a"].path is None and "exists 2 times" in rows["ISIC_bkl002a"].missing


def test_isic2019_one_hot_labels_downsampled_names_and_metadata_lesions(isic2019_site):
    _, table, log = _read(isic2019_site())
    assert not log.problems()
    rows = {r.id: r for r in table.rows}
    assert rows["ISIC_nv000a_downsampled"].label == "NV" and rows["ISIC_nv000a_downsampled"].path.is_file()
    assert rows["ISIC_akiec000"].label == "AK"
    assert rows["ISIC_nv000b"].lesion_id == "HAM_nv000"
    assert rows["ISIC_nv000a_downsampled"].lesion_id is None  # empty lesion_id in the metadata


def test_isic2019_table_and_file_disagreeing_on_downsampled_suffix(isic2019_site):
    path = isic2019_site()
    site = load_site_config(path)
    original = site.data_root / "ISIC_2019_Training_Input" / "ISIC_nv000a_downsampled.jpg"
    shutil.move(original, original.with_name("ISIC_nv000a.jpg"))
    _, table, _ = _read(path)
    row = next(r for r in table.rows if r.id == "ISIC_nv000a_downsampled")
    assert row.path is not None and row.path.name == "ISIC_nv000a.jpg"


def test_isic2019_rows_without_exactly_one_label_are_errors(isic2019_site):
    path = isic2019_site()
    site = load_site_config(path)
    text = site.table_path.read_text().splitlines()
    header = text[0].split(",")
    none_hot = ["ISIC_x"] + ["0.0"] * (len(header) - 1)
    two_hot = ["ISIC_y", "1.0", "1.0"] + ["0.0"] * (len(header) - 3)
    words = ["ISIC_z", "yes"] + ["0.0"] * (len(header) - 2)
    site.table_path.write_text("\n".join(text + [",".join(none_hot), ",".join(two_hot), ",".join(words)]) + "\n")
    _, table, log = _read(path)
    messages = [p.message for p in log.problems()]
    assert "image 'ISIC_x': no label column holds 1.0" in messages
    assert "image 'ISIC_y': several labels (MEL, NV)" in messages
    assert "image 'ISIC_z': value 'yes' in column MEL is not a number" in messages
    assert len(table.rows) == 44


def test_csv_layout_reads_relative_paths_and_optional_lesions(csv_site):
    path = csv_site()
    site = load_site_config(path)
    _, table, log = _read(path)
    assert not log.problems() and len(table.rows) == 44
    row = table.rows[0]
    assert row.id == "nv/ISIC_nv000a.jpg" and row.label == "naevus" and row.path == site.data_root / row.id
    write_csv(site.table_path, ["image", "label"], [["nv/ISIC_nv000a.jpg", "naevus"], ["nv/gone.jpg", "naevus"]])
    _, table, _ = _read(path)
    assert table.rows[0].lesion_id is None and table.rows[1].path is None


def test_duplicate_ids():
    from medfl.data.dermoscopy import SourceRow

    rows = [SourceRow(i, "nv", None, None) for i in ("a", "b", "a", "c", "b")]
    assert duplicate_ids(rows) == ["a", "b"]
