"""The one round loop of a run, whatever carries the messages: sites in this process or NVFlare clients.

A `Federation` reaches the sites (start: each site's data statistics and network; a round: each site trains on
what the server delivers and reports back). `Server` holds the server's side of a run in its `RunFolder`:
the strategy, what each site receives next, the timing, the run log, the checkpoint that marks a round
complete, and the run's tables. `run_rounds` plays a run from its first or next round to the last.

Nothing is written before every check passed: the federation starts (in process: every site's data read and
its models built) before the run folder is created. After every round the server aggregates, also after the
last one, so that a run extended to more rounds continues exactly as a fresh longer run would.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from monai.fl.utils.exchange_object import ExchangeObject

from medfl.errors import MedflError
from medfl.experiment import ExperimentConfig
from medfl.federated.payloads import Delivery
from medfl.federated.server import SiteUpdate, Strategy, build_strategy
from medfl.models import build_model
from medfl.runfolder import RunFolder
from medfl.runlog import RunLog
from medfl.task_facts import facts_for
from medfl.tensorboard import write_round_scalars

ANSWERED = "answered"
Progress = Callable[[str, dict[str, Any]], None]


@dataclass
class SiteReply:
    """One site's part of a round as the server sees it: its evaluation report and (when it uploads) its
    upload. A site that failed or did not answer has no reply and a status saying so."""

    report: dict[str, Any]
    upload: SiteUpdate | None = None


@dataclass
class RoundReplies:
    replies: dict[str, SiteReply] = field(default_factory=dict)
    statuses: dict[str, str] = field(default_factory=dict)  # every site: answered, failed (...), no answer


class Federation(Protocol):
    """How the server reaches its sites."""

    sites: list[str]

    def start(self) -> dict[str, ExchangeObject]:
        """Every site that can take part: its data statistics (class counts, sample count, network). Raises
        when no site can; nothing may be written before this returns."""

    def open(self, folder: RunFolder, resume_round: int | None) -> None:
        """The run folder exists: sites start (or check) their own part; on a resume, continue after
        `resume_round` (-1: the run restarts at round 0)."""

    def train(self, round_: int, deliveries: Mapping[str, Delivery | None], upload: bool) -> RoundReplies:
        """One round at every site, on what the server delivers to each."""

    def finish(self, folder: RunFolder) -> None:
        """The run is complete: sites whose part lies elsewhere get their own results (see RunFolder)."""


def strategy_options(config: ExperimentConfig) -> dict[str, Any]:
    """The strategy's keyword settings from the experiment config."""
    aggregation = config.spec.aggregation
    options: dict[str, Any] = {"prototype_mode": config.cpa.prototype_mode, "seed": config.seed}
    if aggregation == "pfa":
        options.update(start=config.pfa.start, end=config.pfa.end, share_phase=config.pfa.share_phase,
                       weighting=config.pfa.weighting)
    elif aggregation in ("fedavg", "fedbn", "silobn", "fedper"):
        options["weighting"] = config.baselines.fedavg_weighting
    return options


