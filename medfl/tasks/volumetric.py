"""3-D prostate MRI segmentation (an experiment's data.dims 3): whole volumes, trained on patches, scored per
case with a sliding window.

The task key stays `segmentation` (site configs, run folders and reports are those of segmentation); the
experiment's data settings choose this variant (`medfl.tasks.task_for(key, experiment)`). What differs from the slice-wise
task: records are one per case and name its files (medfl.data.volumetric), the recipes are
transforms/prostate3d_*.yaml, the network is 3-D, and validation and test volumes are scored whole with MONAI's
sliding-window inference (evaluation.sw_*). Losses, CPA, DET, PFA and the strategies are the same: they see only
the model and batches. Exports, predictions, bundles and reports of 3-D runs are not supported yet: the commands
refuse them (`refuses_volumes`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from rich.table import Table

from medfl.data.volumetric import read_volumetric_site, volume_counts
from medfl.experiment import EVALUATION_DEFAULTS
from medfl.tasks.segmentation import Segmentation

if TYPE_CHECKING:
    import torch
    from torch import nn

    from medfl.config import DataSettings, SiteConfig
    from medfl.data.problems import ProblemLog
    from medfl.data.records import SiteContent
    from medfl.data.site import SiteReport


class VolumetricSegmentation(Segmentation):
    """Segmentation of whole volumes: 3-D network, patches in training, sliding window in evaluation."""

    spatial_dims = 3
    sample_noun = "case"

    def __init__(self, data: DataSettings, evaluation: Any = None):
        if data.dims != 3:
            raise ValueError(f"volumetric segmentation needs data.dims 3, not {data.dims}")
        self.data = data
        chosen = {key: getattr(evaluation, key, None) for key in EVALUATION_DEFAULTS}
        self.sliding_window = {key: EVALUATION_DEFAULTS[key] if value is None else value for key, value in chosen.items()}

    # ------------------------------------------------------------------ data
    def read_site(self, site: SiteConfig, settings: DataSettings, log: ProblemLog) -> SiteContent:
        return read_volumetric_site(site, settings, log)

    def split_counts(self, classes: Sequence[str], records: Sequence[Mapping[str, Any]]) -> tuple[list[int], int | None]:
        return volume_counts(records)

    def input_channels(self, record: Mapping[str, Any]) -> int:
        return 1  # one MRI volume; no context slices in 3-D

    def check_table(self, report: SiteReport) -> Any:
        table = Table(title=f"site '{report.site}' ({report.task}, 3-D)", title_justify="left")
        table.add_column("split")
        for name in ("cases", "cases with prostate", "prostate voxels"):
            table.add_column(name, justify="right")
        for split, (background, prostate) in report.counts.items():
            share = f"{100 * prostate / (background + prostate):.1f}%" if background + prostate else "-"
            table.add_row(split, str(report.groups[split]), str(report.foreground_slices.get(split, 0)), share)
        return table

    # ------------------------------------------------------------------ what a site builds
    def recipe_variables(self, data: DataSettings) -> dict[str, Any]:
        ratio = float(data.foreground_ratio)
        return {"spacing": list(data.spacing), "patch_size": list(data.patch_size),
                "patches_per_volume": data.patches_per_volume, "pos": ratio, "neg": 1.0 - ratio}

    def network_input_size(self, data: DataSettings) -> tuple[int, ...]:
        return tuple(data.patch_size)

    def eval_batch_size(self, batch_size: int) -> int:
        return 1  # whole volumes of different shapes

    def case_spacing(self, geometry: Any, data: DataSettings) -> tuple[float, float, float]:
        return tuple(float(s) for s in data.spacing)  # scored at the resampled grid, (x, y, z)

    # ------------------------------------------------------------------ learning
    def evaluate(self, model: nn.Module, batches: Any, classes: Sequence[str], device: torch.device,
                 spacing_of: Callable[[str], Sequence[float] | None] | None, distances: bool) -> dict[str, float]:
        # start-up: torch and MONAI, as in the slice-wise task
        from medfl.federated.evaluation import score_volumes

        window = self.sliding_window
        return score_volumes(model, batches, device, spacing_of, distances, self.data.patch_size,
                             window["sw_overlap"], window["sw_mode"], window["sw_batch_size"])
