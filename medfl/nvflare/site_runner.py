"""The site-side adapter: NVFlare's Client API drives the very medfl Site the in-process coordinator drives.

`SiteRunner` answers the controller's tasks with one `Site` (a MONAI ClientAlgo): `data_stats` ->
initialize and get_data_stats; `train` -> train, evaluate, get_weights, save_state, in the coordinator's
order, so that a site computes over NVFlare exactly what it computes in process. The site keeps its state
in `<run dir>/sites/<name>/` as in process, and holds that folder's lock from its first task that reads or
writes it until its process ends: after a failure, a missed round or a restarted job it resumes from the
newest saved round before the one asked for. Any failure is answered with a failure reply naming
only the error's type (details go to the site's log), and the site rejoins at the next round.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from nvflare.app_common.abstract.fl_model import FLModel

from medfl.config import SiteConfig, load_yaml_mapping
from medfl.devices import resolve_device
from medfl.errors import ConfigError, MedflError
from medfl.experiment import ExperimentConfig, load_experiment_config
from medfl.federated.payloads import Delivery
from medfl.federated.site import Site
from medfl.nvflare import refuse_in_process_only
from medfl.nvflare.layout import EXPERIMENT_FILE, JOB_FILE, resolve_run_dir, site_config_path
from medfl.nvflare.payloads import (
    TASK_DATA_STATS,
    TASK_RESULTS,
    TASK_TRAIN,
    failure_reply,
    read_results_task,
    read_train_task,
    results_reply,
    stats_reply,
    task_kind,
    train_reply,
)
from medfl.runfolder import FolderLock, RunFolder
from medfl.tasks import task_for

logger = logging.getLogger(__name__)


def load_job_configs(config_dir: Path, site_name: str) -> tuple[ExperimentConfig, SiteConfig]:
    """The job's experiment config and this site's config, checked against each other and the NVFlare name."""
    experiment = load_experiment_config(config_dir / EXPERIMENT_FILE)
    path = site_config_path(config_dir).resolve()
    experiment = experiment.model_copy(update={"sites": [path]})
    site_config = experiment.load_sites()[0]
    if site_config.name != site_name:
        raise ConfigError(
            f"{path}: this site config is for site '{site_config.name}', but this NVFlare client is "
            f"'{site_name}' (site names must equal the client names of the NVFlare project)"
        )
    return experiment, site_config


class SiteRunner:
    """Answers the medfl controller's tasks with one Site, built lazily and rebuilt after a failure."""

    def __init__(self, site_config: SiteConfig, experiment: ExperimentConfig, run_dir: str | Path,
                 device: torch.device | str = "cpu"):
        self.site_config = site_config
        self.experiment = experiment
        self.run_dir = Path(run_dir)
        self.device = torch.device(device)
        self.site: Site | None = None
        self.opened = False
        self.lock: FolderLock | None = None  # the site's part of the run folder, held until the process ends

    @property
    def name(self) -> str:
        return self.site_config.name

    def handle(self, model: FLModel) -> FLModel:
        """The reply to one task from the controller; never raises, so that the site stays in the job."""
        round_, task = None, task_kind(model)
        if task not in (TASK_DATA_STATS, TASK_TRAIN, TASK_RESULTS):
            logger.error("site '%s': unknown task '%s'", self.name, task)
            return failure_reply(None, "UnknownTask")
        try:
            if task == TASK_DATA_STATS:
                return self._data_stats()
            if task == TASK_RESULTS:
                self._hold_folder()
                return results_reply(RunFolder(self.run_dir).keep_site_results(read_results_task(model)))
            train = read_train_task(model)
            round_ = train.round
            self._hold_folder()
            return self._train(train.delivery, train.round, train.upload)
        except Exception as error:  # reported to the server by type only; the site rejoins next round
            logger.exception("site '%s': task '%s' (round %s) failed: %s", self.name, task, round_, error)
            self.site, self.opened = None, False  # drop half-trained models: the next task resumes from the last saved round
            return failure_reply(round_, type(error).__name__)

    def _hold_folder(self) -> None:
        """Take the site's part of the run folder before it is read or written, and keep it until the process
        ends (FolderInUse while another process, e.g. another job's site, drives it)."""
        if self.lock is None:
            self.lock = RunFolder(self.run_dir).site(self.name).lock().acquire()

    def _ready_site(self) -> Site:
        """The Site, its data read and checked (nothing written yet: the server creates the run folder once
        every site has reported)."""
        if self.site is None:
            site = Site(self.site_config, self.experiment, self.run_dir, self.device,
                        task=task_for(self.experiment.task, self.experiment))
            site.initialize()
            self.site = site
        return self.site

    def _data_stats(self) -> FLModel:
        return stats_reply(self._ready_site().get_data_stats().statistics or {})

    def _catch_up(self, site: Site, round_: int) -> None:
        """Make the site's last completed round `round_ - 1`, or the newest saved round before it."""
        if site.round == round_ - 1:
            return
        earlier = [r for r in site.folder.saved_rounds() if r < round_]
        if earlier:
            site.restart_after(earlier[-1])
            logger.info("site '%s': resumed from the state saved after round %d", self.name, earlier[-1])
        elif round_ == 0:
            site.restart_after(-1)
        elif site.round >= round_:
            raise MedflError(
                f"site '{self.name}': asked for round {round_} but holds round {site.round} and no earlier state"
            )

    def _train(self, delivery: Delivery | None, round_: int, upload: bool) -> FLModel:
        site = self._ready_site()
        if not self.opened:  # the site's own part of the run folder: started, or checked against its data
            site.open_folder()
            self.opened = True
        self._catch_up(site, round_)
        site.train(delivery.to_exchange() if delivery is not None else None, {"round": round_})
        report = site.evaluate().metrics or {}
        exchange = site.get_weights() if upload else None
        site.save_state()
        return train_reply(round_, report, exchange)


def build_runner(config_dir: Path, site_name: str) -> SiteRunner:
    """The runner of this site from the job's config folder (and `MEDFL_SITE_CONFIG` / `MEDFL_RUN_DIR`)."""
    experiment, site_config = load_job_configs(config_dir, site_name)
    refuse_in_process_only(experiment)  # its training data would have to leave the site
    run_dir = load_yaml_mapping(config_dir / JOB_FILE).get("run_dir")
    if not run_dir:
        raise ConfigError(f"{config_dir / JOB_FILE}: no 'run_dir'")
    if experiment.runtime.threads:
        torch.set_num_threads(experiment.runtime.threads)
    return SiteRunner(site_config, experiment, resolve_run_dir(run_dir), resolve_device(experiment.device))


def main(config_dir: str | Path) -> None:
    """The Client API loop of one site (run by the job's `custom/medfl_site.py`)."""
    import nvflare.client as flare

    flare.init()
    name = flare.get_site_name()
    runner: SiteRunner | None = None
    setup_error = ""
    try:
        runner = build_runner(Path(config_dir), name)
    except MedflError as error:
        logger.error("site '%s' cannot take part: %s", name, error)
        setup_error = type(error).__name__
    while flare.is_running():
        model = flare.receive()
        if model is None:
            break
        flare.send(runner.handle(model) if runner is not None else failure_reply(None, setup_error))
