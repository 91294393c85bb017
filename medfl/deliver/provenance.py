"""What an export records about where its model came from: the run, the round, the scores, the data seen.

Everything is read back from the run folder (config.yaml, summary.json, metrics.csv, and the site's own
record of its training files), so a hospital can check which round it got, how it scored, which
preprocessing it needs and which training files it saw, without its data being read again.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from medfl.errors import ConfigError
from medfl.experiment import ExperimentConfig
from medfl.runfolder import RunFolder

ROLES = ("personalized", "deputy")


@dataclass
class RunRecord:
    """A run folder read back (through its RunFolder): its config (and the config file's sha256), summary and
    metric rows."""

    files: RunFolder
    config: ExperimentConfig
    config_sha256: str
    summary: dict[str, Any]
    rows: list[dict[str, Any]]

    @property
    def folder(self) -> Path:
        return self.files.root

    @property
    def completed_rounds(self) -> int:
        return int(self.summary["completed_rounds"])


def read_run(run_dir: str | Path) -> RunRecord:
    """Read a run folder; refused in one line unless it carries a run record, a completed round and the
    config.yaml the run wrote (RunFolder.check_config)."""
    files = RunFolder.open(run_dir)
    return RunRecord(files, files.config(), files.config_sha256(), files.summary(), files.metrics())


def parse_round(text: str | int) -> str | int:
    """"best", "last" or a 0-based round number; anything else is a ConfigError."""
    if isinstance(text, int) or str(text).isdigit():
        return int(text)
    if text in ("best", "last"):
        return str(text)
    raise ConfigError(f"--round must be 'best', 'last' or a round number, not '{text}'")


def _validation_curve(run: RunRecord, site: str, model: str) -> dict[int, float]:
    """The model's validation metric at the end of every round (what the run selected on)."""
    metric, epoch = run.summary["metric"], run.config.local_epochs
    return {
        row["round"]: row["value"] for row in run.rows
        if row["site"] == site and row["model"] == model and row["split"] == "val" and row["metric"] == metric
        and row["epoch"] == epoch
    }


def choose_round(run: RunRecord, site: str, model: str, used_model: str, request: str | int) -> int:
    """The round to export: "best" (the run's selection for the used model; for the deputy the round of its
    highest validation score, the earliest on ties), "last", or a number below the completed rounds."""
    if request == "last":
        return run.completed_rounds - 1
    if request == "best":
        if model == used_model:
            return int(run.summary["sites"][site]["selected_round"])
        curve = {r: v for r, v in _validation_curve(run, site, model).items() if not math.isnan(v)}
        return min(curve, key=lambda r: (-curve[r], r)) if curve else 0
    if not 0 <= int(request) < run.completed_rounds:
        raise ConfigError(f"{run.folder}: round {request} does not exist (completed rounds: 0..{run.completed_rounds - 1})")
    return int(request)


def round_metrics(run: RunRecord, site: str, model: str, round_: int) -> dict[str, dict[str, float]]:
    """Validation and test metrics of a model at the end of a round, as the run recorded them."""
    epoch = run.config.local_epochs
    scores: dict[str, dict[str, float]] = {"validation": {}, "test": {}}
    for row in run.rows:
        if row["site"] == site and row["model"] == model and row["round"] == round_ and row["epoch"] == epoch:
            split = {"val": "validation", "test": "test"}.get(row["split"])
            if split:
                scores[split][row["metric"]] = row["value"]
    return scores


def files_sha256(files: list[str]) -> str:
    """sha256 of the file list as UTF-8 text, one path per line, each line ending in a newline."""
    return hashlib.sha256("".join(f"{name}\n" for name in files).encode("utf-8")).hexdigest()


def resolved_eval_recipe(config: ExperimentConfig, variables: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run's evaluation recipe with its variables substituted (`variables`: the task's recipe variables, as
    the run loaded it; default the input size): a recipe mapping that `medfl.data.load_recipe` builds into the
    very transforms the run evaluated with."""
    # start-up: MONAI loads once the run and its round are checked
    from medfl.data.recipes import resolve_recipe

    if variables is None or set(variables) == {"input_size"}:
        recipe = resolve_recipe(config.data.recipe(config.task, "eval"), input_size=config.data.input_size)
        what = f"input size {config.data.input_size}"
    else:
        recipe = resolve_recipe(config.data.recipe(config.task, "eval"), **variables)
        what = ", ".join(f"{name} {value}" for name, value in variables.items() if name in ("spacing",))
    path, transforms = recipe["path"], recipe["transforms"]
    description = f"{recipe['description']} (from {path.name}, {what})"
    return {"description": description, "transforms": transforms}


def recipe_yaml(recipe: dict[str, Any]) -> str:
    """The recipe mapping as YAML text."""
    return yaml.safe_dump(recipe, sort_keys=False)