def _peak_rss_mb() -> float:
    """This process's peak resident memory. Linux's ru_maxrss survives exec (a child started from a large
    parent reports the parent's peak), so /proc's VmHWM is read where it exists."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    usage = {"peak_rss_mb": _peak_rss_mb()}
    if device.type == "cuda":
        usage["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return usage


class Server:
    """The server's side of a run: strategy, deliveries, timing and run log, kept in the run folder."""

    def __init__(self, config: ExperimentConfig, device: torch.device, sites: list[str]):
        self.config = config
        self.device = device
        self.sites = list(sites)
        self.strategy: Strategy | None = None
        self.deliveries: dict[str, Delivery | None] = {}
        self.timing: list[dict[str, Any]] = []
        self.log = RunLog()
        self.folder: RunFolder | None = None

    def begin(self, starts: Mapping[str, ExchangeObject]) -> None:
        """The strategy (parameter roles from the sites' network) and the first delivery: global class counts."""
        statistics = [exchange.statistics or {} for exchange in starts.values()]
        network = statistics[0]["network"]
        self.strategy = build_strategy(self.config.method, build_model(**network), self.config.rounds,
                                       **strategy_options(self.config))
        counts = torch.stack([torch.as_tensor(s["class_counts"]) for s in statistics]).sum(0)
        self.deliveries = dict.fromkeys(self.sites, Delivery(global_class_counts=counts))

    def restore(self, round_: int) -> None:
        """The server's state after `round_`, from the run folder's checkpoint."""
        state = self.folder.load_checkpoint()
        if int(state["round"]) != round_:
            raise MedflError(f"{self.folder.checkpoint_file}: holds round {state['round']}, expected {round_}")
        if self.strategy is not None and state["strategy"] is not None:
            self.strategy.load_state_dict(state["strategy"])
        self.deliveries = {name: Delivery.from_state_dict(d) for name, d in state["deliveries"].items()}
        self.timing = list(state["timing"])
        self.log.load_state_dict(state["log"])

    def aggregate(self, round_: int, uploads: Mapping[str, SiteUpdate]) -> float:
        """What each site receives next (None for all when no site uploaded); the seconds it took."""
        if self.strategy is None or not uploads:
            self.deliveries = dict.fromkeys(self.sites)
            return 0.0
        tick = time.perf_counter()
        on_device = {site: replace(update, weights={k: v.to(self.device) for k, v in update.weights.items()})
                     for site, update in uploads.items()}
        aggregate = self.strategy.aggregate(round_, on_device)
        seconds = time.perf_counter() - tick
        self.deliveries = {site: Delivery.from_aggregate(aggregate, site) for site in self.sites}
        return seconds

    def complete_round(self, round_: int, replies: RoundReplies, started: float) -> dict[str, Any]:
        """Log the reports, aggregate, checkpoint (which marks the round complete) and rewrite the run's files."""
        timing = {"round": round_, "train_s": 0.0, "eval_s": 0.0, "eval_samples": 0, "aggregation_s": 0.0}
        for site, reply in replies.replies.items():
            for key in ("train_s", "eval_s", "eval_samples"):
                timing[key] += reply.report.get("timing", {}).get(key, 0)
            self.log.add(site, reply.report)
        uploads = {site: r.upload for site, r in replies.replies.items() if r.upload is not None}
        timing["aggregation_s"] = self.aggregate(round_, uploads)
        timing["round_s"] = time.perf_counter() - started
        timing.update(peak_memory_mb(self.device))
        self.timing.append(timing)
        if replies.statuses:  # a federation whose sites may fail or not answer (NVFlare) says who took part
            self.folder.write_participation(round_, replies.statuses)
        self.folder.save_checkpoint(self.checkpoint(round_))
        return self.write_outputs(round_)

    def checkpoint(self, round_: int) -> dict[str, Any]:
        """The server's state after `round_`: tensors and plain containers only (read with weights_only)."""
        return {
            "round": round_,
            "strategy": self.strategy.state_dict() if self.strategy is not None else None,
            "deliveries": {name: d.state_dict() if d is not None else None for name, d in self.deliveries.items()},
            "timing": self.timing,
            "log": self.log.state_dict(),
        }

    def write_outputs(self, round_: int) -> dict[str, Any]:
        header = {
            "experiment": self.config.name,
            "method": self.config.method,
            "task": self.config.task,
            "metric": facts_for(self.config.task).metric,
            "completed_rounds": round_ + 1,
            "rounds": self.config.rounds,
            "finished": round_ + 1 == self.config.rounds,
            "device": str(self.device),
        }
        used = self.config.spec.used_role.value
        summary = self.log.summary(header, self.timing, used, header["metric"], round_, self.config.local_epochs)
        self.folder.write_tables(self.log.ordered_rows(), self.log.ordered_det(), self.log.ordered_retrogress(),
                                 self.timing, summary)
        write_round_scalars(self.folder.tensorboard_dir, round_, self.config.local_epochs, self.log.rows,
                            self.log.det, self.log.retrogress, self.timing)
        return summary


def run_rounds(config: ExperimentConfig, root: str | Path, federation: Federation, server: Server,
               resume: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    """Play a run from its first round (or, resuming, its next one) to its last; the final summary."""
    with RunFolder(root).lock(create=not resume):  # one process per run folder (re-entrant: `medfl run` holds it)
        return _play(config, root, federation, server, resume, progress or (lambda event, info: None))


def _play(config: ExperimentConfig, root: str | Path, federation: Federation, server: Server, resume: bool,
          progress: Progress) -> dict[str, Any]:
    if resume:
        folder = RunFolder.open(root)
        start = folder.resume_from(config)
    else:
        RunFolder(root).refuse_to_start()
        start = 0
    starts = federation.start()
    if not resume:
        folder = RunFolder.create(root, config)
    server.folder = folder
    server.begin(starts)
    federation.open(folder, start - 1 if resume else None)
    if resume:  # after the sites' checks of their data: a refused resume leaves the run's plan as it was
        folder.continue_with(config)
    if start > 0:
        server.restore(start - 1)
    progress("start", {"rounds": config.rounds, "start": start, "sites": list(federation.sites),
                       "epochs": config.local_epochs})
    summary: dict[str, Any] = {}
    upload = config.spec.communicates
    for round_ in range(start, config.rounds):
        started = time.perf_counter()
        replies = federation.train(round_, server.deliveries, upload)
        summary = server.complete_round(round_, replies, started)
        progress("round", {"round": round_, "timing": server.timing[-1], "summary": summary})
    federation.finish(folder)
    progress("end", {"summary": summary})
    return summary
