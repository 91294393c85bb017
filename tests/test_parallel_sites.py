"""Sites trained side by side in worker processes (medfl.federated.parallel): the same results as one after
another, bit for bit, and the failures of a worker reported in one line."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tensors, tiny_experiment, wait_for_files

from medfl.errors import ConfigError, DataError
from medfl.experiment import load_experiment_config
from medfl.federated.coordinator import Coordinator
from medfl.federated.local_sites import LocalSites
from medfl.federated.parallel import (
    AUTO_FACTOR,
    CUDA_CONTEXT_BYTES,
    WORKER_STARTUP_S,
    ParallelSites,
    WorkerLost,
    assign_sites,
    auto_workers,
    estimated_site_seconds,
    fitting_workers,
    site_memory_bytes,
    threads_per_worker,
    worker_count,
)
from medfl.federated.training import TrainingDiverged
from medfl.models import build_model
from medfl.runfolder import LOCK_FILE, SITE_LOCK_FILE, RunFolder
from medfl.tasks import task_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def experiment(tiny_federation, tmp_path_factory):
    return tiny_experiment(tmp_path_factory.mktemp("parallel") / "exp.yaml", tiny_federation, "classification",
                           runtime={"threads": 1})


@pytest.fixture(scope="module")
def uninterrupted(experiment, tmp_path_factory, one_thread):
    """The 3-round run of `experiment`, sequential and uninterrupted: what interrupted runs resume to."""
    config = load_experiment_config(experiment, rounds=3)
    folder = tmp_path_factory.mktemp("uninterrupted") / "run"
    Coordinator(config, folder, torch.device("cpu"), task=task_for(config.task)).run()
    return folder


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
    Coordinator(config, tmp_path / "sequential", torch.device("cpu"), task=task_for(config.task)).run()
    coordinator = Coordinator(config, tmp_path / "parallel", torch.device("cpu"), parallel=2, task=task_for(config.task))
    assert isinstance(coordinator.federation, ParallelSites)
    coordinator.run()
    assert_same_results(tmp_path / "sequential", tmp_path / "parallel")


def test_sites_go_to_workers_by_training_samples_and_threads_are_shared_out():
    samples = {"a": 10, "b": 40, "c": 30, "d": 20, "e": 5}
    assert assign_sites(samples, 2) == [["a", "b", "e"], ["c", "d"]]  # 55 and 50 samples
    assert assign_sites(samples, 5) == [["b"], ["c"], ["d"], ["a"], ["e"]]
    assert threads_per_worker(8, 3) == 2 and threads_per_worker(1, 2) == 1


def worker_of(coordinator, site):
    return next(worker.process for worker in coordinator.federation.workers if site in worker.sites)


def open_files(pid):
    """The files a process holds open, from /proc (none where there is no /proc)."""
    files = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir() if Path("/proc").is_dir() else []:
        with contextlib.suppress(OSError):
            files.add(Path(os.readlink(fd)))
    return files


def gone(pid):
    return not Path(f"/proc/{pid}").exists() if Path("/proc").is_dir() else True


def test_a_data_error_in_a_worker_is_the_sequential_line_and_nothing_is_created(experiment, tiny_federation,
                                                                                 tmp_path):
    site = yaml.safe_load((tiny_federation / "site_configs" / "dermoscopy" / "derm_b.yaml").read_text())
    site["data_root"] = str(tmp_path / "missing")
    (tmp_path / "derm_b.yaml").write_text(yaml.safe_dump(site))
    broken = tiny_experiment(tmp_path / "exp.yaml", tiny_federation, "classification", runtime={"threads": 1})
    data = yaml.safe_load(broken.read_text())
    data["sites"][1] = str(tmp_path / "derm_b.yaml")
    broken.write_text(yaml.safe_dump(data))
    config = load_experiment_config(broken)
    with pytest.raises(DataError) as sequential:
        Coordinator(config, tmp_path / "sequential", torch.device("cpu"), task=task_for(config.task)).run()
    with pytest.raises(DataError) as parallel:
        Coordinator(config, tmp_path / "parallel", torch.device("cpu"), parallel=2, task=task_for(config.task)).run()
    assert str(parallel.value) == str(sequential.value) and "site 'derm_b'" in str(parallel.value)
    assert not (tmp_path / "parallel").exists()


def test_a_diverging_site_in_a_worker_is_one_line_and_the_workers_stop(experiment, tmp_path):
    config = load_experiment_config(experiment).model_copy(deep=True)
    config.optimizer.lr = 1e30
    coordinator = Coordinator(config, tmp_path / "run", torch.device("cpu"), parallel=2, task=task_for(config.task))
    with pytest.raises(TrainingDiverged, match=r"^site 'derm_[ab]', round 0, epoch 1: [^\n]*$"):
        coordinator.run()
    assert coordinator.federation.workers == [] and RunFolder(tmp_path / "run").completed_rounds() == 0


def test_a_killed_worker_names_its_sites_and_the_round_is_not_kept(experiment, tmp_path):
    """Killed once it started derm_b's round 1: that round fails, or (where derm_b had already answered it) the
    next one; the round named is not kept, every earlier one is."""
    def kill_in_round_1(event, info):
        if event == "site" and info["round"] == 1 and info["site"] == "derm_b":
            os.kill(worker_of(coordinator, "derm_b").pid, signal.SIGKILL)

    coordinator = Coordinator(load_experiment_config(experiment, rounds=3), tmp_path / "run", torch.device("cpu"),
                              progress=kill_in_round_1, parallel=2, task=task_for("classification"))
    with pytest.raises(WorkerLost) as lost:
        coordinator.run()
    match = re.fullmatch(r"the worker process of site\(s\) 'derm_b' ended \(killed by SIGKILL\) in round ([12]), "
                         r"which is not kept", str(lost.value))
    assert match, str(lost.value)
    assert RunFolder(tmp_path / "run").completed_rounds() == int(match[1])


def test_an_interrupt_stops_every_worker_and_a_resume_with_workers_equals_an_uninterrupted_run(experiment, tmp_path,
                                                                                               uninterrupted,
                                                                                               one_thread):
    """Ctrl-C reaches the whole process group: the workers ignore it, the parent stops them; the last completed
    round is kept, and workers resume from the sites' saved state. Each worker holds the run folder's lock file
    open (so the folder is free only once it is gone) and no lock file of a site."""
    pids, held = [], []

    def interrupt_in_round_1(event, info):
        if event == "site" and info["round"] == 1 and not pids:
            pids.extend(worker.process.pid for worker in coordinator.federation.workers)
            held.extend(open_files(pid) for pid in pids)
            for pid in pids:
                os.kill(pid, signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    config = load_experiment_config(experiment, rounds=3)
    coordinator = Coordinator(config, tmp_path / "run", torch.device("cpu"), progress=interrupt_in_round_1, parallel=2,
                              task=task_for(config.task))
    # Python's own Ctrl-C handler, even where pytest was started with SIGINT ignored (a shell's background job)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            coordinator.run()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert len(pids) == 2 and all(gone(pid) for pid in pids)
    if Path("/proc").is_dir():
        assert all((tmp_path / "run" / LOCK_FILE).resolve() in files for files in held), held
        assert not any(path.name == SITE_LOCK_FILE for files in held for path in files)
    assert RunFolder(tmp_path / "run").completed_rounds() == 1
    Coordinator(config, tmp_path / "run", torch.device("cpu"), parallel=2, task=task_for(config.task)).run(resume=True)
    for name in ("metrics.csv", "det_states.csv", "retrogress.csv"):
        assert (tmp_path / "run" / name).read_bytes() == (uninterrupted / name).read_bytes(), name


def descendants(pid):
    """Every process below `pid` (the fork server and the workers it forked), from /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    found, frontier = [], [pid]
    while frontier:
        below = [child for child, parent in parents.items() if parent in frontier]
        found += below
        frontier = below
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process tree from /proc")
def test_workers_die_with_their_parent_and_the_run_resumes_as_if_uninterrupted(experiment, tmp_path, uninterrupted,
                                                                                one_thread):
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "medfl.cli", "run", str(experiment), "--out", str(killed),
                                "--rounds", "3", "--parallel", "2", "--quiet"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_files([killed / "sites" / site / "site.json" for site in ("derm_a", "derm_b")], [process])  # training
    workers = descendants(process.pid)
    assert len(workers) >= 3  # the fork server and two workers
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 60
    while not all(gone(pid) for pid in workers):
        assert time.monotonic() < deadline, "the workers outlived their parent"
        time.sleep(0.01)
    config = load_experiment_config(experiment, rounds=3)
    Coordinator(config, killed, torch.device("cpu"), task=task_for(config.task)).run(resume=True)  # the folder is free: every worker is gone
    for name in ("metrics.csv", "det_states.csv", "retrogress.csv"):
        assert (killed / name).read_bytes() == (uninterrupted / name).read_bytes(), name


