"""What configs may know about a task: its key and the facts that need no behaviour (the config layer).

A task has two halves. Its facts (here) answer from configs alone: its name, layouts and site keys, its
class list and what configs must state, its metric, the networks it trains by name, and plain words and
numbers for checks and exports. Its behaviour (`medfl.tasks`: reading a site, training, scoring, exporting,
reporting) needs the layers above this one. `medfl.config` and `medfl.experiment` validate configs with the
facts, so they import neither torch nor MONAI nor the task's behaviour; every `medfl.tasks.Task` is a
subclass of its task's facts class. Any layer may read a task's facts by key (`facts_for`), as it reads the
method table (`medfl.methods`); only the composition layer and the entry points turn a key into a Task.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from enum import Enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from medfl.config import DataSettings, SiteConfig


class TaskKey(str, Enum):
    """The key naming a task in configs, run folders and exports (its value is what files hold)."""

    CLASSIFICATION = "classification"
    SEGMENTATION = "segmentation"

    def __str__(self) -> str:
        return self.value


class TaskFacts(ABC):
    """One task's facts. Class attributes describe it; methods answer from configs alone."""

    key: TaskKey
    modality: str  # names the default recipes (<modality>_train / _eval) and the synthetic data's folder
    metric: str  # the validation metric DET's phi and model selection read
    layouts: tuple[str, ...]  # site-config layouts this task reads
    site_fields: tuple[str, ...]  # site-config keys that apply to this task only
    default_cpa_tau: float  # CPA's tau when the experiment does not set it
    sample_noun: str  # what one training sample is ("image", "slice"), for messages
    # The networks it trains: config name -> "module:Class" (medfl.network_facts describes them without torch).
    network_classes: dict[str, str]
    bundle_packages: dict[str, str]  # pip name -> lowest version a MONAI bundle's runner needs to read the inputs
    bundle_batch_size: int
    predicts_volumes: bool = False  # `medfl predict` takes volumes (one mask each) rather than 2-D images
    volumetric: bool = False  # experiments may set data.dims 3 (whole volumes, patches, sliding window)
    confusion_matrices: bool = False  # reports rescore the selected models into confusion matrices
    example_slices: bool = False  # reports draw test slices with truth and prediction
    # Keys of an export manifest's `preprocessing` that `medfl predict` reads (medfl.manifests requires them).
    manifest_preprocessing_keys: tuple[str, ...] = ()

    # ------------------------------------------------------------------ what configs must state
    @abstractmethod
    def classes(self, configured: Sequence[str] | None) -> list[str]:
        """The federation's classes in order, from the experiment's `data.classes` (None: not given)."""

    def check_experiment_classes(self, configured: Sequence[str] | None) -> None:
        """ValueError when the experiment's class list does not suit the task (any list suits by default)."""
        return None

    def check_site_fields(self, site: SiteConfig) -> None:
        """ValueError when a site config's task-specific keys are wrong (beyond layout and foreign keys)."""
        return None

    @abstractmethod
    def label_targets(self, site: SiteConfig) -> list[str]:
        """The federation classes a site's labels map to, in first-seen order."""

    def missing_classes(self, site: SiteConfig, classes: Sequence[str]) -> list[str]:
        """Experiment classes a site cannot provide (none by default)."""
        return []

    def empty_classes(self, site: SiteConfig, settings: DataSettings) -> list[str]:
        """The classes a site reports when its data could not be read at all."""
        return self.label_targets(site)

    def site_inputs(self, site: SiteConfig) -> dict[str, Any]:
        """What an export's manifest records (under `preprocessing`) about how the site names files that are
        not inputs, so that a bundle pointed at a folder of the site's layout can leave them out."""
        return {}

    # ------------------------------------------------------------------ words and numbers for checks and exports
    @abstractmethod
    def check_classes(self, settings: DataSettings) -> str:
        """What `medfl check` says about the task's classes under these data settings."""

    def check_settings(self, settings: DataSettings) -> list[str]:
        """Further settings `medfl check` states for this task's sites."""
        return []

    def scored_counts(self, records: Sequence[Mapping[str, Any]]) -> str:
        """What `medfl evaluate` scored, for people: "30 images" (metrics per sample by default)."""
        return f"{len(records)} {self.sample_noun}s"

    @abstractmethod
    def logits_shape(self, classes: Sequence[str], size: int) -> list[Any]:
        """The exported program's output shape ("batch" for the free axis)."""

    def export_data_settings(self, saved: dict[str, Any], classes: Sequence[str]) -> dict[str, Any]:
        """An export's data settings as `medfl evaluate` reads a site with them."""
        return saved

    @abstractmethod
    def bundle_texts(self, manifest: Mapping[str, Any]) -> dict[str, str]:
        """Words for a MONAI bundle's metadata and README: what, data_type, io, formats, program."""


