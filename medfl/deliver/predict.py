"""`medfl predict`: apply one site's exported model to new dermoscopy images or MRI volumes.

Images go through the export's own evaluation recipe; the result is one CSV row per image with the class
probabilities (softmax, summing to 1) and the predicted class. Volumes are reoriented to the working
orientation, then go through the very pipeline of the MONAI bundle (medfl.deliver.programs: MONAI's
percentile clip and z-score, then the slice-wise program: in-plane resize, context slices, network, logits
back to the slice size), so that both give the same masks and both reproduce the data layer's
preprocessing; they come back as a mask on the input's voxel grid, in the input's format. A 3-D export's
volumes go through the bundle's 3-D pipeline (medfl.deliver.volumes3d: the run's evaluation recipe, MONAI's
sliding window, Invertd back to the input's grid).
Each input stands alone: a bad one gets a one-line reason and the others are still predicted. An RGBA image
whose alpha is 255 everywhere is an RGB image with an unused channel: it is read without the alpha channel
(PIL's RGBA to RGB conversion drops alpha and leaves the colours as they are); one with transparent pixels is
refused, since what lies behind them is unknown.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from monai.data import PILReader
from monai.transforms import Compose, LoadImaged
from PIL import Image

from medfl.checkpoints import atomic_write_csv as write_csv
from medfl.checkpoints import staging_folder
from medfl.data import CaseGeometry, load_recipe
from medfl.data.images import check_image
from medfl.data.recipes import resolve_recipe
from medfl.data.volumes import WORKING_ORIENTATION, read_volume, write_like
from medfl.deliver.bundle import ExportedModel
from medfl.deliver.inputs import (
    Prediction,
    input_problem,
    mask_targets,
    predictions_csv,
    stem,
)
from medfl.deliver.programs import LogitsOnly, SliceWiseProgram, normalise_volume
from medfl.deliver.volumes3d import inference_steps, predict_volume_mask, sliding_window
from medfl.errors import ConfigError, WriteError
from medfl.task_facts import facts_for

BATCH_SIZE = 32
MASK_VALUES = 4  # a volume with this many distinct integer values or fewer is a mask (0/1, 0/255, zones), not MRI


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())[:200]


@torch.inference_mode()
def _logits(export: ExportedModel, images: Sequence[torch.Tensor]) -> torch.Tensor:
    """The network's logits for preprocessed inputs, in batches, on the CPU as float32."""
    outputs = []
    for start in range(0, len(images), BATCH_SIZE):
        batch = torch.stack([torch.as_tensor(image) for image in images[start:start + BATCH_SIZE]])
        outputs.append(export.network(batch.to(export.device, torch.float32))[0].float().cpu())
    return torch.cat(outputs)


def _channel_problem(image: Any, export: ExportedModel) -> str | None:
    expected = (export.in_channels, export.input_size, export.input_size)
    shape = tuple(np.asarray(image).shape)
    if shape != expected:
        return f"preprocessed to shape {shape}, but the model takes {expected} (channels, height, width)"
    return None


def opaque_alpha(path: Path) -> bool | None:
    """For an RGBA image: whether its alpha is 255 everywhere. None for any other file (or one PIL cannot
    decode), which `check_image` then judges."""
    try:
        with Image.open(path) as image:
            if image.mode != "RGBA":
                return None
            return image.getchannel("A").getextrema() == (255, 255)
    except Exception:  # noqa: BLE001 - an unreadable file is check_image's to describe
        return None


def _without_alpha(image: Any) -> Any:
    return image.convert("RGB")


def alpha_dropping_recipe(export: ExportedModel) -> Compose | None:
    """The export's recipe with its first step, LoadImaged with PILReader, reading RGBA images as RGB; None
    when the recipe does not start that way (then RGBA images are refused)."""
    recipe = load_recipe(export.recipe_path)
    name, arguments = next(iter(resolve_recipe(export.recipe_path)["transforms"][0].items()))
    if name != "LoadImaged" or arguments.get("reader") != "PILReader":
        return None
    load = LoadImaged(**{**arguments, "reader": PILReader(converter=_without_alpha)})
    return Compose([load, *recipe.transforms[1:]])


def _image_recipe(export: ExportedModel, path: Path, recipes: dict[str, Compose | None]) -> tuple[Any, str | None]:
    """The recipe that reads `path` (alpha dropped for an opaque RGBA image), or None and why not."""
    problem = input_problem(path, export.task)
    opaque = None if problem else opaque_alpha(path)
    if opaque is None:
        return recipes["plain"], problem or check_image(path)
    if not opaque:
        return None, ("image has transparent pixels (RGBA with alpha below 255), and the model takes RGB colour "
                      "images: flatten it onto its background first")
    if "opaque" not in recipes:
        recipes["opaque"] = alpha_dropping_recipe(export)
    if recipes["opaque"] is None:
        return None, "image mode is RGBA, expected RGB colour (this export's recipe cannot drop the alpha channel)"
    return recipes["opaque"], None


