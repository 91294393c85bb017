"""Classification records: label mapping, dropped rows, image checks, lesion-grouped splits."""

from __future__ import annotations

from conftest import default_derm_rows, write_csv, write_jpeg

from medfl.config import DataSettings, load_site_config
from medfl.data.classification import read_classification_site
from medfl.data.problems import ProblemLog


def _read(path, **settings):
    site = load_site_config(path)
    log = ProblemLog(site.name)
    return site, read_classification_site(site, DataSettings(**settings), log), log


def test_records_carry_path_label_index_id_lesion_and_site(ham10000_site):
    _, content, log = _read(ham10000_site())
    assert not log.problems()
    assert content.classes == ["nv", "bkl", "mel"]
    records = [r for split in content.splits.values() for r in split]
    assert len(records) == 42
    record = next(r for r in records if r["id"] == "ISIC_mel003b")
    assert record["label"] == 2 and record["lesion_id"] == "HAM_mel003" and record["site"] == "derm_a"
    assert record["image"].endswith("ISIC_mel003b.jpg")


def test_null_labels_and_classes_left_out_are_dropped_and_counted(ham10000_site):
    _, content, log = _read(ham10000_site(), classes=["mel", "nv"])
    assert content.classes == ["mel", "nv"]
    assert dict(content.dropped) == {"akiec": 2, "bkl": 14}
    labels = {r["id"]: r["label"] for split in content.splits.values() for r in split}
    assert labels["ISIC_mel000a"] == 0 and labels["ISIC_nv000a"] == 1
    assert not [p for p in log.problems() if p.severity == "error"]


def test_class_that_the_label_map_never_produces_is_a_warning(ham10000_site):
    _, _, log = _read(ham10000_site(), classes=["nv", "bkl", "mel", "vasc"])
    warnings = [p.message for p in log.problems() if p.severity == "warning"]
    assert any("class 'vasc' is not a target of this site's label_map" in w for w in warnings)


def test_unknown_label_is_one_error_naming_label_and_table(ham10000_site):
    rows = default_derm_rows() + [("ISIC_x1", "melanoma", "L1"), ("ISIC_x2", "melanoma", "L2")]
    site, content, log = _read(ham10000_site(rows=rows))
    errors = [p for p in log.problems() if p.severity == "error"]
    assert len(errors) == 1 and errors[0].file == str(site.table_path)
    assert "label 'melanoma' (2 rows, e.g. image 'ISIC_x1') is not in the label_map" in errors[0].message


def test_missing_image_is_an_error_only_when_its_class_is_used(ham10000_site):
    path = ham10000_site()
    site = load_site_config(path)
    next(site.data_root.rglob("ISIC_akiec000.jpg")).unlink()
    _, _, log = _read(path)
    assert not log.problems()
    next(site.data_root.rglob("ISIC_nv004a.jpg")).unlink()
    _, content, log = _read(path)
    assert [p.message for p in log.problems()] == ["image 'ISIC_nv004a' listed in the table is not under data_root"]
    assert sum(len(s) for s in content.splits.values()) == 41


def test_corrupt_and_truncated_images_are_errors_naming_the_file(ham10000_site):
    path = ham10000_site()
    site = load_site_config(path)
    broken = next(site.data_root.rglob("ISIC_bkl001a.jpg"))
    broken.write_bytes(b"not a jpeg")
    truncated = next(site.data_root.rglob("ISIC_mel002a.jpg"))
    write_jpeg(truncated, size=(200, 200))
    truncated.write_bytes(truncated.read_bytes()[:600])
    _, _, log = _read(path)
    problems = {p.file: p.message for p in log.problems()}
    assert problems[str(broken)].startswith("unreadable or corrupt image")
    assert problems[str(truncated)].startswith("unreadable or corrupt image")


def test_duplicate_image_ids_are_errors(ham10000_site):
    rows = default_derm_rows() + [("ISIC_nv001a", "nv", "HAM_nv001")]
    _, content, log = _read(ham10000_site(rows=rows))
    assert "image id 'ISIC_nv001a' appears on 2 rows" in [p.message for p in log.problems()]
    assert all(r["id"] != "ISIC_nv001a" for split in content.splits.values() for r in split)


def test_images_of_one_lesion_stay_on_one_side(ham10000_site):
    rows = [(f"I{k}_{j}", ("nv", "bkl", "mel")[k % 3], f"L{k}") for k in range(30) for j in range(3)]
    _, content, log = _read(ham10000_site(rows=rows), split_seed=3)
    side = {}
    for split, records in content.splits.items():
        for record in records:
            assert side.setdefault(record["lesion_id"], split) == split
    assert content.groups == {"train": 21, "val": 3, "test": 6}
    assert not log.problems()


def test_official_split_file_decides_and_unlisted_ids_are_errors(ham10000_site, tmp_path):
    rows = default_derm_rows(lesions_per_class=3)
    split_file = write_csv(tmp_path / "configs" / "splits.csv", ["id", "split"],
                           [(image, ("train", "val", "test")[i % 3]) for i, (image, _, _) in enumerate(rows[:-3])])
    site, content, log = _read(ham10000_site(rows=rows, split_file="splits.csv"))
    assert site.split_path == split_file
    assigned = {r["id"]: split for split, records in content.splits.items() for r in records}
    assert assigned["ISIC_nv000a"] == "train" and assigned["ISIC_nv000b"] == "val"
    messages = [p.message for p in log.problems()]
    assert "id 'ISIC_mel002a' is not listed in the split file" in messages
    assert any(m.startswith("lesion 'HAM_nv000' has images in train and val") for m in messages)


def test_empty_table_after_filter_is_an_error(ham10000_site):
    _, content, log = _read(ham10000_site(filter={"column": "dataset", "values": ["nowhere"]}))
    (problem,) = log.problems()
    assert problem.message == ("the table has no rows after the filter: filter value(s) 'nowhere' match no row "
                               "of column 'dataset' (its values: 'vidir_modern')")
    assert content.filtered_out == 44
