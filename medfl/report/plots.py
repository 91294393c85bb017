"""PNG figures of a report: validation curves with communications, retrogress per round, DET states,
segmentation overlays. Built with matplotlib's object API (no pyplot), so no global backend is touched."""

from __future__ import annotations

import io
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from medfl.checkpoints import atomic_write_bytes
from medfl.report.predictions import SliceExample
from medfl.report.runs import Run, RunGroup

DET_STATES = ("recover", "exchange", "sublimate")
DET_COLOURS = ("#d62728", "#ff7f0e", "#2ca02c")
PANEL_INCHES = (4.2, 3.0)


def colour(index: int) -> str:
    """The colour of the index-th group, the same in every figure."""
    return f"C{index % 10}"


def save_png(figure: Figure, path: Path) -> Path:
    """Render ``figure`` as PNG and write it atomically."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return atomic_write_bytes(path, buffer.getvalue())


def _grid(count: int, columns: int = 3) -> tuple[Figure, list]:
    ncols = max(1, min(count, columns))
    nrows = math.ceil(count / ncols)
    figure = Figure(figsize=(PANEL_INCHES[0] * ncols, PANEL_INCHES[1] * nrows), layout="constrained")
    axes = figure.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for extra in axes[count:]:
        extra.set_axis_off()
    return figure, axes[:count]


def curve(runs: Sequence[Run], site: str, model: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """x = round + epoch / E and the validation metric, averaged over runs (seeds), in time order.

    Epoch 0 (right after communication) of round t and epoch E of round t - 1 share x = t, so a drop
    caused by communication shows as a vertical step at that round.
    """
    points: dict[tuple[int, int], list[float]] = defaultdict(list)
    for run in runs:
        for row in run.metrics:
            if (row["site"], row["model"], row["split"], row["metric"]) == (site, model, "val", metric):
                points[(row["round"], row["epoch"])].append(row["value"])
    keys = sorted(points)
    epochs = runs[0].local_epochs
    x = np.array([round_ + epoch / epochs for round_, epoch in keys], dtype=float)
    y = np.array([np.nanmean(points[key]) if not np.all(np.isnan(points[key])) else np.nan for key in keys])
    return x, y


def validation_curves(groups: Sequence[RunGroup], sites: Sequence[str], metric: str) -> Figure:
    """Per site: the validation metric of the model each site uses (solid) and of the model that receives the
    server's weights (dashed, two-model methods), through every round; dotted lines mark communications."""
    figure, axes = _grid(len(sites))
    last_round = max((row["round"] for g in groups for run in g.runs for row in run.metrics), default=0)
    communicates = any(g.first.communicates for g in groups)
    for ax, site in zip(axes, sites, strict=True):
        for index, group in enumerate(groups):
            run = group.first
            for model, style in ((run.used_model, "-"), (run.receiving_model, "--")):
                if style == "--" and model == run.used_model:
                    continue
                x, y = curve(group.runs, site, model, metric)
                if len(x):
                    ax.plot(x, y, style, color=colour(index), lw=1.4 if style == "-" else 1.0,
                            label=f"{group.label} ({model})")
        if communicates:
            for round_ in range(1, last_round + 1):
                ax.axvline(round_, color="0.6", ls=":", lw=0.8)
        ax.set_title(site)
        ax.set_xlabel("round")
        ax.set_ylabel(f"validation {metric}")
        ax.set_xlim(0, last_round + 1)
    handles, labels = axes[0].get_legend_handles_labels()
    if communicates:
        handles.append(axes[0].axvline(-1, color="0.6", ls=":", lw=0.8))
        labels.append("communication")
    figure.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4), fontsize="small")
    return figure


def _per_round(run: Run, key: str) -> dict[int, float]:
    """The mean over sites of a retrogress.csv column, per round."""
    values: dict[int, list[float]] = defaultdict(list)
    for row in run.retrogress:
        if not math.isnan(row.get(key, math.nan)):
            values[row["round"]].append(row[key])
    return {round_: float(np.mean(v)) for round_, v in values.items()}


