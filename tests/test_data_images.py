"""Finding image files and proving they decode."""

from __future__ import annotations

from conftest import write_jpeg
from PIL import Image

from medfl.data.images import check_image, check_images, index_images


def test_index_finds_supported_images_recursively(tmp_path):
    write_jpeg(tmp_path / "a" / "x.jpg")
    write_jpeg(tmp_path / "b" / "x.JPG")
    write_jpeg(tmp_path / "y.jpeg")
    (tmp_path / "notes.txt").write_text("not an image")
    index = index_images(tmp_path)
    assert sorted(index) == ["x", "y"] and len(index["x"]) == 2


def test_good_rgb_images_pass(tmp_path):
    assert check_image(write_jpeg(tmp_path / "a.jpg", size=(300, 200))) is None
    png = tmp_path / "b.png"
    Image.new("RGB", (8, 8), "red").save(png)
    assert check_image(png) is None


def test_garbage_truncated_grey_and_missing_files_fail(tmp_path):
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"\x00" * 100)
    truncated = write_jpeg(tmp_path / "truncated.jpg", size=(300, 200))
    truncated.write_bytes(truncated.read_bytes()[:1000])
    grey = tmp_path / "grey.png"
    Image.new("L", (8, 8)).save(grey)
    assert check_image(garbage) == "unreadable or corrupt image (not in an image format PIL can read)"
    assert check_image(truncated).startswith("unreadable or corrupt image (image file is truncated")
    assert check_image(grey) == "image mode is L, expected RGB colour"
    assert check_image(tmp_path / "gone.jpg") == "image file not found"


def test_threaded_checks_keep_the_order(tmp_path):
    paths = [write_jpeg(tmp_path / f"{i}.jpg", seed=i) for i in range(6)]
    paths[3].write_bytes(b"broken")
    verdicts = check_images(paths, workers=2)
    assert [v is None for v in verdicts] == [True, True, True, False, True, True]
    assert check_images(paths, workers=0) == verdicts
