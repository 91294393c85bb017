"""What an export or a bundle records about itself, read and checked in one place.

`ExportManifest` is the model of an export's manifest.json: `medfl predict`, `evaluate`, `verify` and the
bundle writer all go through it. A manifest that lacks a key the commands use, or holds a value of the wrong
kind, is refused with one line naming the file and the key, before anything of the export is used. Keys this
version does not know are kept (`extra="allow"`), so manifests of other medfl versions still load when the
keys read here are sound.

`verify_files` and `verify_bundle` check every file an export's manifest or a bundle's metadata lists against
its recorded sha256 (`medfl verify`). Nothing here imports torch or MONAI: a broken manifest or a changed file
is reported at once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from medfl.config import DataSettings, format_validation_error
from medfl.errors import ConfigError, DataError
from medfl.task_facts import FACTS, facts_for

FORMAT = "medfl-export/1"
MANIFEST = "manifest.json"
WEIGHTS = "model.pt"
PROGRAM = "model.pt2"
RECIPE = "eval_transforms.yaml"
EXPORT_FILES = (WEIGHTS, PROGRAM, RECIPE)
SITE_NAME = r"^[A-Za-z0-9_.-]+$"  # as medfl.config.SiteConfig: a site's name becomes its export folder's name
SHA256 = r"^[0-9a-f]{64}$"
# A MONAI bundle's files (medfl.deliver.monai_bundle writes them); metadata.json lists the sha256 of the others.
BUNDLE_METADATA, BUNDLE_INFERENCE = "configs/metadata.json", "configs/inference.json"
BUNDLE_PROGRAM, BUNDLE_WEIGHTS, BUNDLE_README = "models/model.ts", "models/model.pt", "docs/README.md"
BUNDLE_FILES = (BUNDLE_PROGRAM, BUNDLE_WEIGHTS, BUNDLE_INFERENCE)


class _Part(BaseModel):
    model_config = ConfigDict(extra="allow")


class ModelPart(_Part):
    """- `role`: personalized or deputy
    - `name`: the model's name in the run (P, D or M)
    - `method`: the federated method that trained it"""

    role: StrictStr
    name: StrictStr
    method: StrictStr


class NetworkPart(_Part):
    """The arguments of `medfl.models.build_model` (which checks the network's own options).

    - `name`, `task`, `num_classes`, `in_channels`: the network and what it maps"""

    name: StrictStr
    task: StrictStr
    num_classes: StrictInt = Field(ge=1)
    in_channels: StrictInt = Field(ge=1)


class InputPart(_Part):
    """- `channels`: the network's input channels
    - `size`: the network's input size [height, width] in pixels; for a 3-D network its patch [x, y, z] in voxels"""

    channels: StrictInt = Field(ge=1)
    size: list[StrictInt] = Field(min_length=2, max_length=3)


class RoundPart(_Part):
    """- `requested`: best, last or a round number; `selected`: the round exported
    - `completed_rounds`, `rounds`: how far the run got, and how far it was planned"""

    requested: StrictStr | StrictInt
    selected: StrictInt = Field(ge=0)
    completed_rounds: StrictInt = Field(ge=0)
    rounds: StrictInt = Field(ge=0)


class MetricsPart(_Part):
    """- `metric`: the run's selection metric
    - `validation`, `test`: the run's scores of the exported round (null where undefined)"""

    metric: StrictStr
    validation: dict[str, float | None]
    test: dict[str, float | None]


class ExperimentPart(_Part):
    """- `name`: the experiment's name"""

    name: StrictStr


class TrainingFilesPart(_Part):
    """- `count`: how many files the site trained on; `sha256`: the hash of their list"""

    count: StrictInt = Field(ge=0)
    sha256: StrictStr


class ExportManifest(_Part):
    """manifest.json of one site's export (medfl.deliver.export writes it)."""

    format: Literal["medfl-export/1"]
    site: StrictStr = Field(pattern=SITE_NAME)
    task: StrictStr
    classes: list[StrictStr] = Field(min_length=1)
    model: ModelPart
    network: NetworkPart
    input: InputPart
    preprocessing: dict[str, Any]
    round: RoundPart
    metrics: MetricsPart
    experiment: ExperimentPart
    training_files: TrainingFilesPart
    data_settings: DataSettings
    versions: dict[str, StrictStr]
    exported_at: StrictStr
    files: dict[str, Annotated[StrictStr, Field(pattern=SHA256)]] | None = None  # written last; verify_files requires it

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        if value not in {str(key) for key in FACTS}:
            raise ValueError(f"unknown task '{value}' (known: {', '.join(str(key) for key in FACTS)})")
        return value

    @model_validator(mode="after")
    def _task_preprocessing(self) -> ExportManifest:
        missing = [key for key in facts_for(self.task).manifest_preprocessing_keys if key not in self.preprocessing]
        if missing:
            raise ValueError(f"key 'preprocessing.{missing[0]}': Field required")
        return self


def check_manifest(manifest: Any, source: str | Path) -> dict[str, Any]:
    """`manifest` itself when it is a sound export manifest, else one ConfigError naming `source` and the key."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ConfigError(f"{source}: not a medfl export manifest (expected format '{FORMAT}')")
    try:
        ExportManifest.model_validate(manifest)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, ExportManifest, source)) from None
    return manifest


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The checked manifest of one site's export; a missing, unreadable, foreign or incomplete manifest is a
    ConfigError naming the file (and the key)."""
    path = Path(folder) / MANIFEST
    return check_manifest(_read_json(path, "manifest", f"is {folder} an export folder?"), path)


def _read_json(path: Path, what: str, hint: str) -> Any:
    """A JSON file's content; a missing or unreadable file is one ConfigError naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found ({hint})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path}: unreadable {what} ({' '.join(str(error).split())[:200]})") from None


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (what `sha256sum` prints)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _site_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if (p / MANIFEST).is_file()) if root.is_dir() else []


def find_export(path: str | Path, site: str | None = None) -> Path:
    """One site's export folder: `path` itself when it holds a manifest, else `path/<site>` of an export root.

    An export root with a single site needs no `site`; with several, `site` chooses one.
    """
    path = Path(path)
    if (path / MANIFEST).is_file():
        found = read_manifest(path)["site"]
        if site is not None and found != site:
            raise ConfigError(f"{path}: this export is site '{found}', not '{site}'")
        return path
    folders = _site_folders(path)
    if not folders:
        raise ConfigError(f"{path}: not an export folder (no {MANIFEST} in it or in its sub-folders)")
    names = [folder.name for folder in folders]
    if site is not None:
        if site not in names:
            raise ConfigError(f"{path}: no export of site '{site}' (sites: {', '.join(names)})")
        return path / site
    if len(folders) > 1:
        raise ConfigError(f"{path}: holds the exports of sites {', '.join(names)}; choose one with --site")
    return folders[0]


def verify_files(folder: Path, manifest: dict[str, Any]) -> list[tuple[str, str]]:
    """Check every file the manifest lists against its sha256; the export's own files must all be listed, and
    a listed name must be a file of this folder. The first mismatch is one DataError naming the file; returns
    (name, sha256) of every file checked, in the manifest's order."""
    site = str(manifest.get("site"))
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise DataError("the manifest lists no file hashes", site=site, path=str(folder / MANIFEST))
    unlisted = [name for name in EXPORT_FILES if name not in files]
    if unlisted:
        raise DataError(f"the manifest lists no sha256 for {unlisted[0]}", site=site, path=str(folder / MANIFEST))
    checked = []
    for name, expected in files.items():
        if Path(name).name != name or name in (".", "..", MANIFEST) or not isinstance(expected, str):
            raise DataError(f"the manifest lists '{name}', which is not a file of the export", site=site,
                            path=str(folder / MANIFEST))
        path = folder / name
        if not path.is_file():
            raise DataError("not found (the manifest lists it)", site=site, path=str(path))
        if sha256_file(path) != expected:
            raise DataError(f"sha256 differs from the manifest's ({expected[:12]}...): the file changed after export",
                            site=site, path=str(path))
        checked.append((name, expected))
    return checked


class BundleMetadata(_Part):
    """What medfl reads of a bundle's configs/metadata.json (MONAI's keys and medfl's provenance around it).

    - `site`: the site whose model the bundle holds
    - `sha256`: the sha256 of every other file of the bundle, by its path in the bundle"""

    site: StrictStr = Field(pattern=SITE_NAME)
    sha256: dict[str, Annotated[StrictStr, Field(pattern=SHA256)]]


def read_bundle_metadata(folder: str | Path) -> dict[str, Any]:
    """A bundle's checked metadata; one ConfigError naming the file (and the key) when it is not sound."""
    path = Path(folder) / BUNDLE_METADATA
    metadata = _read_json(path, "bundle metadata", f"is {folder} a bundle folder?")
    if not isinstance(metadata, dict):
        raise ConfigError(f"{path}: not a bundle's metadata (a JSON object)")
    try:
        BundleMetadata.model_validate(metadata)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, BundleMetadata, path)) from None
    return metadata


