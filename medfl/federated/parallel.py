"""Sites trained side by side: worker processes that each own some of a run's sites for the whole run.

`ParallelSites` is an in-process `Federation` (the protocol of medfl.federated.rounds, like `LocalSites`)
whose sites live in worker processes: each worker reads its sites' data, builds their models once and
keeps models and optimizer state until the run ends, so that a round costs the slowest worker rather
than the sum of all sites. Sites go to workers by training-sample count (largest first to the least
loaded worker), and the threads given are shared out among the workers.

Workers start from multiprocessing's `forkserver`: a fresh interpreter that imports this module (torch,
MONAI) once, runs no torch operation and forks each worker on request. A worker therefore inherits neither
the parent's OpenMP and MKL thread pools (a fork of the parent could deadlock in them), nor CUDA state,
nor the parent's global random state or open files, and K workers pay one import of torch and MONAI, not
K (`auto` weighs that start-up, `worker_count`). As with any multiprocessing start method but fork, a
script that runs a parallel experiment keeps its top level under `if __name__ == "__main__":`. The files a
worker inherits are its end of a pipe and the run folder's lock file: the parent holds the lock for the
run and hands each worker that descriptor, so that the folder counts as free only once every worker is
gone; workers never take a lock themselves. A worker exits when its parent dies (a thread waiting on the
parent's pidfd, and the parent-death signal when the fork server ends with the parent).

Messages carry plain containers and tensors only (the typed payloads as their state: `Delivery` down,
`SiteReply`'s report and upload up), written with torch.save and read with `weights_only=True`. A worker
trains its sites in the experiment's order with the seeds `Site` derives from (seed, site, round, epoch),
so the results equal the sequential run's at equal threads per site. A round counts only once the parent
has written its checkpoint: a worker that fails or is killed leaves the last completed round in place.
"""

from __future__ import annotations

import ctypes
import io
import multiprocessing
import os
import select
import signal
import threading
import traceback
from collections.abc import Mapping, Sequence
from multiprocessing import reduction
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from monai.fl.utils.exchange_object import ExchangeObject

from medfl.config import validate_model
from medfl.data import load_site
from medfl.errors import ConfigError, DataError, MedflError
from medfl.experiment import ExperimentConfig
from medfl.federated.payloads import Delivery, upload_from_exchange
from medfl.federated.rounds import Progress, RoundReplies, SiteReply
from medfl.federated.server import SiteUpdate
from medfl.federated.site import Site
from medfl.models import build_model
from medfl.runfolder import FolderLock, RunFolder

if TYPE_CHECKING:
    from medfl.tasks import Task

WORKER_STARTUP_S = 6.0  # the workers' start-up, the fork server importing torch and MONAI: 2-3 s idle, 6-9 s loaded
AUTO_FACTOR = 4.0  # `auto` starts workers where a site's training over the run exceeds this many start-ups
STOP_SECONDS = 60.0  # a worker asked to stop has this long to finish before it is killed
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class WorkerLost(MedflError):
    """A worker process ended without answering; the round it was in is not kept."""