class ClassificationFacts(TaskFacts):
    """Dermoscopy classification: images with a label table, the experiment's class list."""

    key = TaskKey.CLASSIFICATION
    modality = "dermoscopy"
    metric = "macro_f1"
    layouts = ("ham10000", "isic2019", "csv")
    site_fields = ("table", "metadata_table", "filter", "label_map")
    default_cpa_tau = 3.0
    sample_noun = "image"
    network_classes = {"slim_vgg16": "medfl.models.vgg:SlimVGG16",
                       "densenet121": "medfl.models.classifiers:DenseNet121Net",
                       "efficientnet-b0": "medfl.models.classifiers:EfficientNetB0Net",
                       "resnet18": "medfl.models.classifiers:ResNet18Net"}
    bundle_packages = {"pillow": "10.0"}
    bundle_batch_size = 32
    confusion_matrices = True
    predicts_volumes = False  # medfl predict: 2-D images, one row of probabilities each

    def classes(self, configured: Sequence[str] | None) -> list[str]:
        if configured is None:
            raise ValueError("a classification experiment needs 'data.classes' (the class list and order)")
        return list(configured)

    def check_experiment_classes(self, configured: Sequence[str] | None) -> None:
        self.classes(configured)

    def check_site_fields(self, site: SiteConfig) -> None:
        if not site.label_map:
            raise ValueError("a classification site needs a non-empty 'label_map'")
        if all(target is None for target in site.label_map.values()):
            raise ValueError("'label_map' maps every label to null: the site would have no samples")

    def label_targets(self, site: SiteConfig) -> list[str]:
        targets: list[str] = []
        for target in (site.label_map or {}).values():
            if target is not None and target not in targets:
                targets.append(target)
        return targets

    def missing_classes(self, site: SiteConfig, classes: Sequence[str]) -> list[str]:
        return [c for c in classes if c not in self.label_targets(site)]

    def empty_classes(self, site: SiteConfig, settings: DataSettings) -> list[str]:
        return list(settings.classes) if settings.classes else self.label_targets(site)

    def check_classes(self, settings: DataSettings) -> str:
        return ", ".join(settings.classes) if settings.classes else "each site's label-map targets"

    def logits_shape(self, classes: Sequence[str], size: int) -> list[Any]:
        return ["batch", len(classes)]

    def export_data_settings(self, saved: dict[str, Any], classes: Sequence[str]) -> dict[str, Any]:
        return {**saved, "classes": list(classes)}

    def bundle_texts(self, manifest: Mapping[str, Any]) -> dict[str, str]:
        classes = ", ".join(manifest["classes"])
        return {
            "what": f"dermoscopy image classification into {classes}",
            "data_type": "jpeg or png images",
            "io": ("Input: the JPEG or PNG images (RGB, one lesion each) directly inside `--input_dir`. Output: "
                   "`predictions.csv` in `--output_dir`, one row per image without a header: the image's path, then "
                   f"the softmax probability of each class in this order: {classes}. A file that is not an RGB JPEG "
                   "or PNG (a grey or RGBA image, say) stops the run with one line naming it, before anything is "
                   "predicted or written."),
            "formats": "",
            "program": "the network on each image (logits), then softmax",
        }


SEGMENTATION_CLASSES = ("background", "prostate")  # mask value 0, and every value > 0 (zones merged)
DEFAULT_MASK_SUFFIX = "_segmentation"  # the multi-site prostate layout's mask suffix


