"""3-D prostate MRI segmentation (an experiment's data.dims 3): whole volumes, trained on patches, scored per
case with a sliding window.

The task key stays `segmentation` (site configs, run folders and reports are those of segmentation); the
experiment's data settings choose this variant (`medfl.tasks.task_for(key, experiment)`). What differs from the slice-wise
task: records are one per case and name its files (medfl.data.volumetric), the recipes are
transforms/prostate3d_*.yaml, the network is 3-D, and validation and test volumes are scored whole with MONAI's
sliding-window inference (evaluation.sw_*). Losses, CPA, DET, PFA and the strategies are the same: they see only
the model and batches. Exports, predictions, evaluations and MONAI bundles of 3-D runs run the same recipe and
sliding window (medfl.deliver.volumes3d); NVFlare sites build this task from the job's experiment, and reports
draw three planes through each example case (medfl.report.predictions.choose_volume_examples).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from rich.table import Table

from medfl.data.volumes import INTENSITY_PERCENTILES
from medfl.data.volumetric import VOLUME_ORIENTATION, read_volumetric_site, volume_counts
from medfl.experiment import EVALUATION_DEFAULTS
from medfl.tasks.segmentation import Segmentation

if TYPE_CHECKING:
    import torch
    from torch import nn

    from medfl.config import DataSettings, SiteConfig
    from medfl.data.problems import ProblemLog
    from medfl.data.records import SiteContent
    from medfl.data.site import SiteData, SiteReport
    from medfl.experiment import ExperimentConfig


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

    def experiment_check(self, experiment: ExperimentConfig, sites: Sequence[SiteData]) -> list[str]:
        """The target spacing and patch; per site, its smallest volume once resampled against the patch (a volume
        smaller than the patch along an axis is padded with zeros to it, in training as in the sliding window:
        the line says along which axis and by how many voxels); one training batch's memory, estimated on the
        meta device."""
        data, window = experiment.data, self.sliding_window
        patch = tuple(data.patch_size)
        lines = [f"3-D: volumes resampled to {_shape(data.spacing, 'mm')} (x, y, z in RAS); training patches of "
                 f"{_shape(patch, 'voxels')}, {data.patches_per_volume} per volume, {data.foreground_ratio:g} of them "
                 f"centred on prostate; scored whole with a sliding window (overlap {window['sw_overlap']:g}, "
                 f"{window['sw_mode']} blending, {window['sw_batch_size']} windows at once)"]
        for site in sites:
            records = [record for split in site.splits.values() for record in split]
            if not records:
                continue
            smallest = min(records, key=lambda record: (math.prod(record["shape"]), record["case_id"]))
            shape = tuple(smallest["shape"])
            short = [f"{axis} by {edge - size}" for axis, size, edge in zip("xyz", shape, patch, strict=True)
                     if size < edge]
            smaller = sum(any(s < e for s, e in zip(r["shape"], patch, strict=True)) for r in records)
            verdict = (f"smaller than the patch along {', '.join(short)} voxel(s): {smaller} of its {len(records)} "
                       "volume(s) are padded with zeros to the patch" if short else "the patch fits in every volume")
            lines.append(f"site '{site.name}': smallest volume '{smallest['case_id']}' resampled to "
                         f"{_shape(shape, 'voxels')} against the patch {_shape(patch, 'voxels')}: {verdict}")
        estimate = training_batch_memory(experiment, self)
        lines.append(f"memory of one training batch (estimated on the meta device, nothing allocated): about "
                     f"{estimate['total'] / 2**20:.1f} MiB for {estimate['patches']} patches of "
                     f"{_shape(patch, 'voxels')}: {estimate['models']} model(s) x ({estimate['activations'] / 2**20:.1f} "
                     f"MiB of activations kept for backward + {estimate['weights'] / 2**20:.1f} MiB of parameters, "
                     "gradients and optimizer state)")
        return lines

    def memory_refusal(self, experiment: ExperimentConfig, device: torch.device | None = None) -> str | None:
        """One training batch's estimated memory (`training_batch_memory`) against what the device has available:
        a CUDA GPU's free memory, the CPU's available RAM. The run is refused before it starts rather than failing
        out of memory in its first step."""
        # start-up: torch loads for the estimate, as in experiment_check
        from medfl.devices import available_memory_bytes, resolve_device

        device = device if device is not None else resolve_device(experiment.device)
        available = available_memory_bytes(device)
        if available is None:
            return None
        estimate = training_batch_memory(experiment, self)
        if estimate["total"] <= available:
            return None
        data = experiment.data
        where = f"free on the GPU ({device})" if device.type == "cuda" else "available in RAM"
        return (f"3-D training cannot fit in memory: one training batch needs about {_bytes(estimate['total'])} "
                f"({estimate['models']} model(s), {estimate['patches']} patch(es) of "
                f"{_shape(data.patch_size, 'voxels')}: batch_size {experiment.batch_size} x patches_per_volume "
                f"{data.patches_per_volume}), and only {_bytes(available)} is {where}; use a smaller data.patch_size, "
                "batch_size or data.patches_per_volume (or a smaller model)")

    # ------------------------------------------------------------------ learning
    def evaluate(self, model: nn.Module, batches: Any, classes: Sequence[str], device: torch.device,
                 spacing_of: Callable[[str], Sequence[float] | None] | None, distances: bool,
                 originals: Callable[[str], Any] | None = None, whole_cases: bool = True) -> dict[str, float]:
        # start-up: torch and MONAI, as in the slice-wise task
        from medfl.federated.evaluation import score_volumes

        window = self.sliding_window
        return score_volumes(model, batches, device, spacing_of, distances, self.data.patch_size,
                             window["sw_overlap"], window["sw_mode"], window["sw_batch_size"], originals,
                             self.data.spacing)

    def original_case(self, data: SiteData, case_id: str) -> Any | None:
        """The case's mask file (its record's label), read again when the case is scored on its own grid."""
        for split in ("test", "val", "train"):
            for record in data.splits.get(split, []):
                if record["case_id"] == case_id:
                    return record["label"]
        return None


    def predict_labels(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Whole volumes through the sliding window that scoring uses, then argmax."""
        # start-up: torch and MONAI, as in evaluate
        from medfl.federated.evaluation import sliding_window_logits

        window = self.sliding_window
        return sliding_window_logits(model, images, self.data.patch_size, window["sw_overlap"], window["sw_mode"],
                                     window["sw_batch_size"]).argmax(dim=1)

    # ------------------------------------------------------------------ exports and MONAI bundles
    def logits_shape(self, classes: Sequence[str], size: int) -> list[Any]:
        return ["batch", len(classes), *self.data.patch_size]

    def preprocessing(self, data: DataSettings, in_channels: int, recipe: Mapping[str, Any]) -> dict[str, Any]:
        """What 3-D inference needs (medfl.deliver.volumes3d reads it): the spacing, the patch, the sliding window
        and the run's resolved evaluation recipe."""
        low, high = INTENSITY_PERCENTILES
        return {
            "kind": "MRI volume, predicted whole with a sliding window (3-D)",
            "input": "a 3-D single-channel volume (NIfTI or MetaImage)",
            "dims": 3,
            "orientation": VOLUME_ORIENTATION,
            "spacing": list(data.spacing),
            "patch_size": list(data.patch_size),
            "sliding_window": dict(self.sliding_window),
            "intensity_percentiles": [low, high],
            "normalisation": "clip to the percentiles, then z-score over the whole volume (before resampling)",
            "context_slices": 0,
            "channels": in_channels,
            "transforms": recipe["transforms"],
            "inverse": "argmax of the sliding-window logits, then MONAI's Invertd (nearest): the resampling and the "
                       "reorientation undone, onto the input's voxel grid",
        }

    def bundle_program(self, traced: Any, eager: nn.Module, in_channels: int, input_size: int, context_slices: int,
                       generator: torch.Generator) -> tuple[Any, nn.Module, Any]:
        """The traced network itself: MONAI's SlidingWindowInferer feeds it patches."""
        import torch

        probe = torch.randn(3, in_channels, *self.data.patch_size, generator=generator)
        return traced, eager, probe

    def bundle_inference(self, recipe: Mapping[str, Any], manifest: Mapping[str, Any]) -> dict[str, Any]:
        """The run's evaluation recipe on the image (medfl.deliver.volumes3d), MONAI's SlidingWindowInferer with the
        run's settings, and the slice-wise task's input listing, argmax, Invertd and SaveImaged."""
        # only when exporting a bundle
        from medfl.deliver.volumes3d import inference_steps, sliding_window

        part = self.volume_inference(inference_steps(recipe), manifest)
        part["inferer"] = {"_target_": "SlidingWindowInferer", **sliding_window(manifest["preprocessing"])}
        return part

    def bundle_data_format(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        # start-up: torch and MONAI, only when exporting
        from medfl.deliver.monai_bundle import tensor_format

        classes = {str(i): name for i, name in enumerate(manifest["classes"])}
        low, high = INTENSITY_PERCENTILES
        patch = list(self.data.patch_size)
        volume = {"0": f"MRI patch in {VOLUME_ORIENTATION} orientation (x, y, z) at "
                       f"{_shape(self.data.spacing, 'mm')}, clipped to its {low:g}-{high:g} percentiles and z-scored"}
        return {
            "inputs": {"image": {**tensor_format("image", "magnitude", "MR", 1, patch, "float32", [], volume),
                                 "is_patch_data": True}},
            "outputs": {"pred": {**tensor_format("image", "labels", "MR", len(classes), patch, "float32", [], classes),
                                 "is_patch_data": True}},
            "post_processed_outputs": {
                "pred": tensor_format("image", "segmentation", "MR", 1, ["*", "*", "*"], "uint8",
                                      [0, len(classes) - 1], classes)},
        }

    def bundle_texts(self, manifest: Mapping[str, Any]) -> dict[str, str]:
        texts = super().bundle_texts(manifest)
        window = manifest["preprocessing"]["sliding_window"]
        return {
            **texts,
            "what": "prostate segmentation of T2-weighted MRI volumes, whole volumes with a sliding window (3-D)",
            "program": (f"MONAI's SlidingWindowInferer runs models/model.ts on windows of "
                        f"{_shape(self.data.patch_size, 'voxels')} (overlap {window['sw_overlap']:g}, "
                        f"{window['sw_mode']} blending, {window['sw_batch_size']} windows at once); then argmax, and "
                        "Invertd undoes the resampling and the reorientation, so the mask lies on the input's grid"),
        }


def _shape(values: Sequence[float], unit: str) -> str:
    return " x ".join(f"{value:g}" for value in values) + f" {unit}"


def _bytes(count: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count / 2**10:.1f} KiB"


def training_batch_memory(experiment: ExperimentConfig, task: VolumetricSegmentation) -> dict[str, int]:
    """Bytes one training step of the experiment needs, from the network built on PyTorch's meta device (shapes
    only, no memory): per model, the activations autograd keeps for backward at batch_size x patches_per_volume
    patches, and parameters, gradients and optimizer state (Adam: two moments; SGD with momentum: one); times the
    models the method trains."""
    # start-up: torch and the networks load only for this estimate
    import torch

    from medfl.models import build_model

    data, model = experiment.data, experiment.model
    with torch.device("meta"):
        network = build_model(model.name, task.key, num_classes=len(experiment.classes), in_channels=1,
                              width=model.width, spatial_dims=task.spatial_dims, **model.options)
        patches = experiment.batch_size * data.patches_per_volume
        inputs = torch.empty(patches, 1, *data.patch_size)
    saved: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        saved[id(tensor)] = tensor.untyped_storage().nbytes()  # meta tensors have no address: one entry per tensor
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        logits, _ = network(inputs)
    activations = sum(saved.values()) + logits.numel() * logits.element_size()
    states = 2 if experiment.optimizer.name == "adam" else 1 if experiment.optimizer.momentum else 0
    weights = sum(p.numel() * p.element_size() for p in network.parameters()) * (2 + states)
    models = len(experiment.spec.roles)
    return {"total": models * (activations + weights), "activations": activations, "weights": weights,
            "models": models, "patches": patches}