def test_auto_starts_workers_only_where_the_training_outweighs_their_start_up(experiment):
    assert auto_workers(sites=4, cores=2, site_seconds=100.0, startup_seconds=5.0) == 2
    assert auto_workers(sites=4, cores=32, site_seconds=100.0, startup_seconds=5.0) == 4
    assert auto_workers(sites=4, cores=32, site_seconds=10.0, startup_seconds=5.0) == 1  # start-up dominates
    assert auto_workers(sites=1, cores=32, site_seconds=1e6, startup_seconds=5.0) == 1
    config = load_experiment_config(experiment)
    assert 0 < estimated_site_seconds(config, task_for(config.task)) < AUTO_FACTOR * WORKER_STARTUP_S  # a tiny run: seconds
    assert type(Coordinator(config, "unused", torch.device("cpu"), parallel="auto",
                                 task=task_for(config.task)).federation) is LocalSites
    assert worker_count(config, 8, torch.device("cpu"), task_for(config.task)) == 2  # at most one worker per site
    with pytest.raises(ConfigError, match="on the CPU or a CUDA GPU"):
        worker_count(config, 2, torch.device("mps"), task_for(config.task))


def test_a_site_processes_gpu_memory_is_estimated_from_its_models_optimizer_and_saved_activations(experiment):
    task = task_for("classification")
    one, two = (load_experiment_config(experiment, method=method) for method in ("fedavg", "prr"))
    single, double = site_memory_bytes(one, task) - CUDA_CONTEXT_BYTES, site_memory_bytes(two, task) - CUDA_CONTEXT_BYTES
    assert single > 0 and double == 2 * single  # P and D: twice one model's parameters, state and activations
    network = build_model(one.model.name, "classification", num_classes=len(one.classes), in_channels=3,
                          width=one.model.width)
    parameters = sum(p.numel() * p.element_size() for p in network.parameters())
    states = {"adam": 2, "sgd": 1 if one.optimizer.momentum else 0}[one.optimizer.name]
    assert single > parameters * (2 + states)  # weights, gradients and the optimizer's state, plus activations
    activations = single - parameters * (2 + states)
    larger = one.model_copy(update={"batch_size": 4 * one.batch_size})
    assert site_memory_bytes(larger, task) - CUDA_CONTEXT_BYTES == pytest.approx(single + 3 * activations, rel=0.05)


