"""Dermoscopy classification: images in a site folder with a label table, the experiment's class list."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from rich.table import Table

from medfl.data.classification import read_classification_site
from medfl.data.fingerprint import relative_paths
from medfl.data.images import IMAGE_EXTENSIONS
from medfl.report.tables import Column
from medfl.task_facts import ClassificationFacts
from medfl.tasks.base import Task

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

    from medfl.config import DataSettings, SiteConfig
    from medfl.data.problems import ProblemLog
    from medfl.data.records import SiteContent
    from medfl.data.site import SiteData, SiteReport


# The first bytes of a JPEG and of a PNG file (hex): what the bundle checks before PIL reads a header.
IMAGE_SIGNATURES = ("ffd8ff", "89504e470d0a1a0a")


class Classification(ClassificationFacts, Task):
    # ------------------------------------------------------------------ data
    def read_site(self, site: SiteConfig, settings: DataSettings, log: ProblemLog) -> SiteContent:
        return read_classification_site(site, settings, log)

    def split_counts(self, classes: Sequence[str], records: Sequence[Mapping[str, Any]]) -> tuple[list[int], int | None]:
        counter = Counter(r["label"] for r in records)
        return [counter.get(i, 0) for i in range(len(classes))], None

    def training_files(self, data: SiteData) -> list[str]:
        return relative_paths({record["image"] for record in data.splits["train"]}, data)

    def input_channels(self, record: Mapping[str, Any]) -> int:
        return 3  # RGB

    def check_table(self, report: SiteReport) -> Any:
        table = Table(title=f"site '{report.site}' ({report.task})", title_justify="left")
        table.add_column("split")
        for name in report.classes:
            table.add_column(name, justify="right")
        table.add_column("images", justify="right")
        table.add_column("lesions", justify="right")
        for split, counts in report.counts.items():
            table.add_row(split, *map(str, counts), str(report.samples[split]), str(report.groups[split]))
        return table

    # ------------------------------------------------------------------ learning
    def batch_labels(self, batch: Mapping[str, Any], device: torch.device) -> Tensor:
        # start-up: `medfl check` reads sites through the task without loading torch
        import torch

        return torch.as_tensor(batch["label"]).to(device).reshape(-1).long()

    def supervised_loss(self, kind: str, class_counts: Tensor, beta: float) -> nn.Module:
        # start-up: torch and MONAI load when a model trains, not when `medfl check` reads a site
        from medfl.federated.cpa import CPALoss
        from medfl.federated.losses import CrossEntropy

        return CPALoss(class_counts, beta) if kind == "cpa" else CrossEntropy()

    def evaluate(self, model: nn.Module, batches: Any, classes: Sequence[str], device: torch.device,
                 spacing_of: Callable[[str], Sequence[float] | None] | None, distances: bool,
                 originals: Callable[[str], Any] | None = None, whole_cases: bool = True) -> dict[str, float]:
        # start-up: torch and MONAI, as above
        from medfl.federated.evaluation import score_classifier

        return score_classifier(model, batches, classes, device)

    # ------------------------------------------------------------------ reports and exports
    def result_columns(self, classes: Sequence[str], metric: str) -> list[Column]:
        columns = [Column("macro-F1", ("test", "macro_f1"))]
        columns += [Column(f"F1 {name}", ("test", f"f1_{name}")) for name in classes]
        columns += [Column("AUC", ("test", "auc")), Column("accuracy", ("test", "accuracy")),
                    Column("balanced acc.", ("test", "balanced_accuracy"))]
        return columns + [Column("macro-F1 last round", ("test_last_round", metric))]

    def preprocessing(self, data: DataSettings, in_channels: int, recipe: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "kind": "dermoscopy image",
            "input": "an RGB image file (JPEG or PNG), one lesion per image",
            "transforms": recipe["transforms"],
        }

    # ------------------------------------------------------------------ MONAI bundles
    def bundle_program(self, traced: Any, eager: nn.Module, in_channels: int, input_size: int, context_slices: int,
                       generator: torch.Generator) -> tuple[Any, nn.Module, Tensor]:
        # start-up: as in batch_labels
        import torch

        return traced, eager, torch.rand(3, in_channels, input_size, input_size, generator=generator)

    def bundle_inference(self, recipe: Mapping[str, Any], manifest: Mapping[str, Any]) -> dict[str, Any]:
        """Every JPEG or PNG file of the input folder. Before anything is read further, each file's signature
        and PIL's colour mode (from its header) are checked: a file that is not an RGB JPEG or PNG stops the run
        with one line naming it, before the model is loaded or anything is written."""
        # start-up: torch and MONAI, only when exporting
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
        # start-up: torch and MONAI, only when exporting
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
