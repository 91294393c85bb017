"""The contract of a task's behaviour: every question whose answer needs the layers below the tasks."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from medfl.task_facts import TaskFacts

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

    from medfl.config import DataSettings, SiteConfig
    from medfl.data.problems import ProblemLog
    from medfl.data.records import SiteContent
    from medfl.data.site import SiteData, SiteReport
    from medfl.report.tables import Column


class Task(TaskFacts, ABC):
    """One task: its facts (medfl.task_facts) and its behaviour, which composes the layers below.

    Code below this layer never looks a task up by its key: the entry points (medfl.commands, medfl.nvflare)
    call `task_for` and hand the Task (or the part needed: a reader, a loss, a scorer) down as an argument.
    """

    spatial_dims: int = 2  # the network's spatial dimensions; an experiment's data.dims must match (task_for)

    # ------------------------------------------------------------------ what a site builds (2-D defaults)
    def recipe_variables(self, data: DataSettings) -> dict[str, Any]:
        """The variables the task's recipes are loaded with."""
        return {"input_size": data.input_size}

    def network_input_size(self, data: DataSettings) -> tuple[int, ...]:
        """The spatial size of the network's training inputs (checked before training)."""
        return (data.input_size, data.input_size)

    def eval_batch_size(self, batch_size: int) -> int:
        """Samples per evaluation batch, given the experiment's training batch size."""
        return max(batch_size, 32)

    def experiment_check(self, experiment: Any, sites: Sequence[SiteData]) -> list[str]:
        """Lines `medfl check --experiment` prints after the sites: what the experiment as a whole needs of them
        (none for 2-D tasks)."""
        return []

    def memory_refusal(self, experiment: Any, device: torch.device | None = None) -> str | None:
        """Why the experiment's training cannot fit into the memory `device` (default: the experiment's) has
        available, with the numbers and what to change; None when it fits or the task makes no estimate (2-D)."""
        return None

    def case_spacing(self, geometry: Any, data: DataSettings) -> tuple[float, float, float]:
        """The voxel spacing (mm) of a scored volume of a case (segmentation's HD95), from its geometry."""
        return geometry.slice_volume_spacing(data.input_size)

    # ------------------------------------------------------------------ data
    @abstractmethod
    def read_site(self, site: SiteConfig, settings: DataSettings, log: ProblemLog) -> SiteContent:
        """The site's split records (errors and warnings go to `log`)."""

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

    # ------------------------------------------------------------------ learning (torch)
    @abstractmethod
    def batch_labels(self, batch: Mapping[str, Any], device: torch.device) -> Tensor:
        """A batch's targets as class indices on `device`."""

    @abstractmethod
    def supervised_loss(self, kind: str, class_counts: Tensor, beta: float) -> nn.Module:
        """The loss l of algorithm.md: "cpa" or "ce", module(logits, target, gamma=None) -> scalar."""

    @abstractmethod
    def evaluate(self, model: nn.Module, batches: Any, classes: Sequence[str], device: torch.device,
                 spacing_of: Callable[[str], Sequence[float] | None] | None, distances: bool,
                 originals: Callable[[str], Any] | None = None, whole_cases: bool = True) -> dict[str, float]:
        """The task's metrics of `model` (eval mode already set) over `batches`; with `originals` (case id ->
        `original_case`), segmentation adds the scores on each case's own voxel grid. `whole_cases=False`: the
        batches may hold a selection of each case's slices (the training split), scored as they are."""

    def original_case(self, data: SiteData, case_id: str) -> Any | None:
        """What scoring a case on its own voxel grid compares with (segmentation: its original mask), or None
        (every task without such scores)."""
        return None

    # ------------------------------------------------------------------ reports and exports
    def predict_labels(self, model: nn.Module, images: Tensor) -> Tensor:
        """`model`'s class index per input (or per pixel or voxel) of a batch, as scoring predicts it; torch and
        MONAI only (a report redraws examples with it)."""
        return model(images)[0].argmax(dim=1)

    @abstractmethod
    def result_columns(self, classes: Sequence[str], metric: str) -> list[Column]:
        """The test columns of a report's results table, then the last round's selection metric."""

    @abstractmethod
    def preprocessing(self, data: DataSettings, in_channels: int, recipe: Mapping[str, Any]) -> dict[str, Any]:
        """How an input becomes the network's input, in words and numbers (an export's manifest)."""

    # ------------------------------------------------------------------ MONAI bundles (medfl.deliver.monai_bundle)
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