def cores_given() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def threads_per_worker(threads: int, workers: int) -> int:
    """Each worker's torch threads: the threads given shared out, at least one."""
    return max(1, threads // workers)


def worker_count(config: ExperimentConfig, setting: int | str, device: torch.device, task: Task) -> int:
    """Worker processes for a run: 1 trains the sites in this process (today's behaviour). On a GPU the workers
    share it, one process (its own CUDA context and stream) per worker, as many as its free memory holds by
    `site_memory_bytes`: `auto` picks no more, and a number that does not fit is refused before anything starts."""
    sites = len(config.sites)
    if setting == "auto":
        if sites < 2 or cores_given() < 2:
            return 1
        workers = auto_workers(sites, cores_given(), estimated_site_seconds(config, task, device))
        if device.type == "cuda" and workers > 1:
            workers = min(workers, fitting_workers(gpu_free_bytes(device), site_memory_bytes(config, task)))
        return max(1, workers)
    workers = max(1, min(int(setting), sites))
    if workers > 1 and device.type == "cuda":
        need, free = site_memory_bytes(config, task), gpu_free_bytes(device)
        fits = fitting_workers(free, need)
        if workers > fits:
            raise ConfigError(
                f"runtime.parallel_sites {setting}: {workers} site processes on {device} need about "
                f"{workers * need / 2**30:.1f} GiB ({need / 2**30:.2f} GiB each: models, gradients, optimizer state "
                f"and activations at batch size {config.batch_size}, and a CUDA context), {free / 2**30:.1f} GiB is "
                f"free; set it to at most {max(1, fits)} or auto")
    elif workers > 1 and device.type != "cpu":
        raise ConfigError(f"runtime.parallel_sites {setting}: sites train side by side on the CPU or a CUDA GPU; "
                          f"with device {device.type} set it to 1 or auto")
    return workers


CUDA_CONTEXT_BYTES = 600 * 2**20  # one process's CUDA context and library workspaces, about (it varies by card)
GPU_MEMORY_SHARE = 0.85  # workers plan on this share of the free memory (the allocator's caching, fragmentation)


def fitting_workers(free_bytes: float, site_bytes: float, share: float = GPU_MEMORY_SHARE) -> int:
    """How many site processes fit into `free_bytes` of GPU memory at `site_bytes` each."""
    return int(share * free_bytes // site_bytes) if site_bytes > 0 else 0


def gpu_free_bytes(device: torch.device) -> int:
    """Free memory of the GPU, as the driver reports it."""
    return int(torch.cuda.mem_get_info(device)[0])


def _experiment_network(config: ExperimentConfig, task: Task, channels: int) -> torch.nn.Module:
    """The experiment's network, freshly built: what a site trains, for the estimates made before a run."""
    model = config.model
    return build_model(model.name, task.key, num_classes=len(config.classes), in_channels=channels,
                       width=model.width, spatial_dims=task.spatial_dims, **model.options)


def site_memory_bytes(config: ExperimentConfig, task: Task) -> int:
    """One site's peak GPU memory, estimated on the CPU before anything starts: for every model the method
    trains, its parameters, their gradients and the optimizer's state (Adam: two moments, SGD with momentum:
    one), plus the activations a training step keeps for backward at the experiment's batch size (measured by
    counting the bytes autograd saves in one forward pass), plus a CUDA context."""
    settings = config.data
    channels = task.input_channels(load_site(config.load_sites()[0], settings, task=task).splits["train"][0])
    network = _experiment_network(config, task, channels)
    parameters = sum(p.numel() * p.element_size() for p in network.parameters())
    states = 2 if config.optimizer.name == "adam" else 1 if config.optimizer.momentum else 0
    saved: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    inputs = torch.randn(config.batch_size, channels, *task.network_input_size(settings))
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        logits, _ = network(inputs)
    activations = sum(saved.values()) + logits.numel() * logits.element_size()
    roles = len(config.spec.roles)
    return roles * (parameters * (2 + states) + activations) + CUDA_CONTEXT_BYTES


def auto_workers(sites: int, cores: int, site_seconds: float, startup_seconds: float = WORKER_STARTUP_S) -> int:
    """`auto`'s rule: one worker per site, at most one per core, where a site's estimated training over the
    run exceeds AUTO_FACTOR times the workers' start-up (paid once per run: one import, then forks); else 1."""
    if sites < 2 or cores < 2 or site_seconds <= AUTO_FACTOR * startup_seconds:
        return 1
    return min(sites, cores)


def estimated_site_seconds(config: ExperimentConfig, task: Task, device: torch.device | None = None) -> float:
    """A site's training over the whole run, estimated: the mean site's training batches per round (its
    records read, no dataset built) times one timed training step of the experiment's network on a random
    batch on `device` (the CPU by default), for every model the method trains, times the rounds. 0 where a
    site's data cannot be read (the run then reports it, in this process)."""
    import math
    import time


    settings = config.data
    try:
        records = [load_site(site, settings, task=task).splits["train"] for site in config.load_sites()]
    except DataError:
        return 0.0
    batches = sum(math.ceil(len(train) / config.batch_size) for train in records) / len(records)
    channels = task.input_channels(records[0][0])
    network = _experiment_network(config, task, channels)
    device = device or torch.device("cpu")
    network = network.to(device)
    inputs = torch.randn(config.batch_size, channels, *task.network_input_size(settings), device=device)
    seconds = math.inf
    for _ in range(2):  # the first step pays one-off allocations
        tick = time.perf_counter()
        logits, _ = network(inputs)
        logits.float().sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = min(seconds, time.perf_counter() - tick)
    return config.rounds * config.local_epochs * batches * seconds * len(config.spec.roles)


def assign_sites(samples: Mapping[str, int], workers: int, readers: Mapping[str, int] | None = None
                 ) -> list[list[str]]:
    """Sites to workers so that they finish together: the largest site first, each to the least loaded worker
    (among equally loaded ones, the one that already read it); each worker's sites in the given order."""
    loads, owned = [0] * workers, [[] for _ in range(workers)]
    for site in sorted(samples, key=lambda name: -samples[name]):
        least = [index for index in range(workers) if loads[index] == min(loads)]
        index = (readers or {}).get(site, least[0])
        index = index if index in least else least[0]
        loads[index] += samples[site]
        owned[index].append(site)
    order = list(samples)
    return [sorted(sites, key=order.index) for sites in owned if sites]


def _send(connection: Connection, message: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(message, buffer)
    connection.send_bytes(buffer.getbuffer())


def _receive(connection: Connection) -> dict[str, Any]:
    return torch.load(io.BytesIO(connection.recv_bytes()), weights_only=True)


def _medfl_error(kind: str | None, message: str) -> BaseException:
    """The parent's exception for a worker's: the same MedflError class where there is one."""
    if kind is None:
        return RuntimeError(f"a worker process failed:\n{message}")
    classes, seen = [MedflError], []
    while classes:
        cls = classes.pop()
        if cls.__name__ == kind:
            return cls(message)
        seen.append(cls)
        classes.extend(sub for sub in cls.__subclasses__() if sub not in seen)
    return MedflError(message)


class _InheritedFd:
    """A descriptor the worker inherits (sent along when it starts): the run folder's lock file."""

    def __init__(self, fd: int | None):
        self.fd = fd

    def __reduce__(self):
        return (_inherited, (None if self.fd is None else reduction.DupFd(self.fd),))


def _inherited(duplicate: Any) -> int | None:
    return None if duplicate is None else duplicate.detach()


def _context() -> Any:
    """Workers fork from multiprocessing's fork server, which imported this module (torch, MONAI) once."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__, "medfl.federated.site"])
    return context


class _Worker:
    """The parent's handle on one worker process and the sites it owns."""

    def __init__(self, process: Any, connection: Connection):
        self.process, self.connection = process, connection
        self.sites: list[str] = []

    @classmethod
    def spawn(cls, lock_fd: int | None, task: Task) -> _Worker:
        context = _context()
        ours, theirs = context.Pipe()
        process = context.Process(target=worker_main, args=(theirs, os.getpid(), _InheritedFd(lock_fd), task),
                                  daemon=True, name="medfl-site-worker")
        process.start()
        theirs.close()
        return cls(process, ours)

    def send(self, message: dict[str, Any], round_: int | None = None) -> None:
        try:
            _send(self.connection, message)
        except OSError:
            raise self.lost(round_) from None

    def lost(self, round_: int | None = None) -> WorkerLost:
        self.process.join(timeout=5)
        code = self.process.exitcode
        how = ("still running" if code is None else f"killed by {signal.Signals(-code).name}" if code < 0
               else f"exit status {code}")
        sites = ", ".join(f"'{name}'" for name in self.sites) or "(not yet assigned)"
        where = "" if round_ is None else f" in round {round_}, which is not kept"
        return WorkerLost(f"the worker process of site(s) {sites} ended ({how}){where}")


class ParallelSites:
    """The sites of an experiment in worker processes, trained side by side; replies in the experiment's order."""

    def __init__(self, config: ExperimentConfig, run_dir: Path, device: torch.device, progress: Progress,
                 workers: int, threads: int | None = None, *, task: Task):
        self.config, self.run_dir, self.device, self.progress = config, Path(run_dir), device, progress
        self.task = task  # handed to every worker with its start (pickled by reference: a task is a class)
        self.workers_wanted = workers
        self.threads = threads_per_worker(threads or config.runtime.threads or cores_given(), workers)
        self.workers: list[_Worker] = []
        self.order: list[str] = []
        self.locks: list[FolderLock] = []  # each site's part of the run folder, held by this process

    @property
    def sites(self) -> list[str]:
        return list(self.order)

    # ----------------------------------------------------------------- life cycle
    def start(self) -> dict[str, ExchangeObject]:
        """Start the workers; each reads a share of the sites' records, then the sites are assigned by their
        training samples and every worker builds its sites' datasets and models. Every data problem is
        reported together, in the experiment's order; nothing is written."""
        try:
            return self._start()
        except BaseException:
            self._stop(force=True)
            raise

    def _start(self) -> dict[str, ExchangeObject]:
        names = [site.name for site in self.config.load_sites()]
        self._spawn()
        readers = {name: index % len(self.workers) for index, name in enumerate(names)}
        for index, worker in enumerate(self.workers):
            worker.send({"kind": "read", "sites": [n for n in names if readers[n] == index]})
        samples, problems = {}, {}
        for answer in self._answers("read"):
            samples.update(answer["samples"])
            problems.update(answer["problems"])
        self._raise_problems(names, problems)
        shares = assign_sites({name: samples[name] for name in names}, len(self.workers), readers)
        for worker, share in zip(self.workers, shares, strict=False):
            worker.sites = share
        self._stop_idle(self.workers[len(shares):])
        self.workers = self.workers[:len(shares)]
        for worker in self.workers:
            worker.send({"kind": "start", "sites": worker.sites})
        statistics = {}
        for answer in self._answers("started"):
            statistics.update(answer["statistics"])
            problems.update(answer["problems"])
        self._raise_problems(names, problems)
        self.order = names
        return {name: ExchangeObject(statistics=statistics[name]) for name in names}

    def _spawn(self) -> None:
        lock = RunFolder(self.run_dir).lock().acquire()  # re-entrant: the run holds it already
        try:
            fd = lock.fileno()
            for _ in range(min(self.workers_wanted, len(self.config.sites))):
                self.workers.append(_Worker.spawn(fd, self.task))
        finally:
            lock.release()
        setup = {"config": self.config.resolved(), "source": str(self.config.source_path or self.run_dir),
                 "run_dir": str(self.run_dir), "threads": self.threads, "device": str(self.device)}
        for worker in self.workers:
            worker.send({"kind": "setup", **setup})

    @staticmethod
    def _raise_problems(names: Sequence[str], problems: Mapping[str, str]) -> None:
        if problems:
            raise DataError("\n".join(problems[name] for name in names if name in problems))

    def open(self, folder: RunFolder, resume_round: int | None) -> None:
        try:
            for name in self.order:
                self.locks.append(folder.site(name).lock().acquire())  # the workers write under this process's hold
            for worker in self.workers:
                worker.send({"kind": "open", "resume_round": resume_round})
            for _ in self._answers("opened"):
                pass
        except BaseException:
            self._stop(force=True)
            raise

    def train(self, round_: int, deliveries: Mapping[str, Delivery | None], upload: bool) -> RoundReplies:
        """One round at every worker at once; each site's report and upload, in the experiment's order."""
        try:
            for worker in self.workers:
                states = {name: None if deliveries.get(name) is None else deliveries[name].state_dict()
                          for name in worker.sites}
                worker.send({"kind": "train", "round": round_, "deliveries": states, "upload": upload}, round_)
            replies: dict[str, SiteReply] = {}
            for answer in self._answers("trained", round_):
                for name, reply in answer["replies"].items():
                    update = reply["upload"]
                    replies[name] = SiteReply(report=reply["report"],
                                              upload=None if update is None else SiteUpdate(**update))
            return RoundReplies(replies={name: replies[name] for name in self.order})
        except BaseException:
            self._stop(force=True)
            raise

    def finish(self, folder: RunFolder) -> None:
        """In process, every site's part lies in the run folder itself: nothing to send."""

    def finalize(self) -> None:
        self._stop(force=False)
        while self.locks:
            self.locks.pop().release()

    # ----------------------------------------------------------------- messages
    def _answers(self, kind: str, round_: int | None = None):
        """Each worker's answer `kind`, as it arrives; progress events are passed on meanwhile."""
        pending = {worker.connection: worker for worker in self.workers}
        ended = {worker.process.sentinel: worker for worker in self.workers}
        while pending:
            watched = [*pending, *(s for s, w in ended.items() if w.connection in pending)]
            for ready in wait(watched):
                worker = pending.get(ready) or ended[ready]
                if worker.connection not in pending:
                    continue
                if ready is not worker.connection and not worker.connection.poll():
                    raise worker.lost(round_)  # it ended without a word
                try:
                    message = _receive(worker.connection)
                except (EOFError, OSError):
                    raise worker.lost(round_) from None
                if message["kind"] in ("site", "epoch"):
                    self.progress(message["kind"], message["info"])
                elif message["kind"] == "error":
                    raise _medfl_error(message["type"], message["message"])
                elif message["kind"] == kind:
                    del pending[worker.connection]
                    yield message

    def _stop_idle(self, workers: Sequence[_Worker]) -> None:
        for worker in workers:
            try:
                _send(worker.connection, {"kind": "stop"})
            except OSError:
                pass
        self._join(workers, force=False)

    def _stop(self, force: bool) -> None:
        """Stop every worker: asked to finish (after a completed round) or, after a failure or an interrupt,
        terminated at once; in either case gone before this returns."""
        if not force:
            self._stop_idle(self.workers)
        self._join(self.workers, force=True)
        self.workers = []

    @staticmethod
    def _join(workers: Sequence[_Worker], force: bool) -> None:
        for worker in workers:
            if force and worker.process.is_alive():
                worker.process.kill()
            worker.process.join(timeout=None if force else STOP_SECONDS)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.connection.close()


# --------------------------------------------------------------------- the worker process
def _exit_with_parent(parent: int) -> None:
    """Die with the parent: a thread waiting on the parent's pidfd (Linux), and the parent-death signal from
    the fork server, which ends with the parent. Elsewhere the end of the pipe stops the worker when it next
    waits for a message."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if hasattr(os, "pidfd_open"):
        try:
            watched = os.pidfd_open(parent)
        except OSError:
            os._exit(1)  # already gone
        threading.Thread(target=_exit_when_readable, args=(watched,), daemon=True).start()


def _exit_when_readable(fd: int) -> None:
    select.select([fd], [], [])
    os._exit(1)


def worker_main(connection: Connection, parent: int, lock_fd: int | None, task: Task) -> None:
    """A worker's life: the parent's messages, one at a time, until it says stop or goes away. `lock_fd`, the
    run folder's lock file, stays open until the process ends."""
    _exit_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops the workers
    try:
        setup = _receive(connection)
        torch.set_num_threads(setup["threads"])
        config = validate_model(ExperimentConfig, setup["config"], setup["source"])
        worker = _SiteWorker(connection, config, Path(setup["run_dir"]), task, torch.device(setup["device"]))
        while worker.serve(_receive(connection)):
            pass
    except (EOFError, BrokenPipeError, ConnectionResetError):
        os._exit(1)  # the parent is gone
    except MedflError as error:
        _send(connection, {"kind": "error", "type": type(error).__name__, "message": str(error)})
    except Exception:
        _send(connection, {"kind": "error", "type": None, "message": traceback.format_exc()})


class _SiteWorker:
    """The sites one worker owns, driven through their ClientAlgo interface as LocalSites drives them."""

    def __init__(self, connection: Connection, config: ExperimentConfig, run_dir: Path, task: Task,
                 device: torch.device):
        self.connection, self.config, self.run_dir, self.task = connection, config, run_dir, task
        self.device = device  # the CPU, or the GPU the workers share (each its own CUDA context)
        self.site_configs = {site.name: site for site in config.load_sites()}
        self.records: dict[str, Any] = {}
        self.sites: dict[str, Any] = {}

    def send(self, message: dict[str, Any]) -> None:
        _send(self.connection, message)

    def serve(self, message: dict[str, Any]) -> bool:
        """Answer one message; False once told to stop."""
        kind = message["kind"]
        if kind == "stop":
            for site in self.sites.values():
                site.finalize()
            return False
        getattr(self, f"_{kind}")(message)
        return True

    def _read(self, message: dict[str, Any]) -> None:
        samples, problems = {}, {}
        for name in message["sites"]:
            try:
                self.records[name] = load_site(self.site_configs[name], self.config.data, task=self.task)
            except DataError as error:
                problems[name] = str(error)
                continue
            samples[name] = len(self.records[name].splits["train"])
        self.send({"kind": "read", "samples": samples, "problems": problems})

    def _start(self, message: dict[str, Any]) -> None:
        statistics, problems = {}, {}
        for name in message["sites"]:
            site = Site(self.site_configs[name], self.config, self.run_dir, self.device, task=self.task)
            site.data = self.records.pop(name, None)  # read again where the site moved from another worker
            site.on_epoch = lambda info: self.send({"kind": "epoch", "info": info})
            try:
                site.initialize()
            except DataError as error:
                problems[name] = str(error)
                continue
            self.sites[name] = site
            statistics[name] = site.get_data_stats().statistics
        self.records.clear()
        self.send({"kind": "started", "statistics": statistics, "problems": problems})

    def _open(self, message: dict[str, Any]) -> None:
        for site in self.sites.values():
            site.open_folder()
            if message["resume_round"] is not None:
                site.restart_after(message["resume_round"])
        self.send({"kind": "opened"})

    def _train(self, message: dict[str, Any]) -> None:
        round_, replies = message["round"], {}
        for name, site in self.sites.items():
            self.send({"kind": "site", "info": {"round": round_, "site": name}})
            delivery = Delivery.from_state_dict(message["deliveries"].get(name))
            site.train(delivery.to_exchange() if delivery is not None else None, {"round": round_})
            report = site.evaluate().metrics or {}
            update = upload_from_exchange(site.get_weights()) if message["upload"] else None
            site.save_state()
            replies[name] = {"report": report, "upload": None if update is None else vars(update)}
        self.send({"kind": "trained", "replies": replies})