def test_sites_share_a_gpu_only_as_far_as_its_free_memory_holds_them(experiment, monkeypatch):
    import medfl.federated.parallel as parallel

    config, task, cuda = load_experiment_config(experiment), task_for("classification"), torch.device("cuda")
    need = site_memory_bytes(config, task)
    assert fitting_workers(10 * need, need) == 8 and fitting_workers(need, need) == 0
    monkeypatch.setattr(parallel, "estimated_site_seconds", lambda *args: 1e6)  # long runs: auto wants workers
    monkeypatch.setattr(parallel, "cores_given", lambda: 16)
    monkeypatch.setattr(parallel, "gpu_free_bytes", lambda device: 10 * need)
    assert worker_count(config, 2, cuda, task) == 2 and worker_count(config, "auto", cuda, task) == 2
    monkeypatch.setattr(parallel, "gpu_free_bytes", lambda device: int(1.5 * need))
    assert worker_count(config, "auto", cuda, task) == 1  # one site process fits: no workers
    with pytest.raises(ConfigError, match=r"2 site processes on cuda need about .* GiB each.* GiB is free; set it to "
                                          r"at most 1 or auto"):
        worker_count(config, 2, cuda, task)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sites_sharing_a_gpu_equal_one_after_another_on_it(experiment, tmp_path):
    config = load_experiment_config(experiment, method="prr")
    cuda = torch.device("cuda")
    Coordinator(config, tmp_path / "sequential", cuda, task=task_for(config.task)).run()
    coordinator = Coordinator(config, tmp_path / "parallel", cuda, parallel=2, task=task_for(config.task))
    assert isinstance(coordinator.federation, ParallelSites)
    coordinator.run()
    summaries = [without_timing(json.loads((tmp_path / run / "summary.json").read_text()))
                 for run in ("sequential", "parallel")]
    # Each process has its own CUDA context; kernels may pick other algorithms, so equal to float tolerance.
    for site, entry in summaries[0]["sites"].items():
        assert entry["test"] == pytest.approx(summaries[1]["sites"][site]["test"], abs=1e-4), site


def test_the_parallel_option_takes_a_number_of_workers_or_auto(capsys):
    from medfl.cli import main

    for value in ("0", "two"):
        with pytest.raises(SystemExit) as exit_:
            main(["run", "experiment.yaml", "--parallel", value])
        assert exit_.value.code == 2 and f"'{value}' is neither a number of workers" in capsys.readouterr().err
