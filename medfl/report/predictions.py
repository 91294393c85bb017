"""Predictions of each site's selected-round model on its test split: confusion matrices, example slices (in 3-D,
three planes through each example case).

A run folder keeps every round's models (each site's part: medfl.runfolder.SiteFolder) but no predictions, so the
report rebuilds each site's test split from the run's config.yaml (load_site and the eval recipe: the same
split and preprocessing as the run) and scores the model the site uses at its selected round. This keeps
the training loop free of report concerns; the price is reading the test data once per report. Splits
are read once and shared by every run that uses the same sites and data settings; each site is read on its
own, so a site whose data is out of reach is left out alone.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.data import DataLoader, Dataset
from torch import nn

from medfl.data.recipes import build_dataset, load_recipe
from medfl.data.site import load_site
from medfl.errors import DataError, MedflError
from medfl.federated.training import plain_tensors
from medfl.metrics import confusion_matrix
from medfl.models import build_model
from medfl.report.runs import Run, RunGroup
from medfl.runfolder import RunFolder

if TYPE_CHECKING:
    from medfl.tasks import Task

BATCH_SIZE = 32


VIEWS = ("axial", "coronal", "sagittal")  # the planes drawn through a 3-D example, in this order


@dataclass
class SliceExample:
    """One test slice of a segmentation site, chosen for an overlay: its record, image and truth. In 3-D, one of
    the three planes through a case's prostate centre (`view`, at voxel `slice_index` of its axis)."""

    site: str
    case_id: str
    slice_index: int
    record: dict[str, Any]
    image: np.ndarray  # (H, W): the slice itself (the middle channel of 2.5-D inputs)
    truth: np.ndarray  # (H, W) bool: prostate
    view: str = "slice"  # "slice" in 2-D; in 3-D one of VIEWS
    aspect: float = 1.0  # a pixel's height over its width (3-D voxels need not be cubes)
    centre: tuple[int, int, int] | None = None  # 3-D: the voxel (x, y, z) the three planes pass through


def load_selected_model(run: Run, site: str, device: torch.device) -> nn.Module:
    """The model ``site`` uses at its selected round, in eval mode on ``device``."""
    round_ = int(run.summary["sites"][site]["selected_round"])
    saved = RunFolder.open(run.path).site(site).load_round_models(round_)
    model = build_model(**saved["network"])
    model.load_state_dict(saved["models"][saved["used"]])
    return model.to(device).eval()


def one_line(error: Exception, site: str) -> str:
    """An error as one line for a report's notes, without a leading "site '<site>': " (the note names it)."""
    return " ".join(str(error).split()).removeprefix(f"site '{site}': ")


class SplitCache:
    """Each site's test records and the run's eval recipe, read once per (sites, data settings) and shared by runs.

    Every site is read alone, from its own site config (found by name): a site whose config or data cannot be
    read here (another hospital's folder, an unset variable) keeps only itself from being scored."""

    def __init__(self, task: Task) -> None:
        self.task = task  # the runs' task: its reader splits each site as the run did, it predicts as the run did
        self._configs: dict[str, tuple[Any, Any]] = {}
        self._records: dict[tuple[str, str], list[dict[str, Any]] | str] = {}
        self._datasets: dict[tuple[str, str], Dataset] = {}

    def _key(self, run: Run) -> str:
        return json.dumps([run.task, run.config["sites"], run.config["data"]], sort_keys=True, default=str)

    def config(self, run: Run) -> tuple[Any, Any]:
        """The run's ExperimentConfig and eval recipe (its sites' configs are not read here); a problem with
        either concerns every site of the run."""
        key = self._key(run)
        if key not in self._configs:
            config = RunFolder.open(run.path).config()
            recipe = load_recipe(config.data.recipe(config.task, "eval"), **self.task.recipe_variables(config.data))
            self._configs[key] = (config, recipe)
        return self._configs[key]

    def site_records(self, run: Run, site: str) -> list[dict[str, Any]]:
        """The site's test records as the run split them; a DataError naming the site (one line) when its
        config or data cannot be read here."""
        key = (self._key(run), site)
        if key not in self._records:
            config, _ = self.config(run)
            try:
                self._records[key] = load_site(config.load_site(site), config.data, task=self.task).splits["test"]
            except MedflError as error:
                self._records[key] = one_line(error, site)
        records = self._records[key]
        if isinstance(records, str):
            raise DataError(records, site=site)
        return records

    def records(self, run: Run) -> dict[str, list[dict[str, Any]]]:
        """Test records per site name, as the run split them, of every site of the run that can be read here."""
        skipped = self.unreadable(run)
        return {site: self.site_records(run, site) for site in run.sites if site not in skipped}

    def unreadable(self, run: Run) -> dict[str, str]:
        """The sites of the run whose test records cannot be read here, and why (one line each)."""
        skipped = {}
        for site in run.sites:
            try:
                self.site_records(run, site)
            except DataError as error:
                skipped[site] = one_line(error, site)
        return skipped

    def dataset(self, run: Run, site: str) -> Dataset:
        """The site's whole test split through the eval recipe (cached: it is scored once per run)."""
        key = (self._key(run), site)
        if key not in self._datasets:
            self._datasets[key] = build_dataset(self.site_records(run, site), self.config(run)[1], cache_rate=1.0)
        return self._datasets[key]

    def transform(self, run: Run, records: list[dict[str, Any]]) -> Dataset:
        """A few records through the run's eval recipe."""
        return Dataset(records, transform=self.config(run)[1])


