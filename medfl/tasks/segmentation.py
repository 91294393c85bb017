"""Prostate MRI segmentation: NIfTI or MetaImage volumes with masks, trained and scored slice by slice."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.table import Table

from medfl.data.fingerprint import relative_paths
from medfl.data.prostate import read_segmentation_site
from medfl.data.volumes import INTENSITY_PERCENTILES, WORKING_ORIENTATION
from medfl.report.tables import Column
from medfl.task_facts import DEFAULT_MASK_SUFFIX, SegmentationFacts
from medfl.tasks.base import Task

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

    from medfl.config import DataSettings, SiteConfig
    from medfl.data.problems import ProblemLog
    from medfl.data.records import SiteContent
    from medfl.data.site import SiteData, SiteReport


class Segmentation(SegmentationFacts, Task):
    # ------------------------------------------------------------------ data
    def read_site(self, site: SiteConfig, settings: DataSettings, log: ProblemLog) -> SiteContent:
        return read_segmentation_site(site, settings, log)

    def split_counts(self, classes: Sequence[str], records: Sequence[Mapping[str, Any]]) -> tuple[list[int], int | None]:
        foreground = sum(int(np.count_nonzero(r["label"])) for r in records)
        total = sum(int(r["label"].size) for r in records)
        with_foreground = sum(bool(np.any(r["label"])) for r in records)
        return [total - foreground, foreground], with_foreground

    def training_files(self, data: SiteData) -> list[str]:
        return relative_paths({data.geometry[r["case_id"]].image_file for r in data.splits["train"]}, data)

    def input_channels(self, record: Mapping[str, Any]) -> int:
        return int(np.asarray(record["image"]).shape[0])  # 1 + 2 x context slices

    def check_table(self, report: SiteReport) -> Any:
        table = Table(title=f"site '{report.site}' ({report.task})", title_justify="left")
        table.add_column("split")
        for name in ("cases", "slices", "slices with prostate", "prostate pixels"):
            table.add_column(name, justify="right")
        for split, (background, prostate) in report.counts.items():
            share = f"{100 * prostate / (background + prostate):.1f}%" if background + prostate else "-"
            table.add_row(split, str(report.groups[split]), str(report.samples[split]),
                          str(report.foreground_slices[split]), share)
        return table

    # ------------------------------------------------------------------ learning
    def batch_labels(self, batch: Mapping[str, Any], device: torch.device) -> Tensor:
        # start-up: torch and MONAI load when a model trains, not when `medfl check` reads a site
        import torch

        from medfl.federated.cpa import foreground_target

        label = torch.as_tensor(batch["label"]).to(device)
        if label.ndim >= 4 and label.shape[1] == 1:
            label = label[:, 0]
        return foreground_target(label)

    def supervised_loss(self, kind: str, class_counts: Tensor, beta: float) -> nn.Module:
        # start-up: torch and MONAI, as in batch_labels
        from medfl.federated.cpa import SegmentationCPALoss
        from medfl.federated.losses import CrossEntropyDice

        return SegmentationCPALoss(class_counts, beta) if kind == "cpa" else CrossEntropyDice()

    def evaluate(self, model: nn.Module, batches: Any, classes: Sequence[str], device: torch.device,
                 spacing_of: Callable[[str], Sequence[float] | None] | None, distances: bool,
                 originals: Callable[[str], Any] | None = None, whole_cases: bool = True) -> dict[str, float]:
        # start-up: torch and MONAI, as above
        from medfl.federated.evaluation import score_segmenter

        return score_segmenter(model, batches, device, spacing_of, distances, originals, whole_cases)

    def original_case(self, data: SiteData, case_id: str) -> Any | None:
        """The case's mask on its own grid (`OriginalMask`, kept by the reader for val and test cases), or None."""
        return data.original_masks.get(case_id)

    # ------------------------------------------------------------------ reports and exports
    def result_columns(self, classes: Sequence[str], metric: str) -> list[Column]:
        return [Column("Dice", ("test", "dice")), Column("HD95 (mm)", ("test", "hd95"), 2),
                Column("cases w/o HD95", ("test", "hd95_missing"), 1),
                Column("Dice last round", ("test_last_round", metric))]

    def preprocessing(self, data: DataSettings, in_channels: int, recipe: Mapping[str, Any]) -> dict[str, Any]:
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

    # ------------------------------------------------------------------ MONAI bundles
    def bundle_program(self, traced: Any, eager: nn.Module, in_channels: int, input_size: int, context_slices: int,
                       generator: torch.Generator) -> tuple[Any, nn.Module, Tensor]:
        """SliceWiseProgram around the network: the slices and their context exist only inside the program."""
        # start-up: torch and MONAI load only when exporting
        import torch

        from medfl.deliver.monai_bundle import quiet_jit
        from medfl.deliver.programs import SliceWiseProgram

        program = quiet_jit(torch.jit.script, SliceWiseProgram(traced, input_size, context_slices))
        probe = torch.randn(1, 1, 3, input_size + 5, input_size - 3, generator=generator)
        return program, SliceWiseProgram(eager, input_size, context_slices).eval(), probe

    def bundle_inference(self, recipe: Mapping[str, Any], manifest: Mapping[str, Any]) -> dict[str, Any]:
        """Volumes of one extension; files whose name (before the extension) ends in the site's mask suffix, as
        medfl's reader matches it, are the site's masks and are left out, and the run says so."""
        # start-up: torch and MONAI, only when exporting
        from medfl.deliver.monai_bundle import volume_transforms

        return self.volume_inference(volume_transforms(recipe), manifest)

    def volume_inference(self, preprocessing: list[dict[str, Any]], manifest: Mapping[str, Any]) -> dict[str, Any]:
        """The bundle's part for MRI volumes around the `preprocessing` components: the input folder's volumes of
        one extension without the site's masks, argmax, Invertd back to the input's grid, SaveImaged."""
        return {
            "imports": [],
            "input_ext": ".nii.gz",
            # exports of runs from before sites recorded their suffix: medfl's default one
            "mask_suffix": manifest["preprocessing"].get("mask_suffix", DEFAULT_MASK_SUFFIX),
            "input_files": "$sorted(glob.glob(os.path.join(glob.escape(@input_dir), '*' + @input_ext)))",
            "left_out": "$[path for path in @input_files if os.path.basename(path)[:-len(@input_ext)].lower()"
                        ".endswith(@mask_suffix.lower()) and len(os.path.basename(path)) > len(@input_ext) + "
                        "len(@mask_suffix)]",
            "datalist": "$[path for path in @input_files if path not in @left_out]",
            "input_report": "$print('Left out ' + str(len(@left_out)) + ' file(s) whose name ends in the mask "
                            "suffix ' + repr(@mask_suffix) + ' (masks, not volumes; --mask_suffix sets another): ' "
                            "+ ', '.join(os.path.basename(path) for path in @left_out)) if @left_out else None",
            "preprocessing": {"_target_": "Compose", "transforms": preprocessing},
            "dataset": {"_target_": "Dataset", "data": "$[{'image': path} for path in @datalist]",
                        "transform": "@preprocessing"},
            "postprocessing": {"_target_": "Compose", "transforms": [
                {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
                {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
                 "nearest_interp": True},
                {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "mask",
                 "output_ext": "@input_ext", "output_dtype": "uint8", "resample": False, "separate_folder": False,
                 "print_log": False},
            ]},
            "handlers": [],
        }

    def bundle_data_format(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        # start-up: torch and MONAI, only when exporting
        from medfl.deliver.monai_bundle import tensor_format

        classes = {str(i): name for i, name in enumerate(manifest["classes"])}
        low, high = INTENSITY_PERCENTILES
        volume = {"0": f"MRI volume in {WORKING_ORIENTATION} orientation as (slices inferior to superior, rows, "
                       f"columns), clipped to its {low:g}-{high:g} percentiles and z-scored"}
        return {
            "inputs": {"image": tensor_format("image", "magnitude", "MR", 1, ["*", "*", "*"], "float32", [], volume)},
            "outputs": {"pred": tensor_format("image", "labels", "MR", len(classes), ["*", "*", "*"], "float32", [],
                                              classes)},
            "post_processed_outputs": {
                "pred": tensor_format("image", "segmentation", "MR", 1, ["*", "*", "*"], "uint8",
                                      [0, len(classes) - 1], classes)},
        }
