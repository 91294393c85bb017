"""Segmentation scores on each case's own voxel grid (dice_original, hd95_original in mm): hand-made cases whose
Dice and HD95 are known exactly, slice-wise (logits upsampled to the original in-plane size) and in 3-D (the
prediction taken back from the resampled grid by MONAI's inverse)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from medfl.data.volumes import OriginalMask
from medfl.federated.evaluation import score_segmenter, score_volumes

CPU = torch.device("cpu")


class Fixed(nn.Module):
    """Returns its input as logits: lets a test choose the predictions."""

    def forward(self, x):
        return x, x


def _original(mask: np.ndarray, spacing: tuple[float, float, float]) -> OriginalMask:
    return OriginalMask(np.packbits(mask.astype(bool), axis=None), mask.shape, spacing)


def test_slices_are_scored_on_the_original_grid_with_its_spacing():
    # Original grid (Z, Y, X) = (4, 16, 16), spacing (z, y, x) = (3.0, 0.5, 0.7) mm; slices at 8 x 8: the bilinear
    # upsampling by 2 takes a predicted block of rows [a, b) to exactly [2a, 2b). In plates one slice or two rows
    # thick every voxel is on the surface and lies the offset away from the other plate (two rows: half of them
    # the offset, half one row less), so HD95 is the offset times the spacing along it.
    spacing = (3.0, 0.5, 0.7)
    depth, size = 4, 8
    cases = {}  # case -> (predicted at 8 x 8, original truth at 16 x 16)
    z_truth = np.zeros((depth, 16, 16), bool)
    z_truth[1] = True
    z_predicted = np.zeros((depth, size, size), bool)
    z_predicted[2] = True  # one slice further: every distance 3.0 mm
    cases["z"] = (z_predicted, z_truth)
    y_truth = np.zeros((depth, 16, 16), bool)
    y_truth[:, 4:6] = True
    y_predicted = np.zeros((depth, size, size), bool)
    y_predicted[:, 4:5] = True  # rows 8..9 at 16: 3 and 4 rows away, half each -> HD95 = 4 x 0.5 mm
    cases["y"] = (y_predicted, y_truth)
    same_truth = np.zeros((depth, 16, 16), bool)
    same_truth[1:3, 4:10, 6:12] = True
    same_predicted = np.zeros((depth, size, size), bool)
    same_predicted[1:3, 2:5, 3:6] = True
    cases["same"] = (same_predicted, same_truth)
    cases["empty"] = (np.zeros((depth, size, size), bool), same_truth)  # HD95 undefined: counted, not averaged
    batches = []
    for case, (predicted, truth) in cases.items():
        logits = torch.zeros(depth, 2, size, size)
        logits[:, 1] = torch.where(torch.as_tensor(predicted), 1.0, -1.0)
        label = torch.as_tensor(truth[:, ::2, ::2].copy()).to(torch.uint8)[:, None]
        for start in (0, 3):  # batches that end inside a case
            batches.append({"image": logits[start:start + 3], "label": label[start:start + 3],
                            "case_id": [case] * len(logits[start:start + 3]),
                            "slice_index": torch.arange(start, min(start + 3, depth)),
                            "num_slices": torch.full((len(logits[start:start + 3]),), depth)})
    originals = {case: _original(truth, spacing) for case, (_, truth) in cases.items()}
    result = score_segmenter(Fixed(), batches, CPU, None, True, originals.get)
    assert result["dice_original"] == pytest.approx((0 + 0 + 1 + 0) / 4)
    assert result["hd95_original"] == pytest.approx((3.0 + 4 * 0.5 + 0.0) / 3)
    assert result["hd95_original_missing"] == 1
    assert result["num_cases"] == 4 and "dice" in result and "hd95" in result  # the input-size figures stay
    assert set(score_segmenter(Fixed(), batches, CPU, None, True)) == {"dice", "hd95", "hd95_missing", "num_cases"}
    # a case without its original mask: no original-grid figures for the split rather than figures of some cases
    assert "dice_original" not in score_segmenter(Fixed(), batches, CPU, None, True,
                                                  lambda case: None if case == "y" else originals[case])


def _write(path, array_zyx: np.ndarray, spacing_xyz) -> str:
    image = sitk.GetImageFromArray(array_zyx.astype(np.uint8))
    image.SetSpacing([float(s) for s in spacing_xyz])
    sitk.WriteImage(image, str(path))
    return str(path)


def test_volumes_are_taken_back_to_their_grid_and_scored_there(tmp_path):
    # Masks of 12 x 10 x 6 voxels (x, y, z) of 0.8 x 1.0 x 3.0 mm, scored at 0.4 x 1.0 x 1.5 mm: every original
    # voxel centre falls on a resampled one (index x 2 along x and z), so the inverse is exact.
    original_spacing, target = (0.8, 1.0, 3.0), (0.4, 1.0, 1.5)
    resampled = (23, 10, 11)
    files, predictions = {}, {}
    truth = np.zeros((6, 10, 12), np.uint8)  # (z, y, x) as SimpleITK writes it (LPS)
    truth[2] = 1
    files["z"] = _write(tmp_path / "z.nii.gz", truth, original_spacing)
    predicted = np.zeros(resampled, bool)  # (x, y, z) in RAS at the target spacing
    predicted[:, :, 8] = True  # original slice 4: two slices (6 mm) from the truth
    predictions["z"] = predicted
    truth = np.zeros((6, 10, 12), np.uint8)
    truth[:, :, 3] = 1  # LPS column 3 is RAS column 12 - 1 - 3 = 8
    files["x"] = _write(tmp_path / "x.nii.gz", truth, original_spacing)
    predicted = np.zeros(resampled, bool)
    predicted[20] = True  # RAS column 10: two columns (1.6 mm) away
    predictions["x"] = predicted
    truth = np.zeros((6, 10, 12), np.uint8)
    truth[1:4, 2:7, 3:9] = 1
    files["same"] = _write(tmp_path / "same.nii.gz", truth, original_spacing)
    predicted = np.zeros(resampled, bool)
    predicted[2 * (11 - 8):2 * (11 - 3) + 1, 10 - 7:10 - 2, 2:7] = True  # the same voxels, flipped to RAS
    predictions["same"] = predicted
    batches = []
    for case, predicted in predictions.items():
        logits = torch.zeros(1, 2, *resampled)
        logits[0, 1] = torch.where(torch.as_tensor(predicted), 1.0, -1.0)
        batches.append({"image": logits, "label": torch.zeros(1, 1, *resampled), "case_id": [case]})
    result = score_volumes(Fixed(), batches, CPU, None, True, resampled, 0.0, "constant", 1, files.get, target)
    assert result["dice_original"] == pytest.approx(1 / 3)
    assert result["hd95_original"] == pytest.approx((6.0 + 1.6 + 0.0) / 3)
    assert result["hd95_original_missing"] == 0
    with pytest.raises(ValueError, match="case 'z': prediction of shape"):
        score_volumes(Fixed(), batches[:1], CPU, None, True, resampled, 0.0, "constant", 1, files.get, (1.0, 1.0, 1.0))
    assert not math.isnan(result["dice"])


def test_a_site_read_slice_wise_keeps_its_test_cases_masks_aligned_with_the_slices(prostate_site):
    # The reader keeps each val and test case's mask on its own grid. The phantom's prostate (rows 6..13 of 20,
    # columns 8..15 of 24, slices 1..5 of 8) survives the resize to 16 x 16 and back whole, so a prediction that is
    # perfect at the input size is perfect on the original grid: slices, rows and columns line up.
    from medfl.config import DataSettings, load_site_config, validate_model
    from medfl.data import load_site
    from medfl.tasks import task_for

    task = task_for("segmentation")
    settings = validate_model(DataSettings, {"input_size": 16, "num_workers": 0}, "settings")
    data = load_site(load_site_config(prostate_site(depth=8)), settings, task=task)
    scored = {r["case_id"] for split in ("val", "test") for r in data.splits[split]}
    assert set(data.original_masks) == scored
    batches = []
    for record in data.splits["test"]:
        label = torch.as_tensor(np.asarray(record["label"])).float()
        batches.append({"image": torch.cat([torch.zeros_like(label), 2 * label - 1])[None], "label": label[None],
                        "case_id": [record["case_id"]], "slice_index": torch.tensor([record["slice_index"]]),
                        "num_slices": torch.tensor([record["num_slices"]])})
    result = score_segmenter(Fixed(), batches, CPU, None, True, lambda case: task.original_case(data, case))
    assert result["dice"] == 1.0 and result["dice_original"] == 1.0 and result["hd95_original"] == 0.0