def _bundle_file(name: str) -> bool:
    """Whether `name` is a path inside a bundle (relative, no `.` or `..` parts) other than the metadata."""
    parts = name.split("/")
    return name != BUNDLE_METADATA and "\\" not in name and all(part not in ("", ".", "..") for part in parts)


def verify_bundle(folder: Path, metadata: dict[str, Any]) -> list[tuple[str, str]]:
    """Check every file a bundle's metadata lists against its sha256 (the model, its weights and the inference
    config must be listed); the first mismatch is one DataError naming the file. Returns (name, sha256) of
    every file checked, in the metadata's order."""
    site, files = str(metadata.get("site")), metadata["sha256"]
    source = str(folder / BUNDLE_METADATA)
    unlisted = [name for name in BUNDLE_FILES if name not in files]
    if unlisted:
        raise DataError(f"the metadata lists no sha256 for {unlisted[0]}", site=site, path=source)
    checked = []
    for name, expected in files.items():
        if not _bundle_file(name):
            raise DataError(f"the metadata lists '{name}', which is not a file of the bundle", site=site, path=source)
        path = folder / name
        if not path.is_file():
            raise DataError("not found (the bundle's metadata lists it)", site=site, path=str(path))
        if sha256_file(path) != expected:
            raise DataError(f"sha256 differs from the one the metadata records ({expected[:12]}...): the file "
                            "changed after export", site=site, path=str(path))
        checked.append((name, expected))
    return checked


