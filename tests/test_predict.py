"""`medfl predict`: the CSV of class probabilities, masks on the input's grid in the input's format (NIfTI and
MetaImage, non-identity directions), per-file messages for bad inputs, refusal to overwrite."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from PIL import Image
from scipy import ndimage
from test_export import tiny_runs
from torch import nn

from medfl.cli import main
from medfl.data import load_recipe
from medfl.deliver import ExportedModel, export_run, load_export, predict
from medfl.deliver.inputs import mask_name
from medfl.errors import ConfigError
from medfl.tasks import task_for

pytestmark = pytest.mark.slow

# An oblique, left-right and inferior-superior flipped frame: rotation about z by 20 degrees of diag(-1, 1, -1).
_C, _S = math.cos(math.radians(20)), math.sin(math.radians(20))
OBLIQUE = (-_C, -_S, 0.0, -_S, _C, 0.0, 0.0, 0.0, -1.0)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    runs = tiny_runs(tmp_path_factory)
    out = tmp_path_factory.mktemp("predict_exports")
    export_run(runs["classification"], out=out / "derm", task=task_for("classification"))
    export_run(runs["segmentation"], out=out / "prostate", task=task_for("segmentation"))
    return {"derm": out / "derm", "prostate": out / "prostate", "federation": runs["federation"]}


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def _images(federation: Path, count: int) -> list[Path]:
    return sorted((federation / "dermoscopy" / "derm_b").rglob("*.jpg"))[:count]


def test_csv_holds_class_probabilities_that_sum_to_one(exports, tmp_path):
    export = load_export(exports["derm"], "derm_a")
    images = _images(exports["federation"], 4)
    odd_size = tmp_path / "odd size.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(odd_size)
    results = predict(export, [*images, odd_size], tmp_path / "out")
    assert all(r.error is None and r.output == tmp_path / "out" / "predictions.csv" for r in results)
    rows = _read_csv(tmp_path / "out" / "predictions.csv")
    assert list(rows[0]) == ["image", "prob_nv", "prob_bkl", "prob_mel", "predicted"]
    assert [row["image"] for row in rows] == [str(p) for p in [*images, odd_size]]
    recipe = load_recipe(export.recipe_path)
    program = torch.export.load(export.folder / "model.pt2").module()
    for row, path in zip(rows, [*images, odd_size], strict=True):
        probabilities = np.array([float(row[f"prob_{c}"]) for c in ("nv", "bkl", "mel")])
        assert probabilities.sum() == pytest.approx(1.0, abs=1e-9) and (probabilities >= 0).all()
        assert row["predicted"] == ("nv", "bkl", "mel")[int(probabilities.argmax())]
        image = recipe({"image": str(path), "label": -1, "id": "x", "site": "derm_a"})["image"]
        with torch.no_grad():
            expected = torch.softmax(program(torch.as_tensor(image)[None]).double(), dim=1)[0].numpy()
        np.testing.assert_allclose(probabilities, expected, atol=1e-5)


def _bad_image_inputs(folder: Path, federation: Path) -> dict[Path, str]:
    """Inputs that must fail, each with a fragment of its expected message."""
    folder.mkdir(parents=True)
    grey, rgba, truncated = folder / "grey.png", folder / "rgba.png", folder / "truncated.jpg"
    Image.new("L", (32, 32), 128).save(grey)
    Image.new("RGBA", (32, 32), (10, 20, 30, 200)).save(rgba)  # transparent: what lies behind is unknown
    data = _images(federation, 1)[0].read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    (folder / "notes.txt").write_text("not an image")
    return {
        grey: "mode is L, expected RGB",
        rgba: "image has transparent pixels (RGBA with alpha below 255)",
        truncated: "unreadable or corrupt image",
        folder / "notes.txt": "unknown file type",
        folder / "absent.jpg": "file not found",
        folder: "is a folder",
        next((federation / "prostate" / "prost_a").glob("Case*.nii.gz")): "is an MRI volume",
    }


def test_bad_images_get_one_message_each_and_the_others_are_predicted(exports, tmp_path):
    export = load_export(exports["derm"], "derm_a")
    bad = _bad_image_inputs(tmp_path / "bad", exports["federation"])
    good = _images(exports["federation"], 2)
    inputs = [good[0], *bad, good[1]]
    results = predict(export, inputs, tmp_path / "out")
    assert [r.input for r in results] == inputs
    for result in results:
        if result.input in bad:
            assert bad[result.input] in result.error and result.output is None
        else:
            assert result.error is None
    assert [row["image"] for row in _read_csv(tmp_path / "out" / "predictions.csv")] == [str(p) for p in good]


def test_an_opaque_rgba_image_is_predicted_as_its_rgb_pixels(exports, tmp_path):
    export = load_export(exports["derm"], "derm_a")
    pixels = Image.open(_images(exports["federation"], 1)[0]).convert("RGB")
    rgb, opaque = tmp_path / "rgb.png", tmp_path / "opaque.png"
    pixels.save(rgb)
    with_alpha = pixels.copy()
    with_alpha.putalpha(255)
    with_alpha.save(opaque)
    assert Image.open(opaque).mode == "RGBA"
    results = predict(export, [rgb, opaque], tmp_path / "out")
    assert [r.error for r in results] == [None, None]
    rows = _read_csv(tmp_path / "out" / "predictions.csv")
    assert [row["image"] for row in rows] == [str(rgb), str(opaque)]
    assert {k: v for k, v in rows[0].items() if k != "image"} == {k: v for k, v in rows[1].items() if k != "image"}


def test_cli_predict_reports_bad_files_and_exits_non_zero(exports, tmp_path, capsys):
    bad = _bad_image_inputs(tmp_path / "bad", exports["federation"])
    good = _images(exports["federation"], 1)
    arguments = ["predict", str(exports["derm"]), "--site", "derm_b", str(good[0]), *map(str, bad),
                 "--out", str(tmp_path / "out")]
    assert main(arguments) == 1
    captured = capsys.readouterr()
    assert len([line for line in captured.err.splitlines() if line.startswith("medfl predict:")]) == len(bad)
    assert all(str(path) in captured.err for path in bad)
    assert f"1 of {len(bad) + 1} input(s) predicted, {len(bad)} failed" in captured.out
    assert main(arguments[:2] + [str(good[0]), "--out", str(tmp_path / "out")]) == 1  # no --site
    assert "choose one with --site" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="never overwritten"):
        predict(load_export(exports["derm"], "derm_b"), good, tmp_path / "out")


def _phantom() -> np.ndarray:
    """(z, y, x) volume: faint noise with a bright off-centre box (so a flipped mask would miss it)."""
    volume = np.random.default_rng(1).normal(100.0, 2.0, (6, 20, 24)).astype(np.float32)
    volume[1:5, 4:12, 5:15] += 100.0
    return volume


def _write(path: Path, volume: np.ndarray, direction=OBLIQUE) -> Path:
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((0.7, 0.9, 3.0))
    image.SetOrigin((-12.5, 30.0, 7.25))
    image.SetDirection(direction)
    sitk.WriteImage(image, str(path))
    return path


def _assert_same_grid(output: Path, reference: Path) -> None:
    mask, image = sitk.ReadImage(str(output)), sitk.ReadImage(str(reference))
    assert mask.GetSize() == image.GetSize()
    np.testing.assert_allclose(mask.GetSpacing(), image.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(mask.GetOrigin(), image.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(mask.GetDirection(), image.GetDirection(), atol=1e-6)
    if reference.name.endswith(".nii.gz"):
        np.testing.assert_allclose(nib.load(output).affine, nib.load(reference).affine, atol=1e-5)


@pytest.mark.parametrize("extension", [".nii.gz", ".mhd"])
def test_masks_come_back_on_the_inputs_grid_in_its_format(exports, tmp_path, extension):
    export = load_export(exports["prostate"])
    inputs = [_write(tmp_path / f"oblique{extension}", _phantom()),
              _write(tmp_path / f"plain{extension}", _phantom(), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))]
    results = predict(export, inputs, tmp_path / "out")
    for path, result in zip(inputs, results, strict=True):
        assert result.error is None and result.output == tmp_path / "out" / mask_name(path)
        assert result.output.name.endswith(f"_mask{extension}")
        _assert_same_grid(result.output, path)
        values = set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(result.output)))).tolist())
        assert values <= {0, 1}
    if extension == ".mhd":
        assert (tmp_path / "out" / "oblique_mask.zraw").is_file()


def test_inputs_of_one_name_from_different_folders_are_all_predicted_apart(exports, tmp_path, capsys):
    for folder in ("ISBI", "ISBI_1.5"):
        (tmp_path / folder).mkdir()
    first = _write(tmp_path / "ISBI" / "Case00.nii.gz", _phantom())
    second = _write(tmp_path / "ISBI_1.5" / "Case00.nii.gz", _phantom()[::-1].copy())
    out = tmp_path / "out"
    assert main(["predict", str(exports["prostate"]), str(first), str(second), "--out", str(out)]) == 0
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*.nii.gz"))
    assert written == ["ISBI/Case00_mask.nii.gz", "ISBI_1.5/Case00_mask.nii.gz"]
    assert "2 of 2 input(s) predicted" in capsys.readouterr().out
    # inputs of one folder go straight into --out
    results = predict(load_export(exports["prostate"]), [first], tmp_path / "flat")
    assert results[0].output == tmp_path / "flat" / "Case00_mask.nii.gz"


def test_a_nifti_mask_keeps_the_inputs_header_codes(exports, tmp_path):
    affine = np.array([[-0.7, 0.0, 0.0, 12.5], [0.0, -0.9, 0.0, -30.0], [0.0, 0.0, 3.0, 7.25], [0, 0, 0, 1]])
    image = nib.Nifti1Image(_phantom().transpose(2, 1, 0), affine)
    image.set_qform(affine, code=1)  # scanner
    image.set_sform(affine, code=2)  # aligned: SimpleITK would write 1 and 1
    path = tmp_path / "coded.nii.gz"
    nib.save(image, path)
    (result,) = predict(load_export(exports["prostate"]), [path], tmp_path / "out")
    mask, source = nib.load(result.output), nib.load(path)
    assert (int(mask.header["qform_code"]), int(mask.header["sform_code"])) == (1, 2)
    np.testing.assert_allclose(mask.affine, source.affine, atol=1e-6)
    np.testing.assert_allclose(mask.get_qform(), source.get_qform(), atol=1e-6)
    assert mask.get_data_dtype() == np.uint8 and set(np.unique(np.asarray(mask.dataobj)).tolist()) <= {0, 1}
    _assert_same_grid(result.output, path)


class BrightIsProstate(nn.Module):
    """A stand-in network: prostate wherever the centre slice's normalised intensity is above zero."""

    def __init__(self, centre: int):
        super().__init__()
        self.centre = centre

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        centre = x[:, self.centre : self.centre + 1]
        return torch.cat([torch.zeros_like(centre), centre], dim=1), x


