"""Site configs (facts about one site's data) and data settings (an experiment's data choices).

A site config is a small YAML file validated with pydantic: unknown keys are errors naming the key and the
file, `${VAR}` / `$VAR` environment variables are expanded in path fields, and `data_root` resolves against
the config file's folder, and so does `split_file`. `table` and `metadata_table` resolve against `data_root`,
because they name files of the data set itself (their defaults are the public releases' file names). Every file
a site reads must lie, symlinks followed, inside data_root or the config file's folder (`SiteConfig.holds`);
data_root itself may be anywhere. `DataSettings` holds the choices (classes, input size, splits, slices, recipes,
runtime) with defaults that suit a 2-core CPU; the experiment config embeds it.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from medfl.errors import ConfigError
from medfl.task_facts import DEFAULT_MASK_SUFFIX, FACTS, TaskKey, facts_for
from medfl.yaml_files import AliasRefused, describe_error, load_yaml

DEFAULT_TABLES = {
    "ham10000": "HAM10000_metadata.csv",
    "isic2019": "ISIC_2019_Training_GroundTruth.csv",
    "csv": "labels.csv",
}
DEFAULT_ISIC_METADATA = "ISIC_2019_Training_Metadata.csv"
# Names that become file and folder names (site names, experiment names) stay well under the 255 bytes most file
# systems allow in one path component, leaving room for what medfl adds ("<name>-<method>-seed<seed>-nvflare").
MAX_NAME_BYTES = 100
_ENV_PATTERN = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


def load_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML file holding one mapping; any problem is a ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except AliasRefused as error:
        raise ConfigError(f"{path}: {describe_error(error)}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML: {describe_error(error)}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(data).__name__}")
    return data


def check_name_length(value: str) -> str:
    """A name that becomes a path component, refused (ValueError) above MAX_NAME_BYTES bytes of UTF-8."""
    size = len(value.encode("utf-8"))
    if size > MAX_NAME_BYTES:
        raise ValueError(f"is {size} bytes long; it names folders and files, so at most {MAX_NAME_BYTES} bytes")
    return value


def expand_env(value: str, source: str | Path | None = None) -> str:
    """Expand `${VAR}` and `$VAR` (and a leading `~`); an unset variable is an error naming it and the file."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in os.environ:
            where = f" (in {source})" if source else ""
            raise ValueError(f"environment variable '{name}' is not set{where}")
        return os.environ[name]

    return os.path.expanduser(_ENV_PATTERN.sub(replace, value))


def _format_location(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc)


