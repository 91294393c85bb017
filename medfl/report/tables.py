"""Markdown tables: test results per site and their mean, methods side by side, mean +- std across seeds.

Numbers come from each run's summary.json: test metrics of the model each site uses, at the round its
validation score selected, plus the last round's task metric, and the retrogress, recovery and curve dips
that the run measured. Across the seeds of a group a cell shows mean +- sample standard deviation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from medfl.report.runs import RunGroup

if TYPE_CHECKING:
    from medfl.tasks import Task

MISSING = "–"


@dataclass(frozen=True)
class Column:
    """One table column: where its value sits in a site's (or the mean's) summary entry, and its format."""

    header: str
    path: tuple[str, ...]
    digits: int = 3


def result_columns(task: Task, classes: Sequence[str], metric: str) -> list[Column]:
    """The task's test metrics and the last round's selection metric, then retrogress, recovery and curve
    dips."""
    return task.result_columns(classes, metric) + [
        Column("retrogress", ("retrogress",)),
        Column("recovery", ("recovery",)),
        Column("curve dips", ("curve_dips",)),
    ]


def _lookup(entry: Mapping[str, Any] | None, path: tuple[str, ...]) -> float:
    value: Any = entry
    for key in path:
        if not isinstance(value, Mapping) or key not in value:
            return math.nan
        value = value[key]
    return math.nan if value is None else float(value)


def format_values(values: Sequence[float], digits: int = 3) -> str:
    """'m' for one value, 'm ± s' (sample std) for several; NaNs are left out, all-NaN gives a dash."""
    defined = [v for v in values if not math.isnan(v)]
    if not defined:
        return MISSING
    mean = float(np.mean(defined))
    if len(defined) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {float(np.std(defined, ddof=1)):.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table; the first column is left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _entry(run_summary: Mapping[str, Any], site: str | None) -> Mapping[str, Any] | None:
    return run_summary.get("mean") if site is None else run_summary["sites"].get(site)


def results_table(groups: Sequence[RunGroup], columns: Sequence[Column], site: str | None = None) -> str:
    """One row per group: the columns at ``site`` (None: the mean over sites), across the group's seeds."""
    header = ["method", "seeds", *(column.header for column in columns)]
    rows = []
    for group in groups:
        entries = [_entry(run.summary, site) for run in group.runs]
        cells = [format_values([_lookup(e, c.path) for e in entries], c.digits) for c in columns]
        rows.append([group.label, str(len(group.runs)), *cells])
    return markdown_table(header, rows)


def runs_table(groups: Sequence[RunGroup]) -> str:
    """Which folder is which: group, seed, completed rounds, folder."""
    rows = []
    for group in groups:
        for run in group.runs:
            summary = run.summary
            rounds = f"{summary.get('completed_rounds', '?')}/{summary.get('rounds', '?')}"
            rows.append([group.label, str(run.seed), rounds, f"`{run.path}`"])
    return markdown_table(["method", "seed", "rounds", "run folder"], rows)


def confusion_table(matrix: np.ndarray, classes: Sequence[str]) -> str:
    """Counts with true classes as rows and predicted classes as columns."""
    header = ["true \\ predicted", *classes]
    rows = [[name, *(str(int(count)) for count in matrix[i])] for i, name in enumerate(classes)]
    return markdown_table(header, rows)