class SegmentationFacts(TaskFacts):
    """Prostate MRI segmentation: volumes with masks, trained and scored slice by slice."""

    key = TaskKey.SEGMENTATION
    modality = "prostate"
    metric = "dice"
    layouts = ("nifti", "metaimage")
    site_fields = ("mask_suffix",)
    default_cpa_tau = 1.0
    sample_noun = "slice"
    network_classes = {"unet": "medfl.models.segmentation:UNetNet",
                       "basicunet": "medfl.models.segmentation:BasicUNetNet"}
    bundle_packages = {"itk-io": "5.3.0", "nibabel": "5.0"}
    bundle_batch_size = 1
    example_slices = True
    predicts_volumes = True  # medfl predict: volumes, one mask each, slice by slice
    volumetric = True  # data.dims 3: medfl.tasks.volumetric
    manifest_preprocessing_keys = ("context_slices",)

    def classes(self, configured: Sequence[str] | None) -> list[str]:
        return list(SEGMENTATION_CLASSES)

    def label_targets(self, site: SiteConfig) -> list[str]:
        return list(SEGMENTATION_CLASSES)

    def site_inputs(self, site: SiteConfig) -> dict[str, Any]:
        return {"mask_suffix": site.effective_mask_suffix}

    def check_classes(self, settings: DataSettings) -> str:
        background, foreground = SEGMENTATION_CLASSES
        return f"{background} (mask value 0), {foreground} (any value > 0)"

    def check_settings(self, settings: DataSettings) -> list[str]:
        if settings.dims == 3:
            return [f"spacing {' x '.join(f'{s:g}' for s in settings.spacing)} mm, "
                    f"patch {' x '.join(str(e) for e in settings.patch_size)} voxels"]
        return [f"training slices: {settings.slices}"]

    def scored_counts(self, records: Sequence[Mapping[str, Any]]) -> str:
        cases = len({record["case_id"] for record in records})
        return f"{cases} cases, {len(records)} slices; metrics per case"

    def logits_shape(self, classes: Sequence[str], size: int) -> list[Any]:
        return ["batch", len(classes), size, size]

    def bundle_texts(self, manifest: Mapping[str, Any]) -> dict[str, str]:
        size = manifest["input"]["size"][0]
        return {
            "what": "prostate segmentation of T2-weighted MRI volumes, slice by slice (2.5-D)",
            "data_type": "nifti or metaimage volumes",
            "io": ("Input: the MRI volumes (one 3-D T2-weighted volume per file) directly inside `--input_dir`. "
                   "Output: one mask per volume in `--output_dir`, named `<name>_mask<extension>`, in the input's "
                   "format and on its voxel grid (same affine; a NIfTI mask's qform and sform codes are 1, MONAI's "
                   "writer sets them so), 0 = background, 1 = prostate. Files whose name ends in "
                   f"the site's mask suffix '{manifest['preprocessing'].get('mask_suffix', DEFAULT_MASK_SUFFIX)}' (masks beside their volumes) "
                   "are left out, and the run lists them; `--mask_suffix` names another."),
            "formats": ("\nNIfTI (`.nii.gz`) is read by default; for MetaImage volumes add `--input_ext .mhd` (or "
                        "`.nii`, `.mha`): masks are written in the same format.\n"),
            "program": (f"models/model.ts resizes every axial slice to {size} x {size} (bilinear, anti-aliased as "
                        f"torch does), stacks it with {manifest['preprocessing']['context_slices']} neighbouring "
                        "slice(s) on each side, runs the network and resizes the logits back to the slice; then "
                        "argmax, and the mask is put back in the input's orientation"),
        }


# Every task's facts, by key: a new task adds its facts class here and its Task to medfl/tasks/registry.py.
FACTS: dict[TaskKey, TaskFacts] = {facts.key: facts for facts in (ClassificationFacts(), SegmentationFacts())}


def facts_for(key: str | TaskKey) -> TaskFacts:
    """The facts of a config's `task` value; ValueError naming the valid keys otherwise."""
    try:
        return FACTS[TaskKey(str(key))]
    except ValueError:
        raise ValueError(f"unknown task '{key}'; valid tasks: {', '.join(k.value for k in FACTS)}") from None