def format_validation_error(error: ValidationError, model: type[BaseModel], source: str | Path) -> str:
    """Turn pydantic's report into one line: `<file>: unknown key 'x' (did you mean 'y'?); key 'z': ...`."""
    parts = []
    for item in error.errors():
        loc = tuple(item["loc"])
        if item["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, loc[:-1])
            hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            suggestion = f" (did you mean '{hint[0]}'?)" if hint else f" (allowed: {', '.join(allowed)})"
            parts.append(f"unknown key '{_format_location(loc)}'{suggestion}")
        elif loc:
            message = str(item["msg"]).removeprefix("Value error, ")
            parts.append(f"key '{_format_location(loc)}': {message}")
        else:
            parts.append(str(item["msg"]).removeprefix("Value error, "))
    return f"{source}: " + "; ".join(parts)


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names valid at `loc` (walks nested pydantic models; falls back to the top level)."""
    current: Any = model
    for part in loc:
        field = current.model_fields.get(str(part)) if isinstance(current, type) else None
        annotation = getattr(field, "annotation", None)
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            break
        current = nested[0]
    return list(current.model_fields)


def validate_model(model: type[BaseModel], data: dict[str, Any], source: str | Path, **context: Any) -> Any:
    """Validate `data` as `model`, raising one ConfigError line that names the file and every bad key.

    The context carries `source` (the file's path) for validators that resolve relative paths.
    """
    try:
        return model.model_validate(data, context={"source": Path(source), **context})
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, model, source)) from None


class RowFilter(BaseModel):
    """Keep only table rows whose `column` holds one of `values` (several sites sharing one folder).

    - `column`: a column of the site's label table (HAM10000: `dataset`).
    - `values`: the values that belong to this site; numbers are compared as text.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    column: str = Field(min_length=1)
    values: list[str] = Field(min_length=1)

    @field_validator("values", mode="before")
    @classmethod
    def _as_strings(cls, value: Any) -> Any:
        if isinstance(value, (str, int, float)):
            value = [value]
        return [str(v) for v in value] if isinstance(value, list) else value


class SiteConfig(BaseModel):
    """Facts about one site's data: where it lies, its layout, how its labels map to federation classes.

    - `name`: the site's name, unique in a federation: letters, digits, `_`, `.` and `-`, at most 100 bytes.
      It names the site in logs, run folders, exports and NVFlare (the client name must be the same).
    - `task`: classification (dermoscopy images) or segmentation (prostate MRI volumes).
    - `data_root`: the site's data folder; relative paths resolve against the config file's folder.
    - `layout`: how the folder is organised. Classification: `ham10000` (`<image_id>.jpg` anywhere under
      data_root and HAM10000_metadata.csv), `isic2019` (ISIC_2019_Training_GroundTruth.csv with one-hot
      columns), `csv` (labels.csv with columns image,label and an optional lesion_id). Segmentation:
      `nifti` (Case00.nii.gz with Case00_segmentation.nii.gz) or `metaimage` (Case00.mhd/.raw with
      Case00_segmentation.mhd).
    - `table`: the label table, under data_root (classification only; default: the layout's file name,
      HAM10000_metadata.csv, ISIC_2019_Training_GroundTruth.csv or labels.csv).
    - `metadata_table`: isic2019 only: the metadata table with `lesion_id`, under data_root (default
      ISIC_2019_Training_Metadata.csv when it exists), so that images of one lesion stay on one side of a
      split. `medfl synth` writes it for its isic2019 site.
    - `filter`: keep only the table rows whose `column` holds one of `values` (several sites sharing one
      folder, e.g. the HAM10000 `dataset` column); classification only.
    - `label_map`: every source label of the table mapped to a federation class, or to null (a known
      label this site does not use); required for classification. isic2019 keys are the column names.
    - `mask_suffix`: segmentation only: the mask file name suffix, matched case-insensitively (default
      `_segmentation`).
    - `split_file`: an official split: a CSV `id,split` (split = train, val or test; id = image id or case
      id), relative to the config file's folder. Without one, medfl splits by lesion or case with the
      experiment's fractions and seed.
    - `withhold_prototypes_below`: a privacy choice of the site: class prototypes (mean features) of classes
      with fewer training samples than this are not sent to the server (default 0: all are sent). A
      prototype of a class with a handful of samples is close to those patients' own features.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    task: TaskKey
    data_root: Path
    layout: Literal["ham10000", "isic2019", "csv", "nifti", "metaimage"]
    table: Path | None = None
    metadata_table: Path | None = None
    filter: RowFilter | None = None
    label_map: dict[str, str | None] | None = None
    mask_suffix: str | None = None
    split_file: Path | None = None
    withhold_prototypes_below: int = Field(default=0, ge=0)

    _source: Path | None = PrivateAttr(default=None)

    @field_validator("data_root", "table", "metadata_table", "split_file", mode="before")
    @classmethod
    def _expand_environment(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = expand_env(value)
            if not value.strip():
                raise ValueError("must not be empty")
        return value

    @field_validator("name")
    @classmethod
    def _not_a_folder_alias(cls, value: str) -> str:
        if value in (".", ".."):
            raise ValueError(f"'{value}' cannot name a site: site names become folder names")
        return check_name_length(value)

    @field_validator("label_map", mode="before")
    @classmethod
    def _label_keys_as_strings(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {str(k): v for k, v in value.items()}
        return value

    @field_validator("mask_suffix")
    @classmethod
    def _non_empty_suffix(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty")
        return value

    @model_validator(mode="after")
    def _check_task_fields(self, info: ValidationInfo) -> SiteConfig:
        task = facts_for(self.task)
        if self.layout not in task.layouts:
            raise ValueError(f"layout '{self.layout}' is not a {self.task} layout (use one of: {', '.join(task.layouts)})")
        foreign = [key for other in FACTS.values() if other is not task for key in other.site_fields]
        given = [key for key in foreign if getattr(self, key) is not None]
        if given:
            raise ValueError(f"key '{given[0]}' does not apply to a {self.task} site")
        task.check_site_fields(self)
        if self.metadata_table is not None and self.layout != "isic2019":
            raise ValueError("key 'metadata_table' applies to the isic2019 layout only")
        source = (info.context or {}).get("source")
        if source is not None:
            self._source = Path(source).resolve()
            for key in ("data_root", "split_file"):
                value = getattr(self, key)
                if value is not None and not value.is_absolute():
                    object.__setattr__(self, key, (self._source.parent / value).resolve())
        return self

    @property
    def source_path(self) -> Path | None:
        """The YAML file this config came from (None when built in code)."""
        return self._source

    @property
    def table_path(self) -> Path | None:
        """The label table of a site whose layout has one (default: the layout's file name), under data_root."""
        if self.layout not in DEFAULT_TABLES:
            return None
        return self._under_root(self.table or Path(DEFAULT_TABLES[self.layout]))

    @property
    def metadata_path(self) -> Path | None:
        """The isic2019 metadata table (with lesion_id): the given one, or the default one if it exists."""
        if self.layout != "isic2019":
            return None
        if self.metadata_table is not None:
            return self._under_root(self.metadata_table)
        default = self._under_root(Path(DEFAULT_ISIC_METADATA))
        return default if default.is_file() else None

    @property
    def split_path(self) -> Path | None:
        """The official split file (CSV `id,split`), or None; relative to the config file's folder."""
        return self.split_file

    @property
    def own_folders(self) -> tuple[Path, ...]:
        """data_root and the config file's folder, symlinks resolved: the only places this site's files may lie."""
        return tuple(Path(folder) for folder in _real_folders(self.data_root, self._source))

    def holds(self, path: Path) -> bool:
        """Whether `path`, symlinks followed, lies inside data_root or the config file's folder.

        Resolved paths are compared, so `..` in a path is fine when the result stays inside, and a symlink
        inside data_root that points elsewhere is not."""
        resolved = os.path.realpath(path)
        return any(resolved == folder or resolved.startswith(folder.rstrip(os.sep) + os.sep)
                   for folder in _real_folders(self.data_root, self._source))

    @property
    def effective_mask_suffix(self) -> str:
        """The mask file name suffix (matched case-insensitively)."""
        return self.mask_suffix or DEFAULT_MASK_SUFFIX

    def label_targets(self) -> list[str]:
        """The federation classes this site's labels map to, in first-seen order, without nulls."""
        return facts_for(self.task).label_targets(self)

    def describe(self) -> str:
        """`site 'name': <config file>` for messages."""
        return f"site '{self.name}'" + (f" ({self.source_path})" if self.source_path else "")

    def _under_root(self, path: Path) -> Path:
        return path if path.is_absolute() else self.data_root / path


@functools.lru_cache(maxsize=256)
def _real_folders(data_root: Path, source: Path | None) -> tuple[str, ...]:
    """The real paths of data_root and of the config file's folder (asked once per site, not once per file)."""
    folders = [os.path.realpath(data_root)]
    if source is not None:
        folders.append(os.path.realpath(source.parent))
    return tuple(folders)


def load_site_config(path: str | Path) -> SiteConfig:
    """Read and validate one site config; relative `data_root` resolves against the file's folder."""
    path = Path(path)
    data = load_yaml_mapping(path)
    try:
        return validate_model(SiteConfig, data, path)
    except ConfigError as error:
        name = data.get("name")
        if isinstance(name, str) and name and len(name.encode("utf-8")) <= MAX_NAME_BYTES:
            raise ConfigError(f"site '{name}': {error}") from None
        raise


# Keys of DataSettings that mean something in 3-D only, with their 3-D defaults (DataSettings documents them).
VOLUMETRIC_DEFAULTS: dict[str, Any] = {"spacing": (2.0, 2.0, 3.0), "patch_size": (64, 64, 16),
                                       "patches_per_volume": 2, "foreground_ratio": 0.5}
VOLUMETRIC_KEYS = tuple(VOLUMETRIC_DEFAULTS)


class DataSettings(BaseModel):
    """The data choices of an experiment, with defaults for a small CPU run.

    - `classes`: the federation's class names in order; None means every non-null target of the site's
      label_map in first-seen order (what `medfl check` uses). Ignored by segmentation sites, whose classes
      are always background and prostate.
    - `input_size`: images and slices are resized to input_size x input_size pixels.
    - `split_fractions`: train/val/test shares of groups (lesions, images without lesion id, or cases).
    - `split_seed`: the seed of the split (and of the choice of empty training slices).
    - `slices` ("all" | "foreground") and `empty_slice_fraction`: which training slices are kept; with
      "foreground", slices with prostate plus that share of the empty ones. Val and test keep every slice.
    - `context_slices`: 2.5-D input; k neighbouring slices on each side become extra channels.
    - `train_recipe` / `eval_recipe`: names of recipes shipped with medfl (the transforms/ folder) or YAML paths; None = the task default.
    - `cache_rate`, `num_workers`: share of records cached by CacheDataset, and threads used to read and
      validate images and to fill the cache (2 suits a 2-core machine).
    - `dims`: 2 (images, or axial slices of volumes: the default) or 3 (segmentation only: whole volumes,
      trained on patches and scored with a sliding window). In 3-D, `input_size`, `slices` and
      `empty_slice_fraction` are ignored and `context_slices` must stay 0.
    - `spacing`: 3-D only: the voxel spacing (mm, x y z in RAS orientation) volumes are resampled to; null: 2.0,
      2.0, 3.0 (about 64-96 voxels across a prostate MRI's field of view: the CPU plan).
    - `patch_size`: 3-D only: the training patch (voxels, x y z); every edge a multiple of the network's total
      downsampling (16 for the default UNet); null: 64, 64, 16.
    - `patches_per_volume`: 3-D only: patches cropped from each training volume per epoch; null: 2.
    - `foreground_ratio`: 3-D only: the share of patches centred on prostate (the others on background);
      null: 0.5.
    """

    model_config = ConfigDict(extra="forbid")

    classes: list[str] | None = None
    input_size: int = Field(default=64, ge=8, le=2048)
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
    split_seed: int = 0
    slices: Literal["all", "foreground"] = "all"
    empty_slice_fraction: float = Field(default=0.1, ge=0.0, le=1.0)
    context_slices: int = Field(default=0, ge=0, le=8)
    train_recipe: str | None = None
    eval_recipe: str | None = None
    cache_rate: float = Field(default=1.0, ge=0.0, le=1.0)
    num_workers: int = Field(default=2, ge=0, le=64)
    dims: Literal[2, 3] = 2
    spacing: tuple[float, float, float] | None = None
    patch_size: tuple[int, int, int] | None = None
    patches_per_volume: int | None = Field(default=None, ge=1, le=64)
    foreground_ratio: float | None = Field(default=None, ge=0.0, le=1.0)

    @field_validator("spacing")
    @classmethod
    def _positive_spacing(cls, value: tuple[float, float, float] | None) -> tuple[float, float, float] | None:
        if value is not None and not all(0 < s <= 100 for s in value):
            raise ValueError(f"every spacing must be above 0 and at most 100 mm, got {list(value)}")
        return value

    @field_validator("patch_size")
    @classmethod
    def _positive_patch(cls, value: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
        if value is not None and not all(1 <= edge <= 1024 for edge in value):
            raise ValueError(f"every patch edge must be between 1 and 1024 voxels, got {list(value)}")
        return value

    @model_validator(mode="after")
    def _volumetric_keys(self) -> DataSettings:
        """2-D refuses the keys that mean something in 3-D only; 3-D fills their defaults (so that a run's
        config.yaml states them) and refuses 2.5-D context."""
        if self.dims == 2:
            given = [key for key in VOLUMETRIC_KEYS if getattr(self, key) is not None]
            if given:
                raise ValueError(f"'{given[0]}' applies to 3-D experiments only (data.dims: 3); this one is 2-D")
            return self
        if self.context_slices:
            raise ValueError(f"'context_slices' ({self.context_slices}) is 2.5-D input; with data.dims 3 the network "
                             "sees neighbouring slices itself: leave it at 0")
        for key, default in VOLUMETRIC_DEFAULTS.items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, default)
        return self

    @field_validator("classes")
    @classmethod
    def _distinct_classes(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if len(value) < 2:
            raise ValueError("needs at least two classes")
        duplicates = sorted({c for c in value if value.count(c) > 1})
        if duplicates:
            raise ValueError(f"class '{duplicates[0]}' is listed twice")
        return value

    @field_validator("split_fractions")
    @classmethod
    def _valid_fractions(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(f < 0 for f in value):
            raise ValueError("fractions must not be negative")
        if abs(sum(value) - 1.0) > 1e-6:
            raise ValueError(f"fractions must sum to 1, not {sum(value):g}")
        if value[0] <= 0 or value[1] <= 0:
            raise ValueError("train and validation fractions must be positive (DET measures on validation)")
        return value

    def recipe(self, task: str, stage: Literal["train", "eval"]) -> str:
        """The recipe name or path for a task and stage (task defaults: <modality>_train / _eval, e.g.
        dermoscopy_train; in 3-D <modality>3d_train / _eval)."""
        chosen = self.train_recipe if stage == "train" else self.eval_recipe
        if chosen:
            return chosen
        return f"{facts_for(task).modality}{'3d' if self.dims == 3 else ''}_{stage}"