@dataclass
class Verified:
    """One export or bundle folder whose recorded hashes all matched: what it is and what was checked."""

    kind: Literal["export", "bundle"]
    folder: Path
    site: str
    files: list[tuple[str, str]]


def _kind(folder: Path) -> Literal["export", "bundle"] | None:
    if (folder / MANIFEST).is_file():
        return "export"
    if (folder / BUNDLE_METADATA).is_file():
        return "bundle"
    return None


def verify(path: str | Path, on_folder: Callable[[Verified], None] | None = None) -> list[Verified]:
    """Check every recorded hash of one site's export or bundle, or of every site folder under an export or
    bundle root (in name order). The first file that is missing or differs is one MedflError naming it."""
    path = Path(path)
    kind = _kind(path)
    folders = [path] if kind else sorted(p for p in path.iterdir() if _kind(p)) if path.is_dir() else []
    if not folders:
        raise ConfigError(f"{path}: neither an export nor a bundle (no {MANIFEST} or {BUNDLE_METADATA} in it or in "
                          "its sub-folders)")
    results = []
    for folder in folders:
        if _kind(folder) == "export":
            manifest = read_manifest(folder)
            result = Verified("export", folder, manifest["site"], verify_files(folder, manifest))
        else:
            metadata = read_bundle_metadata(folder)
            result = Verified("bundle", folder, metadata["site"], verify_bundle(folder, metadata))
        results.append(result)
        if on_folder is not None:
            on_folder(result)
    return results
