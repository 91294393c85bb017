"""What a run writes about itself: metrics.csv, det_states.csv, retrogress.csv, timing.csv and summary.json.

All files are rewritten atomically after every round from the sites' histories, so a run folder is always
consistent with its last completed round, and a resumed run continues it row for row.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medfl.checkpoints import atomic_write_json, atomic_write_text
from medfl.metrics import curve_dips

METRIC_COLUMNS = ("round", "epoch", "site", "model", "split", "metric", "value")


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> None:
    """Write rows (dicts) as CSV atomically; columns default to the union of keys in first-seen order."""
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _format(v) for k, v in row.items()})
    atomic_write_text(path, buffer.getvalue())


def _format(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return value


def _value(rows: Iterable[Mapping[str, Any]], **match: Any) -> float:
    for row in rows:
        if all(row[k] == v for k, v in match.items()):
            return float(row["value"])
    return math.nan


def used_curve(rows: Sequence[Mapping[str, Any]], site: str, model: str, metric: str) -> list[float]:
    """The validation metric of ``model`` after communication and after every epoch, in time order."""
    points = sorted(
        (row["round"], row["epoch"], float(row["value"]))
        for row in rows
        if row["site"] == site and row["model"] == model and row["split"] == "val" and row["metric"] == metric
    )
    return [value for _, _, value in points]


def _mean(values: Iterable[float]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def summarize(
    rows: Sequence[Mapping[str, Any]],
    retrogress_rows: Sequence[Mapping[str, Any]],
    best: Mapping[str, Mapping[str, Any]],
    used_model: str,
    metric: str,
    last_round: int,
    final_epoch: int,
) -> dict[str, Any]:
    """Per-site and mean results: test metrics of the used model at each site's selected round and the last
    round, the validation metric that selected it, retrogress/recovery of the receiving model, curve dips."""
    test_metrics = sorted({row["metric"] for row in rows if row["split"] == "test"})
    sites: dict[str, Any] = {}
    for site, choice in best.items():
        selected = choice["round"]
        site_rows = [r for r in rows if r["site"] == site and r["model"] == used_model and r["epoch"] == final_epoch]
        retro = [r for r in retrogress_rows if r["site"] == site]
        sites[site] = {
            "selected_round": selected,
            "val_" + metric: choice["value"],
            "test": {m: _value(site_rows, round=selected, split="test", metric=m) for m in test_metrics},
            "test_last_round": {m: _value(site_rows, round=last_round, split="test", metric=m) for m in test_metrics},
            "retrogress": _mean(r.get("retrogress", math.nan) for r in retro),
            "recovery": _mean(r.get("recovery", math.nan) for r in retro),
            "curve_dips": curve_dips(used_curve(rows, site, used_model, metric)),
        }
    mean = {
        "test": {m: _mean(s["test"][m] for s in sites.values()) for m in test_metrics},
        "test_last_round": {m: _mean(s["test_last_round"][m] for s in sites.values()) for m in test_metrics},
        "retrogress": _mean(s["retrogress"] for s in sites.values()),
        "recovery": _mean(s["recovery"] for s in sites.values()),
        "curve_dips": _mean(s["curve_dips"] for s in sites.values()),
    }
    return {"sites": sites, "mean": mean}


def write_run_files(
    run_dir: Path,
    rows: Sequence[Mapping[str, Any]],
    det_rows: Sequence[Mapping[str, Any]],
    retrogress_rows: Sequence[Mapping[str, Any]],
    timing_rows: Sequence[Mapping[str, Any]],
    summary: Mapping[str, Any],
) -> None:
    write_csv(run_dir / "metrics.csv", rows, METRIC_COLUMNS)
    write_csv(run_dir / "det_states.csv", det_rows)
    write_csv(run_dir / "retrogress.csv", retrogress_rows,
              ["round", "site", "model", "before", "after", "after_first_epoch", "retrogress", "recovery"])
    write_csv(run_dir / "timing.csv", timing_rows)
    atomic_write_json(run_dir / "summary.json", summary)
