"""Run folders as the report reads them, and their grouping: runs that differ only by seed form one group."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medfl.errors import ConfigError
from medfl.methods import method_spec
from medfl.runfolder import RunFolder

# Settings that cannot change a run's numbers: runs differing only in these (and the seed) are seeds of one group.
NOT_COMPARED = ("seed", "output_dir", "device", "runtime.threads", "runtime.offload_idle_sites")


@dataclass
class Run:
    """One run folder: its resolved config, summary and logs (metrics, DET states, retrogress)."""

    path: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    metrics: list[dict[str, Any]]
    det: list[dict[str, Any]]
    retrogress: list[dict[str, Any]]

    @property
    def method(self) -> str:
        return str(self.config["method"])

    @property
    def seed(self) -> int:
        return int(self.config["seed"])

    @property
    def task(self) -> str:
        return str(self.config["task"])

    @property
    def metric(self) -> str:
        """The task metric: macro_f1 or dice."""
        return str(self.summary["metric"])

    @property
    def local_epochs(self) -> int:
        return int(self.config["local_epochs"])

    @property
    def sites(self) -> list[str]:
        return list(self.summary["sites"])

    @property
    def used_model(self) -> str:
        """The model each site uses: P for two-model methods, M otherwise."""
        return method_spec(self.method).used_role.value

    @property
    def receiving_model(self) -> str:
        """The model overwritten by the server's weights: D for two-model methods, M otherwise."""
        return method_spec(self.method).receiving_role.value

    @property
    def communicates(self) -> bool:
        return method_spec(self.method).communicates


def load_run(path: str | Path) -> Run:
    """Read a run folder written by `medfl run` (through its RunFolder: refused in one line unless it is one, or
    when its config.yaml was changed after the run)."""
    folder = RunFolder.open(path)
    return Run(folder.root, folder.check_config(), folder.summary(), folder.metrics(), folder.det_states(),
               folder.retrogress())


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def compared_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The config as dotted keys, without the seed and the settings that cannot change results."""
    return {key: value for key, value in _flatten(config).items() if key not in NOT_COMPARED}


@dataclass
class RunGroup:
    """Runs with the same settings but the seed: one method's results, averaged over its seeds."""

    label: str
    runs: list[Run]

    @property
    def first(self) -> Run:
        return self.runs[0]

    @property
    def seeds(self) -> list[int]:
        return [run.seed for run in self.runs]


def _key(run: Run) -> str:
    return json.dumps(compared_settings(run.config), sort_keys=True, default=str)


def _labels(groups: list[list[Run]]) -> list[str]:
    """The method's name; groups sharing a method add the settings that tell them apart."""
    labels = []
    for runs in groups:
        method = runs[0].method
        twins = [g[0] for g in groups if g[0].method == method]
        if len(twins) == 1:
            labels.append(method)
            continue
        mine = compared_settings(runs[0].config)
        flats = [compared_settings(t.config) for t in twins]
        keys = dict.fromkeys(k for f in flats for k in f)
        differing = [k for k in keys if any(f.get(k) != mine.get(k) for f in flats)]
        labels.append(f"{method} ({', '.join(f'{k}={mine.get(k)}' for k in differing[:3])})")
    return labels


def group_runs(runs: Sequence[Run]) -> list[RunGroup]:
    """Group runs that differ only by seed, in the order their first run was given; runs of one task only."""
    tasks = sorted({run.task for run in runs})
    if len(tasks) > 1:
        raise ConfigError(f"runs of different tasks ({', '.join(tasks)}) cannot share one report")
    paths = [run.path.resolve() for run in runs]
    for path in paths:
        if paths.count(path) > 1:
            raise ConfigError(f"{path}: run folder listed twice")
    grouped: dict[str, list[Run]] = {}
    for run in runs:
        grouped.setdefault(_key(run), []).append(run)
    groups = [sorted(g, key=lambda run: (run.seed, str(run.path))) for g in grouped.values()]
    return [RunGroup(label, g) for label, g in zip(_labels(groups), groups, strict=True)]


def site_names(groups: Sequence[RunGroup]) -> list[str]:
    """Every site of every run, in first-seen order."""
    return list(dict.fromkeys(site for group in groups for run in group.runs for site in run.sites))
