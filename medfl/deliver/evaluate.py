"""`medfl evaluate`: score an exported model on a site's labelled data with the run's own metrics.

The site (its own or any other with the same task) is read with the run's data settings from the manifest,
so the splits of a site that took part are the ones the run used: `--split test` is its held-out data.
Inputs go through the export's evaluation recipe and `medfl.federated.evaluation.evaluate_model`, the
function the run scored with (for a 3-D export, the task the command builds from the manifest scores whole volumes
with the run's sliding window, on the grid the run scored on); a site that did not take part can be scored on all
its data (`all`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from medfl.config import DataSettings, SiteConfig, load_site_config, validate_model
from medfl.deliver.bundle import MANIFEST, WEIGHTS, ExportedModel, describe_export
from medfl.errors import ConfigError, DataError

if TYPE_CHECKING:
    from medfl.tasks import Task

SPLIT_CHOICES = ("train", "val", "test", "all")


def _settings(export: ExportedModel, task: Task) -> DataSettings:
    """The run's data settings with the export's own recipe; every slice kept, so volumes reassemble whole."""
    saved = dict(export.manifest["data_settings"])
    saved.update(eval_recipe=str(export.recipe_path), slices="all")
    settings = task.export_data_settings(saved, export.classes)
    return validate_model(DataSettings, settings, export.folder / MANIFEST)


def check_site(manifest: dict[str, Any], site: SiteConfig, split: str) -> None:
    """ConfigError unless the export can be scored on this split of this site (no torch needed)."""
    if split not in SPLIT_CHOICES:
        raise ConfigError(f"--split must be one of {', '.join(SPLIT_CHOICES)}, not '{split}'")
    if site.task != manifest["task"]:
        raise ConfigError(f"{site.describe()}: a {site.task} site cannot score the {manifest['task']} model of "
                          f"{describe_export(manifest)}")


def split_note(manifest: dict[str, Any], site: SiteConfig, split: str) -> str | None:
    """What to tell someone who scores a site that did not take part in the run on one split of it: the split is
    a share of its data, where all of it is unseen by the model (None when there is nothing to tell).

    Exports list their run's sites (manifest experiment.sites); for an older export that does not, a site
    other than the export's own is told the same, conditionally."""
    if split == "all":
        return None
    if site.split_file is not None:
        what = f"its {split} split is the one {site.split_file.name} names"
    else:
        share = manifest["data_settings"]["split_fractions"][("train", "val", "test").index(split)]
        what = f"its {split} split is a random {share:.0%} of its data"
    advice = f"{what}; `--split all` scores all of it"
    sites = manifest.get("experiment", {}).get("sites")
    if sites is None:
        return None if site.name == manifest["site"] else (
            f"this export does not list its run's sites: if site '{site.name}' did not take part, {advice}")
    if site.name in sites:
        return None
    return f"site '{site.name}' did not take part in run '{manifest['experiment']['name']}': {advice}"


def evaluate_export(export: ExportedModel, site_config: str | Path, split: str = "test", *,
                    task: Task) -> dict[str, Any]:
    """Metrics of the exported model on one split (or `all`) of a site, with what was scored on what; `task` is
    the export's (the caller turns the manifest's key into it)."""
    # start-up: the data readers, torch and MONAI load once the export, the site and the split are checked
    from monai.data import DataLoader

    from medfl.data import build_dataset, load_recipe, load_site
    from medfl.federated.evaluation import evaluate_model

    if task.key != export.task:
        raise ConfigError(f"{export.describe()} is a {export.task} model, not a {task.key} one")
    site = load_site_config(site_config)
    check_site(export.manifest, site, split)
    settings = _settings(export, task)
    data = load_site(site, settings, task=task)
    records = [r for name in ("train", "val", "test") if split in (name, "all") for r in data.splits[name]]
    if not records:
        raise DataError(f"the {split} split is empty", site=site.name, path=str(site.source_path))
    # Cached whole, as in the run: evaluate_model runs the loader without MetaTensors, which the recipe's
    # head (channel-first detection) needs, so the head must run when the cache is filled.
    dataset = build_dataset(records, load_recipe(export.recipe_path), cache_rate=1.0)
    loader = DataLoader(dataset, batch_size=task.eval_batch_size(32), shuffle=False, num_workers=0)

    def spacing_of(case_id: str) -> tuple[float, float, float] | None:  # as the run's sites score (Task.case_spacing)
        geometry = data.geometry.get(case_id)
        return task.case_spacing(geometry, settings) if geometry else None

    # segmentation: each case scored on its own grid too, as the run's test scoring does
    metrics = evaluate_model(export.network, loader, task, export.classes, export.device, spacing_of,
                             originals=lambda case_id: task.original_case(data, case_id))
    return {
        "export": {"site": export.site, "folder": str(export.folder.resolve()), "model": export.manifest["model"],
                   "round": export.manifest["round"]["selected"], "weights_sha256": export.manifest["files"][WEIGHTS]},
        "site": site.name,
        "site_config": str(site.source_path),
        "split": split,
        "samples": len(records),
        "scored": task.scored_counts(records),
        "metric": task.metric,
        "metrics": metrics,
    }


def default_output(export: ExportedModel, site: str, split: str) -> Path:
    """Where `medfl evaluate` writes its scores unless told: <export>/evaluations/<site>_<split>.json."""
    return export.folder / "evaluations" / f"{site}_{split}.json"
