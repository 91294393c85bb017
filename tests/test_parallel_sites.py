"""Sites trained side by side in worker processes (medfl.federated.parallel): the same results as one after
another, bit for bit, and the failures of a worker reported in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_experiment

from medfl.experiment import load_experiment_config
from medfl.federated.coordinator import Coordinator
from medfl.federated.parallel import ParallelSites, assign_sites, threads_per_worker

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def experiment(tiny_federation, tmp_path_factory):
    return tiny_experiment(tmp_path_factory.mktemp("parallel") / "exp.yaml", tiny_federation, "classification",
                           runtime={"threads": 1})


def tensors(value, path=""):
    """Every tensor inside a loaded torch file, by its path."""
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from tensors(item, f"{path}/{key}")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from tensors(item, f"{path}/{index}")


def without_timing(value):
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if k not in ("timing", "device")}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


def assert_same_results(one: Path, other: Path) -> None:
    for name in ("metrics.csv", "det_states.csv", "retrogress.csv"):
        assert (one / name).read_bytes() == (other / name).read_bytes(), name
    summaries = [without_timing(json.loads((run / "summary.json").read_text())) for run in (one, other)]
    assert summaries[0] == summaries[1]
    files = sorted(p.relative_to(one) for p in one.rglob("*.pt"))
    assert files == sorted(p.relative_to(other) for p in other.rglob("*.pt"))
    for file in files:
        saved = [dict(tensors(torch.load(run / file, weights_only=True))) for run in (one, other)]
        assert saved[0].keys() == saved[1].keys(), file
        for key, value in saved[0].items():
            assert value.dtype == saved[1][key].dtype and torch.equal(value, saved[1][key]), (file, key)
    for site in ("derm_a", "derm_b"):
        logs = [[without_timing(json.loads(line)) for line in (run / "sites" / site / "audit.jsonl").open()]
                for run in (one, other)]
        assert logs[0] == logs[1], site


@pytest.mark.parametrize("method", ["prr", "fedavg", "local", "ditto"])
def test_sites_side_by_side_equal_one_after_another(method, experiment, tmp_path, one_thread):
    config = load_experiment_config(experiment, method=method)
    Coordinator(config, tmp_path / "sequential", torch.device("cpu")).run()
    coordinator = Coordinator(config, tmp_path / "parallel", torch.device("cpu"), parallel=2)
    assert isinstance(coordinator.federation, ParallelSites)
    coordinator.run()
    assert_same_results(tmp_path / "sequential", tmp_path / "parallel")


def test_sites_go_to_workers_by_training_samples_and_threads_are_shared_out():
    samples = {"a": 10, "b": 40, "c": 30, "d": 20, "e": 5}
    assert assign_sites(samples, 2) == [["a", "b", "e"], ["c", "d"]]  # 55 and 50 samples
    assert assign_sites(samples, 5) == [["b"], ["c"], ["d"], ["a"], ["e"]]
    assert threads_per_worker(8, 3) == 2 and threads_per_worker(1, 2) == 1