def predict_images(export: ExportedModel, inputs: Sequence[Path], out: Path) -> list[Prediction]:
    """Classify dermoscopy images into `out/predictions.csv` (image, prob_<class>..., predicted)."""
    csv_path = predictions_csv(out)
    recipes: dict[str, Compose | None] = {"plain": load_recipe(export.recipe_path)}
    results, images = [], []
    for path in inputs:
        result = Prediction(path)
        results.append(result)
        recipe, result.error = _image_recipe(export, path, recipes)
        if result.error is None:
            try:
                image = recipe({"image": str(path), "label": -1, "id": path.stem, "site": export.site})["image"]
            except Exception as error:  # noqa: BLE001 - any failure here is this file's problem, reported per file
                result.error = f"could not be preprocessed ({_one_line(error)})"
                continue
            result.error = _channel_problem(image, export)
            if result.error is None:
                images.append(image)
    good = [result for result in results if result.error is None]
    probabilities = torch.softmax(_logits(export, images).double(), dim=1) if images else torch.empty(0)
    rows = []
    for result, row in zip(good, probabilities.tolist(), strict=True):
        predicted = export.classes[int(np.argmax(row))]
        rows.append({"image": str(result.input), **{f"prob_{c}": p for c, p in zip(export.classes, row, strict=True)},
                     "predicted": predicted})
        result.output, result.summary = csv_path, f"{predicted} (p={max(row):.3f})"
    out.mkdir(parents=True, exist_ok=True)
    write_csv(csv_path, rows, ["image", *(f"prob_{c}" for c in export.classes), "predicted"])
    return results


def _segment(export: ExportedModel, case_id: str, path: Path, image: sitk.Image) -> tuple[sitk.Image | None, str]:
    """The predicted mask on the input's grid and a summary, or None and why not."""
    geometry = CaseGeometry.of(case_id, path, image)
    volume = sitk.GetArrayFromImage(sitk.DICOMOrient(image, WORKING_ORIENTATION)).astype(np.float32)
    if not np.all(np.isfinite(volume)):
        return None, "volume has NaN or infinite values"
    values = np.unique(volume)
    if len(values) <= MASK_VALUES and np.array_equal(values, np.round(values)):
        shown = ", ".join(str(int(v)) for v in values)
        return None, f"holds only the values {shown}: a mask or a blank volume, not an MRI volume"
    if export.manifest["preprocessing"].get("dims") == 3:
        return _segment_3d(export, path, image)
    context = int(export.manifest["preprocessing"]["context_slices"])
    program = SliceWiseProgram(LogitsOnly(export.network), export.input_size, context).eval()
    prepared = normalise_volume(torch.from_numpy(volume)).to(export.device)
    with torch.inference_mode():
        mask = program(prepared)[0].argmax(dim=0).to(torch.uint8).cpu().numpy()
    found = int(mask.reshape(mask.shape[0], -1).any(axis=1).sum())
    return geometry.to_image(mask), f"prostate in {found} of {mask.shape[0]} slices"


def _segment_3d(export: ExportedModel, path: Path, image: sitk.Image) -> tuple[sitk.Image, str]:
    """A 3-D export's mask on the input's grid: the bundle's pipeline (medfl.deliver.volumes3d), eagerly."""
    preprocessing = export.manifest["preprocessing"]
    steps = inference_steps(resolve_recipe(export.recipe_path))  # the export's recipe file, checked at load
    mask = predict_volume_mask(LogitsOnly(export.network).eval(), str(path), steps, sliding_window(preprocessing),
                               export.device)
    array = np.ascontiguousarray(mask.transpose(2, 1, 0))  # ITK's (x, y, z) voxel axes -> SimpleITK's (z, y, x)
    if array.shape != sitk.GetArrayViewFromImage(image).shape:
        raise ValueError(f"the mask came back with shape {array.shape[::-1]}, not the input's {image.GetSize()}")
    result = sitk.GetImageFromArray(array)
    result.CopyInformation(image)
    found = int(array.reshape(array.shape[0], -1).any(axis=1).sum())
    return result, f"prostate in {found} of {array.shape[0]} slices"


def _write_image(image: sitk.Image, target: Path, source: Path) -> None:
    """Write (like `source`: a NIfTI keeps its header) into a temporary folder beside `target`, then move every
    file written into place (a MetaImage header last, after its data file), so that no half-written mask is
    ever visible."""
    with staging_folder(target.parent, target.name) as staging:
        write_like(image, staging / target.name, source)
        written = sorted(staging.iterdir(), key=lambda p: p.name == target.name)
        clashes = [target.parent / p.name for p in written if (target.parent / p.name).exists()]
        if clashes:
            raise FileExistsError(f"{clashes[0]} already exists")
        for path in written:
            os.replace(path, target.parent / path.name)


def predict_volume(export: ExportedModel, path: Path, target: Path) -> Prediction:
    """Segment one MRI volume into `target` (see `mask_targets`) on the input's grid."""
    result = Prediction(path)
    result.error = input_problem(path, export.task)
    if result.error:
        return result
    if target.exists():
        result.error = f"{target} already exists: predictions are never overwritten; choose another --out"
        return result
    image, result.error = read_volume(path, "volume")
    if image is None:
        return result
    try:
        mask, result.summary = _segment(export, stem(path), path, image)
    except Exception as error:  # noqa: BLE001 - any failure here is this file's problem, reported per file
        result.error = f"could not be predicted ({_one_line(error)})"
        return result
    if mask is None:
        result.error, result.summary = result.summary, ""
        return result
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        _write_image(mask, target, path)
    except (OSError, RuntimeError, WriteError) as error:
        result.error = f"could not write {target} ({_one_line(error)})"
        return result
    result.output = target
    return result


def predict(export: ExportedModel, inputs: Sequence[str | Path], out: str | Path,
            on_file: Callable[[Prediction], None] | None = None) -> list[Prediction]:
    """Predict every input with an exported model; results in input order, failures with their reason."""
    paths, out = [Path(p) for p in inputs], Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: the output must be a folder, but it is a file; nothing was written")
    if not facts_for(export.task).predicts_volumes:
        results = predict_images(export, paths, out)
        for result in results:
            if on_file is not None:
                on_file(result)
        return results
    results = []
    for path, target in zip(paths, mask_targets(paths, out), strict=True):
        results.append(predict_volume(export, path, target))
        if on_file is not None:
            on_file(results[-1])
    return results