@pytest.mark.parametrize("extension", [".nii.gz", ".mhd"])
def test_mask_lies_where_the_input_shows_it_whatever_the_orientation(exports, tmp_path, extension):
    exported = load_export(exports["prostate"])
    export = ExportedModel(exported.folder, exported.manifest, BrightIsProstate(centre=1), exported.device)
    volume = _phantom()
    path = _write(tmp_path / f"oblique{extension}", volume)
    (result,) = predict(export, [path], tmp_path / "out")
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(result.output))) > 0
    truth = volume > 150
    # Resampling to 32 x 32 and back blurs the box's edge by at most one voxel in-plane; a flip or a
    # transposition would miss most of the off-centre box.
    assert mask[truth].all()
    assert not mask[~ndimage.binary_dilation(truth, structure=np.ones((1, 3, 3)))].any()


def _vector_volume(path: Path) -> Path:
    image = sitk.Compose([sitk.GetImageFromArray(_phantom())] * 2)
    sitk.WriteImage(image, str(path))
    return path


def test_bad_volumes_get_one_message_each_and_the_others_are_predicted(exports, tmp_path, capsys):
    good = _write(tmp_path / "good.nii.gz", _phantom())
    flat = tmp_path / "flat.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((20, 24), np.float32)), str(flat))
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(good.read_bytes()[:200])
    mask = np.zeros((6, 20, 24), np.uint8)
    mask[2:4, 5:15, 6:18] = 1
    mask_file = tmp_path / "Case00_segmentation.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(mask), str(mask_file))
    bad = {
        flat: "2 dimensions, expected a 3-D volume",
        mask_file: "holds only the values 0, 1: a mask or a blank volume",
        _vector_volume(tmp_path / "two_channels.mha"): "2 components per voxel, expected 1",
        corrupt: "unreadable or corrupt volume",
        _images(exports["federation"], 1)[0]: "is a 2-D image",
        tmp_path / "absent.mhd": "file not found",
    }
    out = tmp_path / "out"
    status = main(["predict", str(exports["prostate"]), *map(str, bad), str(good), "--out", str(out)])
    assert status == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("medfl predict:")]
    assert len(err) == len(bad)
    for line, (path, message) in zip(err, bad.items(), strict=True):
        assert str(path) in line and message in line
    assert sorted(p.name for p in out.iterdir()) == ["good_mask.nii.gz"]
    assert main(["predict", str(exports["prostate"]), str(good), "--out", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err
