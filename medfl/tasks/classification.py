"""Dermoscopy classification: images in a site folder with a label table, the experiment's class list."""

from __future__ import annotations

from collections import Counter
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


# The first bytes of a JPEG and of a PNG file (hex): what the bundle checks before PIL reads a header.
IMAGE_SIGNATURES = ("ffd8ff", "89504e470d0a1a0a")


class Classification(Task):
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

    # ------------------------------------------------------------------ configs
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

    # ------------------------------------------------------------------ data
    def read_site(self, site: SiteConfig, settings: DataSettings, log: ProblemLog) -> SiteContent:
        from medfl.data.classification import read_classification_site

        return read_classification_site(site, settings, log)

    def empty_classes(self, site: SiteConfig, settings: DataSettings) -> list[str]:
        return list(settings.classes) if settings.classes else self.label_targets(site)

    def split_counts(self, classes: Sequence[str], records: Sequence[Mapping[str, Any]]) -> tuple[list[int], int | None]:
        counter = Counter(r["label"] for r in records)
        return [counter.get(i, 0) for i in range(len(classes))], None

    def training_files(self, data: SiteData) -> list[str]:
        from medfl.data.fingerprint import relative_paths

        return relative_paths({record["image"] for record in data.splits["train"]}, data)

    def input_channels(self, record: Mapping[str, Any]) -> int:
        return 3  # RGB

    def check_table(self, report: SiteReport) -> Any:
        from rich.table import Table

        table = Table(title=f"site '{report.site}' ({report.task})", title_justify="left")
        table.add_column("split")
        for name in report.classes:
            table.add_column(name, justify="right")
        table.add_column("images", justify="right")
        table.add_column("lesions", justify="right")
        for split, counts in report.counts.items():
            table.add_row(split, *map(str, counts), str(report.samples[split]), str(report.groups[split]))
        return table

    def check_classes(self, settings: DataSettings) -> str:
        return ", ".join(settings.classes) if settings.classes else "each site's label-map targets"

    # ------------------------------------------------------------------ learning
    def batch_labels(self, batch: Mapping[str, Any], device: torch.device) -> Tensor:
        import torch

        return torch.as_tensor(batch["label"]).to(device).reshape(-1).long()

    def supervised_loss(self, kind: str, class_counts: Tensor, beta: float) -> nn.Module:
        from medfl.federated.cpa import CPALoss
        from medfl.federated.losses import CrossEntropy

        return CPALoss(class_counts, beta) if kind == "cpa" else CrossEntropy()

    def evaluate(self, model: nn.Module, batches: Any, classes: Sequence[str], device: torch.device,
                 spacing_of: Callable[[str], Sequence[float] | None] | None, distances: bool) -> dict[str, float]:
        from medfl.federated.evaluation import score_classifier

        return score_classifier(model, batches, classes, device)

    # ------------------------------------------------------------------ reports and exports
    def result_columns(self, classes: Sequence[str], metric: str) -> list[Column]:
        from medfl.report.tables import Column

        columns = [Column("macro-F1", ("test", "macro_f1"))]
        columns += [Column(f"F1 {name}", ("test", f"f1_{name}")) for name in classes]
        columns += [Column("AUC", ("test", "auc")), Column("accuracy", ("test", "accuracy")),
                    Column("balanced acc.", ("test", "balanced_accuracy"))]
        return columns + [Column("macro-F1 last round", ("test_last_round", metric))]

    def logits_shape(self, classes: Sequence[str], size: int) -> list[Any]:
        return ["batch", len(classes)]

    def preprocessing(self, data: DataSettings, in_channels: int, recipe: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "kind": "dermoscopy image",
            "input": "an RGB image file (JPEG or PNG), one lesion per image",
            "transforms": recipe["transforms"],
        }

    def export_data_settings(self, saved: dict[str, Any], classes: Sequence[str]) -> dict[str, Any]:
        return {**saved, "classes": list(classes)}

    # ------------------------------------------------------------------ MONAI bundles
    def bundle_program(self, traced: Any, eager: nn.Module, in_channels: int, input_size: int, context_slices: int,
                       generator: torch.Generator) -> tuple[Any, nn.Module, Tensor]:
        import torch

        return traced, eager, torch.rand(3, in_channels, input_size, input_size, generator=generator)

    def bundle_inference(self, recipe: Mapping[str, Any], manifest: Mapping[str, Any]) -> dict[str, Any]:
        """Every JPEG or PNG file of the input folder. Before anything is read further, each file's signature
        and PIL's colour mode (from its header) are checked: a file that is not an RGB JPEG or PNG stops the run
        with one line naming it, before the model is loaded or anything is written."""
        from medfl.data.images import IMAGE_EXTENSIONS
        from medfl.deliver.monai_bundle import image_transforms

        extensions = sorted({e for extension in IMAGE_EXTENSIONS for e in (extension, extension.upper())})
        return {
            "imports": ["$from PIL import Image"],
            "input_exts": extensions,
            "datalist": "$sorted({path for ext in @input_exts "
                        "for path in glob.glob(os.path.join(glob.escape(@input_dir), '*' + ext))})",
            "image_signatures": list(IMAGE_SIGNATURES),
            "input_problem": "$lambda path: 'not a JPEG or PNG file' if not open(path, 'rb').read(8).hex()"
                             ".startswith(tuple(@image_signatures)) else None if Image.open(path).mode == 'RGB' "
                             "else 'image mode is ' + Image.open(path).mode + ', but the model takes RGB colour "
                             "images'",
            "input_problems": "$[path + ': ' + problem for path, problem in ((path, @input_problem(path)) "
                              "for path in @datalist) if problem]",
            "input_report": "$sys.exit(@input_problems[0] + ' (' + str(len(@input_problems)) + ' of the ' + "
                            "str(len(@datalist)) + ' files cannot be predicted); nothing was predicted: the input "
                            "folder must hold RGB JPEG or PNG images only') if @input_problems else None",
            "preprocessing": {"_target_": "Compose", "transforms": image_transforms(recipe)},
            "dataset": {"_target_": "Dataset", "data": "$[{'image': path, 'filename_or_obj': path} for path in @datalist]",
                        "transform": "@preprocessing"},
            "postprocessing": {"_target_": "Compose", "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "softmax": True}]},
            "handlers": [{"_target_": "ClassificationSaver", "output_dir": "@output_dir", "filename": "predictions.csv",
                          "output_transform": {"_target_": "from_engine", "keys": ["pred"]}}],
        }

    def bundle_data_format(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        from medfl.deliver.monai_bundle import tensor_format

        classes = {str(i): name for i, name in enumerate(manifest["classes"])}
        channels, size = manifest["input"]["channels"], manifest["input"]["size"]
        rgb = {"0": "red", "1": "green", "2": "blue"} if channels == 3 else {str(i): f"channel {i}" for i in range(channels)}
        return {
            "inputs": {"image": tensor_format("image", "magnitude", "dermoscopy", channels, list(size), "float32", [],
                                              rgb)},
            "outputs": {"pred": tensor_format("probabilities", "classes", "n/a", len(classes), [], "float32", [],
                                              classes)},
            "post_processed_outputs": {
                "pred": tensor_format("probabilities", "classes", "n/a", len(classes), [], "float32", [0, 1], classes)},
        }

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
