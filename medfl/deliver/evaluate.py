"""`medfl evaluate`: score an exported model on a site's labelled data with the run's own metrics.

The site (its own or any other with the same task) is read with the run's data settings from the manifest,
so the splits of a site that took part are the ones the run used: `--split test` is its held-out data.
Inputs go through the export's evaluation recipe and `medfl.federated.evaluation.evaluate_model`, the
function the run scored with; a site that did not take part can be scored on all its data (`all`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medfl.config import DataSettings, load_site_config, validate_model
from medfl.deliver.bundle import MANIFEST, WEIGHTS, ExportedModel
from medfl.errors import ConfigError, DataError
from medfl.tasks import task_for

SPLIT_CHOICES = ("train", "val", "test", "all")


def _settings(export: ExportedModel) -> DataSettings:
    """The run's data settings with the export's own recipe; every slice kept, so volumes reassemble whole."""
    saved = dict(export.manifest["data_settings"])
    saved.update(eval_recipe=str(export.recipe_path), slices="all")
    settings = task_for(export.task).export_data_settings(saved, export.classes)
    return validate_model(DataSettings, settings, export.folder / MANIFEST)


def evaluate_export(export: ExportedModel, site_config: str | Path, split: str = "test") -> dict[str, Any]:
    """Metrics of the exported model on one split (or `all`) of a site, with what was scored on what."""
    from monai.data import DataLoader

    from medfl.data import build_dataset, load_recipe, load_site
    from medfl.federated.evaluation import evaluate_model

    if split not in SPLIT_CHOICES:
        raise ConfigError(f"--split must be one of {', '.join(SPLIT_CHOICES)}, not '{split}'")
    site = load_site_config(site_config)
    if site.task != export.task:
        raise ConfigError(f"{site.describe()}: a {site.task} site cannot score the {export.task} model of "
                          f"{export.describe()}")
    settings = _settings(export)
    data = load_site(site, settings)
    records = [r for name in ("train", "val", "test") if split in (name, "all") for r in data.splits[name]]
    if not records:
        raise DataError(f"the {split} split is empty", site=site.name, path=str(site.source_path))
    # Cached whole, as in the run: evaluate_model runs the loader without MetaTensors, which the recipe's
    # head (channel-first detection) needs, so the head must run when the cache is filled.
    dataset = build_dataset(records, load_recipe(export.recipe_path), cache_rate=1.0)
    loader = DataLoader(dataset, batch_size=32, shuffle=False, num_workers=0)

    def spacing_of(case_id: str) -> tuple[float, float, float] | None:
        geometry = data.geometry.get(case_id)
        return geometry.slice_volume_spacing(settings.input_size) if geometry else None

    metrics = evaluate_model(export.network, loader, export.task, export.classes, export.device, spacing_of)
    return {
        "export": {"site": export.site, "folder": str(export.folder.resolve()), "model": export.manifest["model"],
                   "round": export.manifest["round"]["selected"], "weights_sha256": export.manifest["files"][WEIGHTS]},
        "site": site.name,
        "site_config": str(site.source_path),
        "split": split,
        "samples": len(records),
        "metric": task_for(export.task).metric,
        "metrics": metrics,
    }


def default_output(export: ExportedModel, site: str, split: str) -> Path:
    """Where `medfl evaluate` writes its scores unless told: <export>/evaluations/<site>_<split>.json."""
    return export.folder / "evaluations" / f"{site}_{split}.json"
