"""The contract of a task: every question whose answer depends on what the federation learns."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from enum import Enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

    from medfl.config import DataSettings, SiteConfig
    from medfl.data.problems import ProblemLog
    from medfl.data.records import SiteContent
    from medfl.data.site import SiteData, SiteReport
    from medfl.report.tables import Column


class TaskKey(str, Enum):
    """The key naming a task in configs, run folders and exports (its value is what files hold)."""

    CLASSIFICATION = "classification"
    SEGMENTATION = "segmentation"

    def __str__(self) -> str:
        return self.value


class Task(ABC):
    """One task. Class attributes describe it; methods answer what code elsewhere used to branch on."""

    key: TaskKey
    modality: str  # names the default recipes (<modality>_train / _eval) and the synthetic data's folder
    metric: str  # the validation metric DET's phi and model selection read
    layouts: tuple[str, ...]  # site-config layouts this task reads
    site_fields: tuple[str, ...]  # site-config keys that apply to this task only
    default_cpa_tau: float  # CPA's tau when the experiment does not set it
    sample_noun: str  # what one training sample is ("image", "slice"), for messages
    network_classes: dict[str, str]  # the networks it trains: config name -> "module:Class"

    # ------------------------------------------------------------------ configs (no torch, no MONAI)
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

    # ------------------------------------------------------------------ data
    @abstractmethod
    def read_site(self, site: SiteConfig, settings: DataSettings, log: ProblemLog) -> SiteContent:
        """The site's split records (errors and warnings go to `log`)."""

    def empty_classes(self, site: SiteConfig, settings: DataSettings) -> list[str]:
        """The classes a site reports when its data could not be read at all."""
        return self.label_targets(site)

    @abstractmethod
    def split_counts(self, classes: Sequence[str], records: Sequence[Mapping[str, Any]]) -> tuple[list[int], int | None]:
        """(per-class counts of a split, samples showing the foreground or None when the task has none)."""

    @abstractmethod
    def training_files(self, data: SiteData) -> list[str]:
        """The files the site trains on, as sorted paths relative to its data_root."""

    @abstractmethod
    def input_channels(self, record: Mapping[str, Any]) -> int:
        """The network's input channels, read off one training record."""

    @abstractmethod
    def check_table(self, report: SiteReport) -> Any:
        """The rich Table `medfl check` prints for one site: per split, the task's counts."""

    @abstractmethod
    def check_classes(self, settings: DataSettings) -> str:
        """What `medfl check` says about the task's classes under these data settings."""

    def check_settings(self, settings: DataSettings) -> list[str]:
        """Further settings `medfl check` states for this task's sites."""
        return []

    def scored_counts(self, records: Sequence[Mapping[str, Any]]) -> str:
        """What `medfl evaluate` scored, for people: "30 images" (metrics per sample by default)."""
        return f"{len(records)} {self.sample_noun}s"

    # ------------------------------------------------------------------ learning (torch)
    def networks(self) -> dict[str, Any]:
        """The networks this task trains, by the name configs use (classes returning (logits, features));
        importing them loads torch and MONAI (medfl.tasks.networks describes them without)."""
        from medfl.tasks.networks import import_network

        return {name: import_network(target) for name, target in self.network_classes.items()}

    @abstractmethod
    def batch_labels(self, batch: Mapping[str, Any], device: torch.device) -> Tensor:
        """A batch's targets as class indices on `device`."""

    @abstractmethod
    def supervised_loss(self, kind: str, class_counts: Tensor, beta: float) -> nn.Module:
        """The loss l of algorithm.md: "cpa" or "ce", module(logits, target, gamma=None) -> scalar."""

    @abstractmethod
    def evaluate(self, model: nn.Module, batches: Any, classes: Sequence[str], device: torch.device,
                 spacing_of: Callable[[str], Sequence[float] | None] | None, distances: bool) -> dict[str, float]:
        """The task's metrics of `model` (eval mode already set) over `batches`."""

    # ------------------------------------------------------------------ reports and exports
    @abstractmethod
    def result_columns(self, classes: Sequence[str], metric: str) -> list[Column]:
        """The test columns of a report's results table, then the last round's selection metric."""

    @abstractmethod
    def logits_shape(self, classes: Sequence[str], size: int) -> list[Any]:
        """The exported program's output shape ("batch" for the free axis)."""

    @abstractmethod
    def preprocessing(self, data: DataSettings, in_channels: int, recipe: Mapping[str, Any]) -> dict[str, Any]:
        """How an input becomes the network's input, in words and numbers (an export's manifest)."""

    def site_inputs(self, site: SiteConfig) -> dict[str, Any]:
        """What an export's manifest records (under `preprocessing`) about how the site names files that are
        not inputs, so that a bundle pointed at a folder of the site's layout can leave them out."""
        return {}

    # ------------------------------------------------------------------ MONAI bundles (medfl.deliver.monai_bundle)
    bundle_packages: dict[str, str]  # pip name -> lowest version the bundle runner needs to read the inputs
    bundle_batch_size: int

    @abstractmethod
    def bundle_program(self, traced: Any, eager: nn.Module, in_channels: int, input_size: int, context_slices: int,
                       generator: torch.Generator) -> tuple[Any, nn.Module, Tensor]:
        """(TorchScript program, the eager module it must equal, a probe input) around the traced logits network."""

    @abstractmethod
    def bundle_inference(self, recipe: Mapping[str, Any], manifest: Mapping[str, Any]) -> dict[str, Any]:
        """The task's part of configs/inference.json: `imports` (beyond glob, os and sys), the inputs
        (`datalist`), `input_report` (an expression run before the evaluator: it says which files of the input
        folder are left out, or stops the run on one that cannot be predicted), preprocessing, dataset,
        postprocessing, handlers."""

    @abstractmethod
    def bundle_data_format(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        """metadata.json's network_data_format: inputs, outputs and post-processed outputs."""

    @abstractmethod
    def bundle_texts(self, manifest: Mapping[str, Any]) -> dict[str, str]:
        """Words for the bundle's metadata and README: what, data_type, io, formats, program."""

    def export_data_settings(self, saved: dict[str, Any], classes: Sequence[str]) -> dict[str, Any]:
        """An export's data settings as `medfl evaluate` reads a site with them."""
        return saved

    predicts_volumes: bool = False  # `medfl predict` takes volumes (one mask each) rather than 2-D images
    # Keys of an export manifest's `preprocessing` that `medfl predict` reads (medfl.manifests requires them).
    manifest_preprocessing_keys: tuple[str, ...] = ()
    confusion_matrices: bool = False  # reports rescore the selected models into confusion matrices
    example_slices: bool = False  # reports draw test slices with truth and prediction
