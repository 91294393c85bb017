"""The in-process coordinator: every site of an experiment in this process, played by the shared round loop.

`LocalSites` is the in-process `Federation`: it builds each `Site` (a MONAI ClientAlgo) from its site config,
reads every site's data and builds its models before anything is written (all data problems reported
together), then trains the sites one after another each round. `Coordinator` ties it to the server's side
(`medfl.federated.rounds`) and a run folder; `medfl run` and the benchmarks use it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from monai.fl.utils.exchange_object import ExchangeObject

from medfl.devices import resolve_device
from medfl.errors import DataError
from medfl.experiment import ExperimentConfig
from medfl.federated.parallel import ParallelSites, worker_count
from medfl.federated.payloads import Delivery, upload_from_exchange
from medfl.federated.rounds import Progress, RoundReplies, Server, SiteReply, run_rounds
from medfl.federated.site import Site
from medfl.runfolder import FolderLock, RunFolder


class LocalSites:
    """The sites of an experiment, in this process, in the experiment's order."""

    def __init__(self, config: ExperimentConfig, run_dir: Path, device: torch.device, progress: Progress):
        self.config = config
        self.run_dir = run_dir
        self.device = device
        self.progress = progress
        self.by_name: dict[str, Site] = {}
        self.locks: list[FolderLock] = []  # each site's part of the run folder, held from open to finalize

    @property
    def sites(self) -> list[str]:
        return list(self.by_name)

    def start(self) -> dict[str, ExchangeObject]:
        """Read and check every site's data and build its models; every data problem is reported together."""
        problems: list[str] = []
        for site_config in self.config.load_sites():
            site = Site(site_config, self.config, self.run_dir, self.device)
            site.on_epoch = lambda info: self.progress("epoch", info)
            try:
                site.initialize()
            except DataError as error:
                problems.append(str(error))
                continue
            self.by_name[site.name] = site
        if problems:
            raise DataError("\n".join(problems))
        return {name: site.get_data_stats() for name, site in self.by_name.items()}

    def open(self, folder: RunFolder, resume_round: int | None) -> None:
        for site in self.by_name.values():
            self.locks.append(site.folder.lock().acquire())  # refused while a site's own process (NVFlare) uses it
            site.open_folder()
            if resume_round is not None:
                site.restart_after(resume_round)

    def train(self, round_: int, deliveries: Mapping[str, Delivery | None], upload: bool) -> RoundReplies:
        """Each site's round through its ClientAlgo interface: the typed payloads become ExchangeObjects here."""
        replies = RoundReplies()
        for name, site in self.by_name.items():
            self.progress("site", {"round": round_, "site": name})
            delivery = deliveries.get(name)
            site.train(delivery.to_exchange() if delivery is not None else None, {"round": round_})
            report = site.evaluate().metrics or {}
            exchange = upload_from_exchange(site.get_weights()) if upload else None
            site.save_state()
            if self.config.runtime.offload_idle_sites and self.device.type == "cuda":
                site.offload()
            replies.replies[name] = SiteReply(report=report, upload=exchange)
        return replies

    def finish(self, folder: RunFolder) -> None:
        """In process, every site's part lies in the run folder itself: nothing to send."""

    def finalize(self) -> None:
        for site in self.by_name.values():
            site.finalize()
        while self.locks:
            self.locks.pop().release()


class Coordinator:
    """Runs an experiment's rounds over its sites in this process and writes everything into one run folder."""

    def __init__(
        self,
        config: ExperimentConfig,
        run_dir: str | Path,
        device: torch.device | None = None,
        progress: Callable[[str, dict[str, Any]], None] | None = None,
        parallel: int | str | None = None,
    ):
        self.config = config
        self.parallel = config.runtime.parallel_sites if parallel is None else parallel  # `medfl run --parallel`
        self.run_dir = Path(run_dir)
        self.device = device or resolve_device(config.device)
        self.progress = progress or (lambda event, info: None)
        self.federation = self._federation()
        self.server = Server(config, self.device, [])

    def _federation(self) -> LocalSites | ParallelSites:
        """The sites, each training its own models (in this process, or side by side in worker processes); or,
        for pooled training, one model on all their data."""
        if self.config.spec.pools_data:
            from medfl.federated.pooled import PooledSites  # it builds on LocalSites

            return PooledSites(self.config, self.run_dir, self.device, self.progress)
        workers = worker_count(self.config, self.parallel, self.device)
        if workers > 1:
            return ParallelSites(self.config, self.run_dir, self.device, self.progress, workers)
        return LocalSites(self.config, self.run_dir, self.device, self.progress)

    @property
    def sites(self) -> dict[str, Site]:
        return self.federation.by_name

    @property
    def strategy(self):
        return self.server.strategy

    @property
    def deliveries(self) -> dict[str, Delivery | None]:
        return self.server.deliveries

    @property
    def timing(self) -> list[dict[str, Any]]:
        return self.server.timing

    @property
    def log(self):
        return self.server.log

    def run(self, resume: bool = False) -> dict[str, Any]:
        """Play the run (or resume it after its last completed round); the final summary."""
        self.server.sites = [site.name for site in self.config.load_sites()]
        try:
            return run_rounds(self.config, self.run_dir, self.federation, self.server, resume, self.progress)
        finally:
            self.federation.finalize()
