"""The in-process coordinator: every site of an experiment in this process, played by the shared round loop.

`LocalSites` (medfl.federated.local_sites) is the in-process `Federation`: it builds each `Site` (a MONAI
ClientAlgo) from its site config, reads every site's data and builds its models before anything is written (all
data problems reported together), then trains the sites one after another each round; pooled training's
`PooledSites` (medfl.federated.pooled) builds on it. `Coordinator` ties the federation to the server's side
(`medfl.federated.rounds`) and a run folder; `medfl run` and the benchmarks use it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from medfl.devices import resolve_device
from medfl.experiment import ExperimentConfig
from medfl.federated.local_sites import LocalSites
from medfl.federated.parallel import ParallelSites, worker_count
from medfl.federated.payloads import Delivery
from medfl.federated.pooled import PooledSites
from medfl.federated.rounds import Server, run_rounds
from medfl.federated.site import Site

if TYPE_CHECKING:
    from medfl.tasks import Task


class Coordinator:
    """Runs an experiment's rounds over its sites in this process and writes everything into one run folder."""

    def __init__(
        self,
        config: ExperimentConfig,
        run_dir: str | Path,
        device: torch.device | None = None,
        progress: Callable[[str, dict[str, Any]], None] | None = None,
        parallel: int | str | None = None,
        *,
        task: Task,
    ):
        if task.spatial_dims != config.data.dims:
            raise ValueError(f"a {task.spatial_dims}-D {task.key} task cannot run the {config.data.dims}-D experiment "
                             f"'{config.name}' (task_for(key, experiment) gives the experiment's task)")
        self.config = config
        self.parallel = config.runtime.parallel_sites if parallel is None else parallel  # `medfl run --parallel`
        self.run_dir = Path(run_dir)
        self.device = device or resolve_device(config.device)
        self.progress = progress or (lambda event, info: None)
        self.federation = self._federation(task)
        self.server = Server(config, self.device, [])

    def _federation(self, task: Task) -> LocalSites | ParallelSites:
        """The sites, each training its own models (in this process, or side by side in worker processes); or,
        for pooled training, one model on all their data."""
        if self.config.spec.pools_data:
            return PooledSites(self.config, self.run_dir, self.device, self.progress, task=task)
        workers = worker_count(self.config, self.parallel, self.device, task)
        if workers > 1:
            return ParallelSites(self.config, self.run_dir, self.device, self.progress, workers, task=task)
        return LocalSites(self.config, self.run_dir, self.device, self.progress, task=task)

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
