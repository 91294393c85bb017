"""CSV table reading."""

from __future__ import annotations

from medfl.data.problems import ProblemLog
from medfl.data.tables import read_table


def test_rows_are_stripped_and_a_bom_is_ignored(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes("\ufeffimage , label\n a.jpg ,nv\nb.jpg,\n".encode())
    assert read_table(path, ["image", "label"], ProblemLog("s")) == [
        {"image": "a.jpg", "label": "nv"}, {"image": "b.jpg", "label": ""}]


def test_missing_file_column_and_bad_encoding_are_errors(tmp_path):
    log = ProblemLog("s")
    assert read_table(tmp_path / "none.csv", ["image"], log, what="metadata table") is None
    path = tmp_path / "t.csv"
    path.write_text("img,label\na,b\n")
    assert read_table(path, ["image"], log) is None
    latin = tmp_path / "latin.csv"
    latin.write_bytes("image\ncaf\xe9\n".encode("latin-1"))
    assert read_table(latin, ["image"], log) is None
    assert [p.message for p in log.problems()] == [
        "metadata table not found", "table lacks column(s) image (found: img, label)", "table is not UTF-8 text"]
