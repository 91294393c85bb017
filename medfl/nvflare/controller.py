"""The server workflow: a ModelController that plays medfl's shared round loop over NVFlare sites.

`MedflController` is the `Federation` of medfl.federated.rounds for NVFlare: each round it sends every site
its own task (its own weights, keyed by site name, plus the federation's class counts and prototypes), waits
up to `round_timeout` seconds, and goes on with the sites that answered: they are aggregated; a site that
failed or did not answer keeps its model and receives the next round's task as usual. NVFlare's log and the
run folder's `participation.csv` (round, site, status) say which sites took part in each round. Everything
else (strategy, checkpoint, run log, the run folder's files, resume) is the in-process loop's own code, so a
restarted job resumes after the last completed round and the run folder reads like one written by `medfl run`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import torch
from monai.fl.utils.exchange_object import ExchangeObject
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.workflows.model_controller import ModelController
from nvflare.app_opt.pt.decomposers import TensorDecomposer
from nvflare.fuel.utils import fobs

from medfl.devices import resolve_device
from medfl.errors import MedflError
from medfl.experiment import ExperimentConfig, load_experiment_config
from medfl.federated.payloads import Delivery
from medfl.federated.rounds import ANSWERED, RoundReplies, Server, SiteReply, run_rounds
from medfl.nvflare import refuse_in_process_only
from medfl.nvflare.layout import CONFIG_FOLDER, EXPERIMENT_FILE, resolve_run_dir
from medfl.nvflare.payloads import (
    TASK_DATA_STATS,
    TASK_RESULTS,
    TASK_TRAIN,
    Reply,
    read_reply,
    results_task,
    stats_task,
    train_task,
)
from medfl.runfolder import RunFinished, RunFolder

NO_ANSWER = "no answer"


class _Aborted(Exception):
    """NVFlare asked the workflow to stop."""


class MedflController(ModelController):
    """Runs one medfl experiment over NVFlare sites named as in the site configs.

    Args:
        sites: the site names (NVFlare client names), in the experiment's order.
        run_dir: the server's run folder (`MEDFL_RUN_DIR` overrides it); it must outlive the job.
        start_timeout: seconds each site may take to load its data and answer the first task (0: no limit).
        round_timeout: seconds each site may take for one round, counted from the task's dispatch (0: no limit).
        experiment: the experiment config, relative to the server app's config folder.
    """

    def __init__(
        self,
        sites: list[str],
        run_dir: str,
        start_timeout: int = 3600,
        round_timeout: int = 3600,
        experiment: str = f"{CONFIG_FOLDER}/{EXPERIMENT_FILE}",
    ):
        super().__init__(persistor_id="", ignore_result_error=True)
        if not sites or len(set(sites)) != len(sites):
            raise ValueError(f"sites must be distinct names, got {sites}")
        self.sites = list(sites)
        self.run_dir = run_dir
        self.start_timeout = start_timeout
        self.round_timeout = round_timeout
        self.experiment = experiment

    def run(self) -> None:
        fobs.register(TensorDecomposer)
        try:
            self.run_experiment(load_experiment_config(Path(self.get_app_dir()) / "config" / self.experiment))
        except MedflError as error:
            self.panic(f"medfl: {error}")
        except _Aborted:
            self.warning("medfl: the job was aborted; the run folder keeps the last completed round")

    def run_experiment(self, config: ExperimentConfig) -> None:
        """Start or resume the run of `config` in the run folder and play its remaining rounds."""
        refuse_in_process_only(config)  # a job not written by `medfl nvflare-job`
        if config.runtime.threads:
            torch.set_num_threads(config.runtime.threads)
        root = resolve_run_dir(self.run_dir)
        with RunFolder(root).lock(create=True):  # one process per run folder, held before it is read
            resume = RunFolder(root).record_file.is_file()
            self.rounds_planned = config.rounds
            self.info(f"medfl: {'resuming' if resume else 'starting'} {config.name} ({config.method}) in {root}, "
                      f"sites {', '.join(self.sites)}")
            server = Server(config, resolve_device(config.device), self.sites)
            try:
                run_rounds(config, root, self, server, resume,
                           lambda event, info: self.info(f"medfl: round {info['round']} done") if event == "round"
                           else None)
            except RunFinished as finished:
                self.info(f"medfl: {finished}")

    # ------------------------------------------------------------------ the Federation of the shared loop
    def start(self) -> dict[str, ExchangeObject]:
        """Every site loads its data and reports its class counts, sample count and network."""
        replies = self.exchange(TASK_DATA_STATS, {site: stats_task() for site in self.sites}, self.start_timeout)
        answered = self._answered(self._statuses(replies, "data statistics", "statistics"))
        if not answered:
            raise MedflError("no site reported its data statistics; see the sites' logs")
        return {site: ExchangeObject(statistics=replies[site].statistics) for site in answered}

    def open(self, folder: RunFolder, resume_round: int | None) -> None:
        """Sites keep their own part of the run folder on their machines: nothing to do at the server."""

    def train(self, round_: int, deliveries: Mapping[str, Delivery | None], upload: bool) -> RoundReplies:
        tasks = {site: train_task(deliveries.get(site), round_, self.rounds_planned, upload) for site in self.sites}
        replies = self.exchange(TASK_TRAIN, tasks, self.round_timeout)
        statuses = self._statuses(replies, f"round {round_}", "report")
        answered = self._answered(statuses)
        self.info(f"medfl: round {round_}: {len(answered)}/{len(self.sites)} sites answered")
        return RoundReplies(replies={site: SiteReply(report=replies[site].report, upload=replies[site].upload)
                                     for site in answered}, statuses=statuses)

    def finish(self, folder: RunFolder) -> None:
        """Send each site its own results (config, record, its summary entry and rows), so that `medfl export`
        works at the site from its local run folder alone; a site that does not answer can still get them from
        the server's run folder."""
        tasks = {site: results_task(folder.site_results(site)) for site in self.sites}
        replies = self.exchange(TASK_RESULTS, tasks, self.round_timeout)
        self._statuses(replies, "results", "statistics")

    def _statuses(self, replies: Mapping[str, Reply], what: str, needs: str) -> dict[str, str]:
        """Each site's part in a task, in the experiment's order: answered, failed (error type) or no answer.

        A reply without the field `needs` (report, statistics) counts as failed."""
        statuses = {}
        for site in self.sites:
            reply = replies.get(site)
            if reply is None:
                statuses[site] = NO_ANSWER
                self.warning(f"medfl: site '{site}' did not answer ({what}); going on without it")
            elif reply.failed or getattr(reply, needs) is None:
                statuses[site] = f"failed ({reply.failed or f'no {needs}'})"
                self.warning(f"medfl: site '{site}' {statuses[site]} in {what}; going on without it")
            else:
                statuses[site] = ANSWERED
        return statuses

    @staticmethod
    def _answered(statuses: Mapping[str, str]) -> list[str]:
        return [site for site, status in statuses.items() if status == ANSWERED]

    def exchange(self, task: str, payloads: Mapping[str, FLModel], timeout: int) -> dict[str, Reply]:
        """Send each site its own payload and wait until every site answered or its task timed out.

        The only method that talks to NVFlare: the replies of the sites that answered, keyed by the name
        NVFlare authenticated.
        """
        received: dict[str, FLModel] = {}
        for site in self.sites:
            self.send_model(task_name=task, data=payloads[site], targets=[site], timeout=timeout,
                            callback=lambda model: received.__setitem__(model.meta["client_name"], model))
        while self.get_num_standing_tasks():
            if self.abort_signal is not None and self.abort_signal.triggered:
                raise _Aborted()
            time.sleep(self._task_check_period)
        replies = {}
        for site, model in received.items():
            try:
                replies[site] = read_reply(model)
            except ValueError as error:
                self.warning(f"medfl: site '{site}' sent an unreadable reply ({error})")
        return replies
