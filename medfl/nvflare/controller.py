"""The server workflow: a ModelController that runs medfl's rounds with the engine-free strategies.

Each round the controller sends every site its own task (its own weights, keyed by site name, plus the
federation's class counts and prototypes), waits up to `round_timeout` seconds, and goes on with the sites
that answered: they are aggregated; a site that failed or did not answer keeps its model and receives the
next round's task as usual. NVFlare's log and the run folder's `participation.csv` (round, site, status)
say which sites took part in each round. The server's bookkeeping is the in-process `Coordinator` without sites: the same
strategy, deliveries, run log, checkpoint and run folder, so that a restarted job resumes after the last
completed round and the run folder reads like one written by `medfl run`.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from monai.fl.utils.exchange_object import ExchangeObject
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.workflows.model_controller import ModelController
from nvflare.app_opt.pt.decomposers import TensorDecomposer
from nvflare.fuel.utils import fobs

from medfl.errors import MedflError
from medfl.experiment import ExperimentConfig, load_experiment_config
from medfl.federated.coordinator import (
    Coordinator,
    aggregate_and_deliver,
    peak_memory_mb,
    site_update,
    strategy_options,
)
from medfl.federated.server import build_strategy
from medfl.models import build_model
from medfl.nvflare.layout import CONFIG_FOLDER, EXPERIMENT_FILE, resolve_run_dir
from medfl.nvflare.payloads import TASK_DATA_STATS, TASK_TRAIN, Reply, read_reply, stats_task, train_task
from medfl.runlog import write_csv

PARTICIPATION = "participation.csv"
ANSWERED, NO_ANSWER = "answered", "no answer"


def write_participation(path: Path, round_: int, statuses: Mapping[str, str]) -> None:
    """Rewrite `path` with the statuses of rounds before `round_` (a resumed round replaces its rows)."""
    rows = []
    if path.is_file():
        with open(path, newline="", encoding="utf-8") as stream:
            rows = [row for row in csv.DictReader(stream) if int(row["round"]) < round_]
    rows += [{"round": round_, "site": site, "status": status} for site, status in statuses.items()]
    write_csv(path, rows, ("round", "site", "status"))


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
        if config.runtime.threads:
            torch.set_num_threads(config.runtime.threads)
        book = Coordinator(config, resolve_run_dir(self.run_dir))
        resume = book.last_completed_round() is not None
        start = book.prepare_run_dir(resume=resume)
        if start >= config.rounds:
            self.info(f"medfl: {book.run_dir} has completed all {config.rounds} rounds; nothing to do")
            return
        self.info(f"medfl: {'resuming' if resume else 'starting'} {config.name} ({config.method}) in "
                  f"{book.run_dir}: rounds {start}..{config.rounds - 1}, sites {', '.join(self.sites)}")
        self._start(book, self.exchange(TASK_DATA_STATS, {site: stats_task() for site in self.sites},
                                    self.start_timeout))
        if resume:
            book.restore(start - 1)
        for round_ in range(start, config.rounds):
            self._round(book, round_)

    def _start(self, book: Coordinator, replies: Mapping[str, Reply]) -> None:
        """Build the strategy from a site's network and deliver the global class counts (as in process)."""
        answered = self._answered(self._statuses(replies, "data statistics", "statistics"))
        if not answered:
            raise MedflError("no site reported its data statistics; see the sites' logs")
        network = replies[answered[0]].network or {}
        model = build_model(**network)
        config = book.config
        book.strategy = build_strategy(config.method, model, config.rounds, **strategy_options(config))
        counts = torch.stack([torch.as_tensor(replies[site].statistics["class_counts"]) for site in answered])
        first = ExchangeObject(statistics={"global_class_counts": counts.sum(0)})
        book.deliveries = {site: first for site in self.sites}

    def _round(self, book: Coordinator, round_: int) -> None:
        config = book.config
        started = time.perf_counter()
        upload = book.strategy is not None and round_ < config.rounds - 1
        tasks = {site: train_task(book.deliveries.get(site), round_, config.rounds, upload) for site in self.sites}
        replies = self.exchange(TASK_TRAIN, tasks, self.round_timeout)
        statuses = self._statuses(replies, f"round {round_}", "report")
        answered = self._answered(statuses)
        timing = {"round": round_, "train_s": 0.0, "eval_s": 0.0, "aggregation_s": 0.0}
        for site in answered:
            reply = replies[site]
            timing["train_s"] += reply.timing.get("train_s", 0.0)
            timing["eval_s"] += reply.timing.get("eval_s", 0.0)
            book.log.add(site, reply.report)
        updates = {site: site_update(replies[site].upload, book.device) for site in answered
                   if upload and replies[site].upload is not None}
        book.deliveries, timing["aggregation_s"] = aggregate_and_deliver(
            book.strategy, round_, updates, list(self.sites))
        timing["round_s"] = time.perf_counter() - started
        timing.update(peak_memory_mb(book.device))
        book.timing.append(timing)
        write_participation(book.run_dir / PARTICIPATION, round_, statuses)
        book.checkpoint(round_)  # marks the round completed
        book.write_outputs(round_)
        self.info(f"medfl: round {round_} done with {len(answered)}/{len(self.sites)} sites")

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
