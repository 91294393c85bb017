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


DEFAULT_MASK_SUFFIX = "_segmentation"  # the multi-site prostate layout's mask suffix

class Segmentation(Task):
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
    manifest_preprocessing_keys = ("context_slices",)

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

    def scored_counts(self, records: Sequence[Mapping[str, Any]]) -> str:
        cases = len({record["case_id"] for record in records})
        return f"{cases} cases, {len(records)} slices; metrics per case"

    # ------------------------------------------------------------------ learning
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

    # ------------------------------------------------------------------ MONAI bundles
    def bundle_program(self, traced: Any, eager: nn.Module, in_channels: int, input_size: int, context_slices: int,
                       generator: torch.Generator) -> tuple[Any, nn.Module, Tensor]:
        """SliceWiseProgram around the network: the slices and their context exist only inside the program."""
        import torch

        from medfl.deliver.monai_bundle import quiet_jit
        from medfl.deliver.programs import SliceWiseProgram

        program = quiet_jit(torch.jit.script, SliceWiseProgram(traced, input_size, context_slices))
        probe = torch.randn(1, 1, 3, input_size + 5, input_size - 3, generator=generator)
        return program, SliceWiseProgram(eager, input_size, context_slices).eval(), probe

    def site_inputs(self, site: SiteConfig) -> dict[str, Any]:
        return {"mask_suffix": site.effective_mask_suffix}

    def bundle_inference(self, recipe: Mapping[str, Any], manifest: Mapping[str, Any]) -> dict[str, Any]:
        """Volumes of one extension; files whose name (before the extension) ends in the site's mask suffix, as
        medfl's reader matches it, are the site's masks and are left out, and the run says so."""
        from medfl.deliver.monai_bundle import volume_transforms

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
            "preprocessing": {"_target_": "Compose", "transforms": volume_transforms(recipe)},
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
        from medfl.data.volumes import INTENSITY_PERCENTILES, WORKING_ORIENTATION
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
