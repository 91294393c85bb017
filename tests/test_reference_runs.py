"""Every number a run reports stays what the commit before a behaviour-keeping change produced.

tests/data/reference_runs.json holds the rows and summaries of four tiny runs (see tests/reference_runs.py).
Since then, evaluation skips work nothing reports: HD95 on validation (phi and selection read the Dice), the
deputy's test score before the last round, and the used model's test score in rounds that validation cannot
select. Those rows are the only ones allowed to be missing; every other value must be identical. Since then too,
segmentation's test scores add the figures on each case's own voxel grid (medfl.metrics.ORIGINAL_GRID_KEYS): those
rows and summary entries are the only ones allowed to be new.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from reference_runs import RUNS, differences, run_reference

from medfl.metrics import ORIGINAL_GRID_KEYS

pytestmark = pytest.mark.slow

STORED = json.loads((Path(__file__).parent / "data" / "reference_runs.json").read_text())
TOLERANCE = 1e-6  # float noise between CPUs; an actual change moves predictions and scores far more


def _key(row: dict[str, str]) -> tuple[str, ...]:
    return tuple(row[k] for k in ("round", "epoch", "site", "model", "split", "metric"))


def _skipped_on_purpose(row: dict[str, str], final_epoch: str, rounds: int) -> bool:
    distance_on_validation = row["split"] == "val" and row["metric"] in ("hd95", "hd95_missing")
    test_not_reported = row["split"] == "test" and row["epoch"] == final_epoch and int(row["round"]) < rounds - 1
    return distance_on_validation or test_not_reported


def _added_since(row: dict[str, str]) -> bool:
    return row["split"] == "test" and row["metric"] in ORIGINAL_GRID_KEYS.values()


def _without_added(summary):
    """The summary without the entries of the figures added since it was stored."""
    if isinstance(summary, dict):
        return {k: _without_added(v) for k, v in summary.items() if k not in ORIGINAL_GRID_KEYS.values()}
    return summary


@pytest.mark.parametrize("name", sorted(RUNS))
def test_run_reproduces_the_stored_numbers(name, tiny_federation, tmp_path, one_thread):
    fresh = run_reference(name, tiny_federation, tmp_path)
    stored = STORED[name]
    final_epoch, rounds = str(RUNS[name]["local_epochs"]), RUNS[name]["rounds"]
    rows = {_key(row): row["value"] for row in fresh["metrics.csv"] if not _added_since(row)}
    if RUNS[name]["task"] == "segmentation":
        added = {row["metric"] for row in fresh["metrics.csv"] if _added_since(row)}
        assert added == set(ORIGINAL_GRID_KEYS.values())
    kept = [row for row in stored["metrics.csv"] if _key(row) in rows]
    missing = [row for row in stored["metrics.csv"] if _key(row) not in rows]
    assert len(kept) == len(rows), "no row that the stored run lacks"
    assert all(_skipped_on_purpose(row, final_epoch, rounds) for row in missing), [
        row for row in missing if not _skipped_on_purpose(row, final_epoch, rounds)][:3]
    assert differences({_key(r): r["value"] for r in kept}, rows, "metrics", TOLERANCE) == []
    for file in ("det_states.csv", "retrogress.csv"):
        assert differences(stored[file], fresh[file], file, TOLERANCE) == []
    assert differences(stored["summary"], _without_added(fresh["summary"]), "summary", TOLERANCE) == []