@torch.no_grad()
def _predicted_classes(model: nn.Module, batches: Iterable[Mapping[str, Any]], device: torch.device
                       ) -> tuple[np.ndarray, np.ndarray]:
    labels, predicted = [], []
    with plain_tensors():
        for batch in batches:
            logits, _ = model(torch.as_tensor(batch["image"]).to(device))
            predicted.append(logits.argmax(dim=1).cpu())
            labels.append(torch.as_tensor(batch["label"]).reshape(-1).cpu())
    return torch.cat(labels).numpy(), torch.cat(predicted).numpy()


def confusion_matrices(group: RunGroup, splits: SplitCache, device: torch.device,
                       skipped: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    """Per site, the test confusion counts of the selected-round model, summed over the group's seeds.

    A site whose data or model cannot be read here is left out; why goes into `skipped` (site -> one line)."""
    classes = group.first.config["data"]["classes"]
    totals: dict[str, np.ndarray] = {}
    for run in group.runs:
        splits.config(run)  # the run's config and recipe: a problem there is the whole run's
        for site in run.sites:
            try:
                dataset = splits.dataset(run, site)
                model = load_selected_model(run, site, device) if len(dataset) else None
            except MedflError as error:
                if skipped is not None:
                    skipped.setdefault(site, one_line(error, site))
                continue
            if model is None:
                continue
            labels, predicted = _predicted_classes(model, DataLoader(dataset, batch_size=BATCH_SIZE), device)
            matrix = confusion_matrix(labels, predicted, len(classes))
            totals[site] = totals.get(site, 0) + matrix
    return totals


def _slice_image(record: Mapping[str, Any]) -> np.ndarray:
    image = np.asarray(record["image"], dtype=np.float32)
    return image[image.shape[0] // 2]


def choose_examples(records: Mapping[str, list[dict[str, Any]]], count: int) -> dict[str, list[SliceExample]]:
    """Per site, up to ``count`` test slices with the most prostate, from different cases where possible.

    Chosen from the data alone, so that every method is shown on the same slices.
    """
    chosen: dict[str, list[SliceExample]] = {}
    for site, site_records in records.items():
        ranked = sorted(site_records, key=lambda r: (-int(np.count_nonzero(r["label"])), r["case_id"],
                                                     r["slice_index"]))
        ranked = [r for r in ranked if np.any(r["label"])]
        picks: list[dict[str, Any]] = []
        for record in ranked:
            if len(picks) < count and record["case_id"] not in {p["case_id"] for p in picks}:
                picks.append(record)
        picks += [r for r in ranked if all(r is not p for p in picks)][: count - len(picks)]
        chosen[site] = [
            SliceExample(site, str(r["case_id"]), int(r["slice_index"]), r, _slice_image(r),
                         np.asarray(r["label"])[0] > 0)
            for r in picks
        ]
    return chosen


@torch.no_grad()
def predict_examples(run: Run, examples: Mapping[str, list[SliceExample]], splits: SplitCache,
                     device: torch.device) -> dict[str, list[np.ndarray]]:
    """The selected-round model's prostate mask (H, W) on each example slice of each site of ``run``."""
    masks: dict[str, list[np.ndarray]] = {}
    for site, site_examples in examples.items():
        if site not in run.sites or not site_examples:
            continue
        model = load_selected_model(run, site, device)
        dataset = splits.transform(run, [example.record for example in site_examples])
        with plain_tensors():
            batch = next(iter(DataLoader(dataset, batch_size=len(site_examples))))
            logits, _ = model(torch.as_tensor(batch["image"]).to(device))
        masks[site] = list(logits.argmax(dim=1).cpu().numpy() > 0)
    return masks


def volume_planes(volume: np.ndarray, centre: Sequence[int]) -> list[np.ndarray]:
    """The axial, coronal and sagittal planes of an (x, y, z) volume in RAS through voxel `centre`, as images
    (row 0 at the top): anterior up in the axial plane, superior up in the others, the patient's right and
    anterior to the right."""
    x, y, z = (int(i) for i in centre)
    return [np.flipud(volume[:, :, z].T), np.flipud(volume[:, y, :].T), np.flipud(volume[x, :, :].T)]


def _plane_aspects(spacing: Sequence[float]) -> list[float]:
    sx, sy, sz = (float(s) for s in spacing)
    return [sy / sx, sz / sx, sz / sy]


def choose_volume_examples(run: Run, splits: SplitCache, count: int) -> dict[str, list[SliceExample]]:
    """Per site, the ``count`` test cases with the most prostate (after the run's eval recipe), each as three
    planes (VIEWS) through the centre of mass of its prostate mask.

    Chosen from the data alone, so that every method is shown on the same planes."""
    spacing = splits.config(run)[0].data.spacing
    chosen: dict[str, list[SliceExample]] = {}
    for site, records in splits.records(run).items():
        dataset = splits.dataset(run, site)
        sizes = [(int(np.count_nonzero(np.asarray(dataset[i]["label"]))), i) for i in range(len(dataset))]
        ranked = sorted((item for item in sizes if item[0]), key=lambda item: (-item[0], str(records[item[1]]["case_id"])))
        chosen[site] = []
        for _, index in ranked[:count]:
            item = dataset[index]
            image, truth = np.asarray(item["image"], dtype=np.float32)[0], np.asarray(item["label"])[0] > 0
            centre = tuple(int(round(c)) for c in np.argwhere(truth).mean(axis=0))
            for view, plane, aspect, truth_plane, at in zip(
                    VIEWS, volume_planes(image, centre), _plane_aspects(spacing), volume_planes(truth, centre),
                    (centre[2], centre[1], centre[0]), strict=True):
                chosen[site].append(SliceExample(site, str(records[index]["case_id"]), at, records[index], plane,
                                                 truth_plane, view, aspect, centre))
    return chosen


@torch.no_grad()
def predict_volume_examples(run: Run, examples: Mapping[str, list[SliceExample]], splits: SplitCache,
                            device: torch.device) -> dict[str, list[np.ndarray]]:
    """The selected-round model's prostate mask on each plane of each 3-D example of each site of ``run``: each
    case is predicted whole, as the run scored it (the task's sliding window), then cut into its planes."""
    masks: dict[str, list[np.ndarray]] = {}
    for site, site_examples in examples.items():
        if site not in run.sites or not site_examples:
            continue
        model = load_selected_model(run, site, device)
        predicted: dict[str, np.ndarray] = {}
        masks[site] = []
        for example in site_examples:
            if example.case_id not in predicted:
                item = splits.transform(run, [example.record])[0]
                with plain_tensors():
                    images = torch.as_tensor(item["image"])[None].to(device)
                    predicted[example.case_id] = splits.task.predict_labels(model, images)[0].cpu().numpy() > 0
            planes = volume_planes(predicted[example.case_id], example.centre or (0, 0, 0))
            masks[site].append(planes[VIEWS.index(example.view)])
    return masks