def retrogress_by_round(groups: Sequence[RunGroup]) -> Figure | None:
    """Retrogress and recovery of the receiving model per round, mean over sites, one line per method
    (error bars: standard deviation across seeds). None when no run communicates."""
    shown = [(i, g) for i, g in enumerate(groups) if g.first.communicates and any(r.retrogress for r in g.runs)]
    if not shown:
        return None
    figure, axes = _grid(2, 2)
    communications = sorted({row["round"] for _, group in shown for run in group.runs for row in run.retrogress})
    for ax, key in zip(axes, ("retrogress", "recovery"), strict=True):
        for index, group in shown:
            per_seed = [_per_round(run, key) for run in group.runs]
            rounds = sorted({r for seed in per_seed for r in seed})
            values = [[seed[r] for seed in per_seed if r in seed] for r in rounds]
            mean = [float(np.mean(v)) for v in values]
            spread = [float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for v in values]
            ax.errorbar(rounds, mean, yerr=spread, marker="o", ms=4, capsize=3, color=colour(index),
                        label=f"{group.label} ({group.first.receiving_model})")
        ax.axhline(0, color="0.6", lw=0.8)
        ax.set_xlabel("round")
        ax.set_title(f"{key} (mean over sites)")
        # Whole rounds only, half a round of margin: one communication would otherwise get ticks 0.96-1.04.
        ax.set_xlim(communications[0] - 0.5, communications[-1] + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    axes[0].set_ylabel("drop of validation score at communication")
    axes[1].set_ylabel("regained in the first local epoch")
    axes[0].legend(fontsize="small")
    return figure


def det_states(groups: Sequence[RunGroup]) -> Figure | None:
    """DET's state per site and local epoch for every method that uses DET (its first seed); None if none."""
    shown = [g for g in groups if any(row.get("state") for row in g.first.det)]
    if not shown:
        return None
    figure, axes = _grid(len(shown), 2)
    cmap = ListedColormap(DET_COLOURS)
    for ax, group in zip(axes, shown, strict=True):
        run = group.first
        epochs = run.local_epochs
        rounds = max(row["round"] for row in run.det) + 1
        grid = np.full((len(run.sites), rounds * epochs), np.nan)
        for row in run.det:
            if row["site"] in run.sites and row.get("state") in DET_STATES:
                column = row["round"] * epochs + row["epoch"] - 1
                grid[run.sites.index(row["site"]), column] = DET_STATES.index(row["state"])
        ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=-0.5, vmax=2.5, aspect="auto", interpolation="nearest",
                  extent=(0, rounds, len(run.sites) - 0.5, -0.5))
        for round_ in range(1, rounds):
            ax.axvline(round_, color="white", lw=1.2)
        ax.set_yticks(range(len(run.sites)), run.sites)
        ax.set_xlabel("round (one cell per local epoch)")
        ax.set_title(f"{group.label}, seed {run.seed}")
    figure.legend([Patch(color=c) for c in DET_COLOURS], list(DET_STATES), loc="outside lower center",
                  ncols=3, fontsize="small")
    return figure


def segmentation_overlays(
    examples: Mapping[str, Sequence[SliceExample]], predictions: Mapping[str, Mapping[str, Sequence[np.ndarray]]]
) -> Figure | None:
    """Rows: example slices; columns: the image with its truth (green outline), then each method's
    prediction (red) over it. ``predictions[label][site][i]`` is method ``label``'s mask of example i."""
    rows = [(index, example) for site_examples in examples.values() for index, example in enumerate(site_examples)]
    if not rows:
        return None
    labels = list(predictions)
    figure = Figure(figsize=(2.2 * (1 + len(labels)), 2.3 * len(rows)), layout="constrained")
    axes = figure.subplots(len(rows), 1 + len(labels), squeeze=False)
    red = ListedColormap(["#d62728"])
    for row, (index, example) in enumerate(rows):
        panels: list[tuple[str, np.ndarray | None]] = [("truth", None)]
        for label in labels:
            masks = predictions[label].get(example.site)
            panels.append((label, masks[index] if masks else None))
        for column, (title, mask) in enumerate(panels):
            ax = axes[row, column]
            ax.imshow(example.image, cmap="gray", interpolation="nearest", aspect=example.aspect)
            if mask is not None:
                ax.imshow(np.ma.masked_where(~mask, mask), cmap=red, alpha=0.45, interpolation="nearest",
                          aspect=example.aspect)
            ax.contour(example.truth, levels=[0.5], colors="#2ca02c", linewidths=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize="small")
            if column == 0:
                ax.set_ylabel(f"{example.site}\n{example.case_id} {example.view} {example.slice_index}", fontsize="small")
    return figure
