"""The sites of an experiment in this process: the in-process `Federation` of the shared round loop.

`LocalSites` builds each `Site` (a MONAI ClientAlgo) from its site config, reads every site's data and builds
its models before anything is written (all data problems reported together), then trains the sites one after
another each round. `medfl.federated.coordinator.Coordinator` drives it (or `medfl.federated.pooled.PooledSites`,
which builds on it).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from monai.fl.utils.exchange_object import ExchangeObject

from medfl.errors import DataError
from medfl.experiment import ExperimentConfig
from medfl.federated.payloads import Delivery, upload_from_exchange
from medfl.federated.rounds import Progress, RoundReplies, SiteReply
from medfl.federated.site import Site
from medfl.runfolder import FolderLock, RunFolder

if TYPE_CHECKING:
    from medfl.tasks import Task


class LocalSites:
    """The sites of an experiment, in this process, in the experiment's order."""

    def __init__(self, config: ExperimentConfig, run_dir: Path, device: torch.device, progress: Progress, *,
                 task: Task):
        self.config = config
        self.task = task
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
            site = Site(site_config, self.config, self.run_dir, self.device, task=self.task)
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
