"""What `medfl predict` accepts and where its results go, decided from paths alone (no torch, no image read),
so that the command can refuse inputs and outputs before the model loads."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from medfl.data.images import IMAGE_EXTENSIONS
from medfl.errors import ConfigError
from medfl.task_facts import facts_for

VOLUME_EXTENSIONS = (".nii.gz", ".nii", ".mhd", ".mha")
PREDICTIONS_CSV = "predictions.csv"


@dataclass
class Prediction:
    """The outcome for one input: where its result went and a short summary, or why it failed."""

    input: Path
    output: Path | None = None
    summary: str = ""
    error: str | None = None


def file_extension(path: Path) -> str | None:
    """The file's volume or image extension as written (".nii.gz", ".JPG", ...), or None."""
    lower = path.name.lower()
    for extension in VOLUME_EXTENSIONS + IMAGE_EXTENSIONS:
        if lower.endswith(extension) and len(lower) > len(extension):
            return path.name[-len(extension):]
    return None


def input_problem(path: Path, task: str) -> str | None:
    """Why `path` cannot go to a model of `task` (missing, a folder, unknown type, wrong modality), or None."""
    if path.is_dir():
        return "is a folder; give the files themselves"
    if not path.exists():
        return "file not found"
    extension = file_extension(path)
    takes_volumes = facts_for(task).predicts_volumes
    if extension is None:
        known = ", ".join(VOLUME_EXTENSIONS if takes_volumes else IMAGE_EXTENSIONS)
        return f"unknown file type (this model takes {known})"
    is_volume = extension.lower() in VOLUME_EXTENSIONS
    if is_volume and not takes_volumes:
        return "is an MRI volume, but this model classifies dermoscopy images"
    if takes_volumes and not is_volume:
        return "is a 2-D image, but this model segments MRI volumes (NIfTI or MetaImage)"
    return None


def stem(path: Path) -> str:
    """The file name without its (possibly double, as in .nii.gz) extension."""
    extension = file_extension(path) or path.suffix
    return path.name[: len(path.name) - len(extension)]


def mask_name(path: Path) -> str:
    """`<name>_mask<extension>`, the extension as the input's (".nii.gz", ".mhd", ...)."""
    return f"{stem(path)}_mask{path.name[len(stem(path)):]}"


def mask_targets(paths: Sequence[Path], out: Path) -> list[Path]:
    """Where each input's mask goes: `out/<folder>/<name>_mask<extension>`, <folder> being the input's
    folder below the deepest folder common to all volume inputs. Inputs of one folder go straight into
    `out`; inputs of one name from different folders (ISBI/Case00.nii.gz, ISBI_1.5/Case00.nii.gz) keep their
    folders apart (out/ISBI/Case00_mask.nii.gz, out/ISBI_1.5/Case00_mask.nii.gz)."""
    folders = [path.resolve().parent for path in paths]
    volumes = [f for f, p in zip(folders, paths, strict=True) if (file_extension(p) or "").lower() in VOLUME_EXTENSIONS]
    common = Path(os.path.commonpath(volumes)) if volumes else None
    return [out / (folder.relative_to(common) if common and folder.is_relative_to(common) else "") / mask_name(path)
            for path, folder in zip(paths, folders, strict=True)]


def predictions_csv(out: Path) -> Path:
    """Where image predictions go; a ConfigError when `out` cannot be that folder or already holds them."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: --out must be a folder, and this is a file")
    csv_path = out / PREDICTIONS_CSV
    if csv_path.exists():
        raise ConfigError(f"{csv_path} already exists: predictions are never overwritten; choose another --out")
    return csv_path


def path_problems(paths: Sequence[Path], task: str, out: Path) -> list[str | None]:
    """Per input, why it cannot be predicted judging from paths alone (what the model would refuse, or a mask
    that already exists), or None; a ConfigError when the output folder itself is unusable."""
    if not facts_for(task).predicts_volumes:
        predictions_csv(out)
        return [input_problem(path, task) for path in paths]
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: --out must be a folder, and this is a file")
    return [input_problem(path, task) or (f"{target} already exists: predictions are never overwritten; "
                                          "choose another --out" if target.exists() else None)
            for path, target in zip(paths, mask_targets(paths, out), strict=True)]
