"""Prostate MRI segmentation: NIfTI or MetaImage volumes with masks, trained and scored slice by slice."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from medfl.tasks.base import Task, TaskKey

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

    from medfl.config import DataSettings, SiteConfig
    from medfl.data.problems import ProblemLog
    from medfl.data.records import SiteContent
    from medfl.data.site import SiteData, SiteReport
    from medfl.report.tables import Column

CLASSES = ("background", "prostate")  # mask value 0, and every value > 0 (zones merged)


class Segmentation(Task):
    key = TaskKey.SEGMENTATION
    modality = "prostate"
    metric = "dice"
    layouts = ("nifti", "metaimage")
    site_fields = ("mask_suffix",)
    default_cpa_tau = 1.0
    sample_noun = "slice"
    example_slices = True
    predicts_volumes = True  # medfl predict: volumes, one mask each, slice by slice

    # ------------------------------------------------------------------ configs
    def classes(self, configured: Sequence[str] | None) -> list[str]:
        return list(CLASSES)

    def label_targets(self, site: SiteConfig) -> list[str]:
        return list(CLASSES)

    # ------------------------------------------------------------------ data
    def read_site(self, site: SiteConfig, settings: DataSettings, log: ProblemLog) -> SiteContent:
        from medfl.data.prostate import read_segmentation_site

        return read_segmentation_site(site, settings, log)

    def split_counts(self, classes: Sequence[str], records: Sequence[Mapping[str, Any]]) -> tuple[list[int], int | None]:
        import numpy as np

        foreground = sum(int(np.count_nonzero(r["label"])) for r in records)
        total = sum(int(r["label"].size) for r in records)
        with_foreground = sum(bool(np.any(r["label"])) for r in records)
        return [total - foreground, foreground], with_foreground

    def training_files(self, data: SiteData) -> list[str]:
        from medfl.data.fingerprint import relative_paths

        return relative_paths({data.geometry[r["case_id"]].image_file for r in data.splits["train"]}, data)

    def input_channels(self, record: Mapping[str, Any]) -> int:
        import numpy as np

        return int(np.asarray(record["image"]).shape[0])  # 1 + 2 x context slices

    def check_table(self, report: SiteReport) -> Any:
        from rich.table import Table

        table = Table(title=f"site '{report.site}' ({report.task})", title_justify="left")
        table.add_column("split")
        for name in ("cases", "slices", "slices with prostate", "prostate pixels"):
            table.add_column(name, justify="right")
        for split, (background, prostate) in report.counts.items():
            share = f"{100 * prostate / (background + prostate):.1f}%" if background + prostate else "-"
            table.add_row(split, str(report.groups[split]), str(report.samples[split]),
                          str(report.foreground_slices[split]), share)
        return table

    def check_classes(self, settings: DataSettings) -> str:
        background, foreground = CLASSES
        return f"{background} (mask value 0), {foreground} (any value > 0)"

    def check_settings(self, settings: DataSettings) -> list[str]:
        return [f"training slices: {settings.slices}"]

    # ------------------------------------------------------------------ learning
    def networks(self) -> dict[str, Any]:
        from medfl.models.segmentation import BasicUNetNet, UNetNet

        return {"unet": UNetNet, "basicunet": BasicUNetNet}

    def batch_labels(self, batch: Mapping[str, Any], device: torch.device) -> Tensor:
        import torch

        from medfl.federated.cpa import foreground_target

        label = torch.as_tensor(batch["label"]).to(device)
        if label.ndim >= 4 and label.shape[1] == 1:
            label = label[:, 0]
        return foreground_target(label)

    def supervised_loss(self, kind: str, class_counts: Tensor, beta: float) -> nn.Module:
        from medfl.federated.cpa import SegmentationCPALoss
        from medfl.federated.losses import CrossEntropyDice

        return SegmentationCPALoss(class_counts, beta) if kind == "cpa" else CrossEntropyDice()

    def evaluate(self, model: nn.Module, batches: Any, classes: Sequence[str], device: torch.device,
                 spacing_of: Callable[[str], Sequence[float] | None] | None, distances: bool) -> dict[str, float]:
        from medfl.federated.evaluation import score_segmenter

        return score_segmenter(model, batches, device, spacing_of, distances)

    # ------------------------------------------------------------------ reports and exports
    def result_columns(self, classes: Sequence[str], metric: str) -> list[Column]:
        from medfl.report.tables import Column

        return [Column("Dice", ("test", "dice")), Column("HD95 (mm)", ("test", "hd95"), 2),
                Column("cases w/o HD95", ("test", "hd95_missing"), 1),
                Column("Dice last round", ("test_last_round", metric))]

    def logits_shape(self, classes: Sequence[str], size: int) -> list[Any]:
        return ["batch", len(classes), size, size]

    def preprocessing(self, data: DataSettings, in_channels: int, recipe: Mapping[str, Any]) -> dict[str, Any]:
        from medfl.data.volumes import INTENSITY_PERCENTILES, WORKING_ORIENTATION

        size = data.input_size
        return {
            "kind": "MRI volume, predicted slice by slice",
            "input": "a 3-D single-channel volume (NIfTI or MetaImage)",
            "orientation": WORKING_ORIENTATION,
            "slices": "axial slices of the volume reoriented to the working orientation, inferior to superior",
            "intensity_percentiles": list(INTENSITY_PERCENTILES),
            "normalisation": "clip to the percentiles, then z-score over the whole volume",
            "in_plane_size": [size, size],
            "in_plane_resize": "bilinear, anti-aliased",
            "context_slices": data.context_slices,
            "channels": in_channels,
            "transforms": recipe["transforms"],
            "inverse": "argmax of the slice logits (upsampled bilinearly to the reoriented in-plane size), "
                       "reoriented back onto the input's voxel grid",
        }
