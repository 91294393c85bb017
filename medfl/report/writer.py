"""`write_report`: one or several run folders -> report.md plus PNG figures in one folder.

A report is derived data: writing it again into the same folder replaces report.md and the figures
(atomically, file by file). Runs that differ only by seed are aggregated (mean ± std); different methods
are compared side by side.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from medfl.checkpoints import atomic_write_text
from medfl.errors import ConfigError, MedflError
from medfl.report import plots
from medfl.report.predictions import (
    SplitCache,
    choose_examples,
    choose_volume_examples,
    confusion_matrices,
    predict_examples,
    predict_volume_examples,
)
from medfl.report.runs import RunGroup, group_runs, load_run, site_names
from medfl.report.tables import confusion_table, result_columns, results_table, runs_table

if TYPE_CHECKING:
    from medfl.tasks import Task

REPORT_FILE = "report.md"
FIGURES = {
    "validation_curves.png": "Validation curves",
    "retrogress.png": "Retrogress per round",
    "det_states.png": "DET states",
    "segmentation_examples.png": "Segmentation examples",
    "segmentation_planes.png": "Segmentation examples, three planes per case",
}


@dataclass
class Report:
    """What `write_report` wrote: report.md, the figures, and notes on anything it had to leave out."""

    path: Path
    figures: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def default_out(run_dirs: Sequence[str | Path]) -> Path:
    """RUN_DIR/report for one run, ./report for several."""
    return Path(run_dirs[0]) / "report" if len(run_dirs) == 1 else Path("report")


def _results_section(groups: list[RunGroup], sites: list[str], task: Task) -> list[str]:
    first = groups[0].first
    columns = result_columns(task, first.config["data"].get("classes") or [], first.metric)
    lines = [
        "## Test results, mean over sites", "",
        results_table(groups, columns), "",
        f"Test scores of the model each site uses, at the round its validation {first.metric} selected "
        "(\"last round\": at the final round instead). Retrogress (validation score lost at communication) "
        "and recovery (regained in the first local epoch) are of the model that receives the server's weights: "
        "D for two-model methods, the single model otherwise; the personalised model P is never overwritten, "
        "so it has none by construction. Curve dips: the summed drops of the used model's validation curve.", "",
        "## Test results per site", "",
    ]
    for site in sites:
        lines += [f"### {site}", "", results_table(groups, columns, site), ""]
    return lines


def _confusion_section(groups: list[RunGroup], sites: list[str], splits: SplitCache, device: torch.device,
                       notes: list[str]) -> list[str]:
    classes = groups[0].first.config["data"]["classes"]
    matrices: dict[str, dict[str, np.ndarray]] = {}
    skipped: dict[str, dict[str, str]] = {}  # site -> {group label: why}
    for group in groups:
        reasons: dict[str, str] = {}
        try:
            matrices[group.label] = confusion_matrices(group, splits, device, reasons)
        except MedflError as error:
            notes.append(f"confusion matrices of {group.label} were not computed: {error}")
        for site, reason in reasons.items():
            skipped.setdefault(site, {})[group.label] = reason
    notes += _skipped_notes("confusion matrix", skipped, len(groups))
    if not matrices:
        return []
    lines = ["## Confusion matrices (test split, selected round)", "",
             "Rows are true classes, columns predicted ones; counts are summed over a method's seeds.", ""]
    for site in sites:
        lines += [f"### {site}", ""]
        for label, per_site in matrices.items():
            if site in per_site:
                lines += [f"**{label}**", "", confusion_table(per_site[site], classes), ""]
    return lines


def _skipped_notes(what: str, skipped: dict[str, dict[str, str]], groups: int) -> list[str]:
    """One note per site left out: which site, of which methods when not of all, and why."""
    notes = []
    for site, reasons in skipped.items():
        which = "" if len(reasons) == groups else f" ({', '.join(reasons)})"
        notes.append(f"{what} of site '{site}'{which} skipped: {next(iter(reasons.values()))}")
    return notes


def _overlay_figure(groups: list[RunGroup], splits: SplitCache, count: int, device: torch.device,
                    notes: list[str], volumes: bool):
    """Example slices (2-D) or three planes through each example case (3-D, ``volumes``), truth and predictions."""
    first = groups[0].first
    predict = predict_volume_examples if volumes else predict_examples
    try:
        examples = (choose_volume_examples(first, splits, count) if volumes
                    else choose_examples(splits.records(first), count))
    except MedflError as error:
        notes.append(f"segmentation examples were not drawn: {error}")
        return None
    skipped = splits.unreadable(first)
    notes += _skipped_notes("segmentation examples", {site: {"": why} for site, why in skipped.items()}, 1)
    predictions = {}
    for group in groups:
        try:
            predictions[group.label] = predict(group.first, examples, splits, device)
        except MedflError as error:
            notes.append(f"segmentation examples of {group.label} were not predicted: {error}")
    return plots.segmentation_overlays(examples, predictions)


def _figures(groups: list[RunGroup], sites: list[str], out: Path, predictions: bool, examples: int,
             splits: SplitCache, device: torch.device, notes: list[str], task: Task) -> list[Path]:
    first = groups[0].first
    figures = {
        "validation_curves.png": plots.validation_curves(groups, sites, first.metric),
        "retrogress.png": plots.retrogress_by_round(groups),
        "det_states.png": plots.det_states(groups),
    }
    if task.example_slices and predictions and examples > 0:
        volumes = task.spatial_dims == 3
        name = "segmentation_planes.png" if volumes else "segmentation_examples.png"
        figures[name] = _overlay_figure(groups, splits, examples, device, notes, volumes)
    return [plots.save_png(figure, out / name) for name, figure in figures.items() if figure is not None]


CAPTIONS = {
    "validation_curves.png": "Per site, the validation score of the model each site uses (solid) and of the model "
    "that receives the server's weights (dashed), after communication and after every local epoch; dotted "
    "lines mark communications (mean over seeds).",
    "retrogress.png": "Validation score lost by the receiving model at each communication, and regained in the "
    "first local epoch, mean over sites (error bars: standard deviation across seeds).",
    "det_states.png": "DET's state per site and local epoch (first seed of each method).",
    "segmentation_examples.png": "Test slices with the most prostate: truth outlined in green, each method's "
    "prediction (selected round, first seed) in red.",
    "segmentation_planes.png": "Test cases with the most prostate, each as its axial, coronal and sagittal plane "
    "through the centre of mass of its prostate mask (the resampled grid; anterior or superior up, the patient's "
    "right to the right): truth outlined in green, each method's prediction (selected round, first seed, the "
    "run's sliding window over the whole volume) in red.",
}


def write_report(
    run_dirs: Sequence[str | Path],
    out: str | Path | None = None,
    *,
    predictions: bool = True,
    examples: int = 2,
    device: str | torch.device = "cpu",
    task: Task,
) -> Report:
    """Write report.md and PNG figures for ``run_dirs`` into ``out`` (default: `default_out`).

    ``predictions``: rescore each site's selected-round model on its test split (needs the sites' data) for
    confusion matrices and segmentation examples; ``examples``: slices per site in the overlays; ``task``: the
    runs' task (the caller turns their key into it).
    """
    if not run_dirs:
        raise MedflError("no run folder given")
    if examples < 0:
        raise ConfigError(f"the number of segmentation examples must not be negative, got {examples}")
    groups = group_runs([load_run(path) for path in run_dirs])
    if groups[0].first.task != task.key:
        raise ConfigError(f"{groups[0].first.path}: a {groups[0].first.task} run, not a {task.key} one")
    for group in groups:
        for run in group.runs:
            dims = int((run.config.get("data") or {}).get("dims", 2))
            if dims != task.spatial_dims:
                raise ConfigError(f"{run.path}: a {dims}-D run, and the report's task is {task.spatial_dims}-D "
                                  "(2-D and 3-D runs go in separate reports)")
    sites = site_names(groups)
    out = Path(out) if out is not None else default_out(run_dirs)
    device = torch.device(device)
    notes: list[str] = []
    splits = SplitCache(task)
    first = groups[0].first
    lines = [f"# medfl report: {first.config.get('name', '')} ({first.task})", "", "## Runs", "",
             runs_table(groups), "",
             "Runs whose configs differ only by seed form one row: mean ± sample standard deviation across seeds.",
             ""]
    lines += _results_section(groups, sites, task)
    if task.confusion_matrices and predictions:
        lines += _confusion_section(groups, sites, splits, device, notes)
    figures = _figures(groups, sites, out, predictions, examples, splits, device, notes, task)
    if figures:
        lines += ["## Figures", ""]
        for figure in figures:
            lines += [f"### {FIGURES[figure.name]}", "", f"![{FIGURES[figure.name]}]({figure.name})", "",
                      CAPTIONS[figure.name], ""]
    if notes:
        lines += ["## Notes", "", *(f"- {note}" for note in notes), ""]
    path = atomic_write_text(out / REPORT_FILE, "\n".join(lines))
    return Report(path, figures, notes)
