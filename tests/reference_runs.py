"""Tiny federated runs whose every recorded number is kept in tests/data/reference_runs.json.

Changes that must not change results (faster evaluation, the run folder, the task redesign) are checked against
the values a commit before them produced:

    python tests/reference_runs.py tests/data/reference_runs.json   # writes the file (from the tests/ folder's
                                                                     # tiny federation, in a temporary folder)

The runs use the conftest tiny federation (`medfl synth` at scale 0.01, 2 + 2 sites) and tiny experiments.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

RUNS: dict[str, dict[str, Any]] = {
    "derm_prr": {"task": "classification", "method": "prr", "rounds": 2, "local_epochs": 2},
    "derm_fedavg": {"task": "classification", "method": "fedavg", "rounds": 2, "local_epochs": 1},
    "prostate_prr": {"task": "segmentation", "method": "prr", "rounds": 2, "local_epochs": 2},
    "prostate_fedavg": {"task": "segmentation", "method": "fedavg", "rounds": 2, "local_epochs": 1},
}
RUN_FILES = ("metrics.csv", "det_states.csv", "retrogress.csv")
# Summary entries that describe the machine, not the results.
NOT_RESULTS = ("timing", "device")


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def run_reference(name: str, federation: Path, folder: Path) -> dict[str, Any]:
    """Run one reference experiment in `folder`; its CSV rows and summary (without machine facts)."""
    import torch
    from conftest import tiny_experiment

    from medfl.experiment import load_experiment_config
    from medfl.federated.coordinator import Coordinator
    from medfl.tasks import task_for

    spec = dict(RUNS[name])
    task = spec.pop("task")
    config = load_experiment_config(tiny_experiment(folder / f"{name}.yaml", federation, task, **spec))
    Coordinator(config, folder / name, torch.device("cpu"), task=task_for(config.task)).run()
    summary = json.loads((folder / name / "summary.json").read_text())
    return {
        **{file: _read(folder / name / file) for file in RUN_FILES},
        "summary": {k: v for k, v in summary.items() if k not in NOT_RESULTS},
    }


def differences(expected: Any, actual: Any, where: str = "", tolerance: float = 0.0) -> list[str]:
    """Every place where `actual` differs from `expected` (numbers compared as floats, within `tolerance`)."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        found = [f"{where}/{k}: missing" for k in expected if k not in actual]
        found += [f"{where}/{k}: unexpected" for k in actual if k not in expected]
        for key in expected.keys() & actual.keys():
            found += differences(expected[key], actual[key], f"{where}/{key}", tolerance)
        return found
    if isinstance(expected, list) and isinstance(actual, list):
        if len(expected) != len(actual):
            return [f"{where}: {len(expected)} rows expected, {len(actual)} found"]
        return [d for i, (e, a) in enumerate(zip(expected, actual, strict=True))
                for d in differences(e, a, f"{where}[{i}]", tolerance)]
    if expected == actual:
        return []
    try:
        e, a = float(expected), float(actual)
    except (TypeError, ValueError):
        return [f"{where}: {expected!r} != {actual!r}"]
    if (math.isnan(e) and math.isnan(a)) or abs(e - a) <= tolerance:
        return []
    return [f"{where}: {expected!r} != {actual!r}"]


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch
    from conftest import tiny_federation_root

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:

        class Factory:  # the one method of pytest's TempPathFactory that tiny_federation_root uses
            @staticmethod
            def getbasetemp() -> Path:
                return Path(scratch)

        federation = tiny_federation_root(Factory())  # type: ignore[arg-type]
        values = {name: run_reference(name, federation, Path(scratch) / "runs") for name in RUNS}
    Path(argv[0]).write_text(json.dumps(values, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
