"""A federated site as a MONAI ClientAlgo: the adapter between an engine and the site's own pieces.

The site reads its data (the task's reader) into cached MONAI datasets, builds P and D (or M) from the
common initialisation, and wires three pieces together: `LocalTrainer` (how the models learn), `SiteScores`
(what is measured, when) and its `SiteFolder` (restart state, models per round, audit log). Only the
deputy's weights (or the single model's), class prototypes, class counts, the sample count, the network's
description, metrics and timing ever leave a site; each is written to the audit log once per round. Per-epoch
seeds derive from (seed, site, round, epoch), so a resumed run repeats exactly what an uninterrupted one does.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from monai.data import MetaTensor
from monai.fl.client import ClientAlgo
from monai.fl.utils.exchange_object import ExchangeObject
from monai.utils import set_determinism
from torch import Tensor

from medfl.config import SiteConfig
from medfl.data.fingerprint import DATA_FINGERPRINT_VERSION, data_fingerprint, site_config_sha256
from medfl.data.recipes import build_dataset, load_recipe
from medfl.data.site import load_site
from medfl.errors import MedflError
from medfl.experiment import ExperimentConfig
from medfl.federated.audit import describe_tensors, describe_values
from medfl.federated.det import DetState
from medfl.federated.payloads import Delivery, upload_to_exchange
from medfl.federated.scores import SiteScores
from medfl.federated.trainer import LocalTrainer, cpu_state
from medfl.federated.training import TrainingDiverged
from medfl.metrics import reference_window_start, retrogress
from medfl.models import build_model
from medfl.runfolder import SCHEMA_VERSION, RunFolder, SiteRecord

if TYPE_CHECKING:
    from medfl.tasks import Task

PREFETCH_BATCHES = 2  # batches the training loader prepares ahead of the step that needs them
EVAL_BATCH_CACHE_BYTES = 512 * 2**20  # validation and test batches kept collated per site, at most


def derive_seed(*parts: object) -> int:
    """A 31-bit seed from any parts (experiment seed, site name, round, epoch), stable across runs."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


class Site(ClientAlgo):
    """One site of a federation: its data, its models and what leaves it."""

    def __init__(self, site_config: SiteConfig, experiment: ExperimentConfig, run_dir: str | Path,
                 device: torch.device | str = "cpu", *, task: Task):
        if task.key != experiment.task:
            raise ValueError(f"a {task.key} task cannot run the {experiment.task} experiment '{experiment.name}'")
        if task.spatial_dims != experiment.data.dims:
            raise ValueError(f"a {task.spatial_dims}-D {task.key} task cannot run the {experiment.data.dims}-D experiment "
                             f"'{experiment.name}' (task_for(key, experiment) gives the experiment's task)")
        self.config, self.experiment, self.name = site_config, experiment, site_config.name
        self.spec, self.task, self.classes = experiment.spec, task, experiment.classes
        self.used, self.receiving = self.spec.used_role, self.spec.receiving_role
        self.device = torch.device(device)
        self.folder = RunFolder(run_dir).site(self.name)
        self.round = -1  # last completed round
        self.data = None  # the site's records: read by initialize unless given (medfl.federated.parallel)
        self._collated: dict[str, list[dict[str, Any]]] = {}
        self._timing: dict[str, float] = {}
        self._clock: tuple[float, float, int] = (0.0, 0.0, 0)  # a round's start: time, eval seconds, eval samples
        self._state, self._det_phis = DetState.START, {}  # DET's state and the scores it decides on, this round
        self._departures: list[dict[str, Any]] = []  # what left the site and is not in the audit log yet
        self.on_epoch: Callable[[dict[str, Any]], None] | None = None  # progress display hook

    # ----------------------------------------------------------------- set-up
    def initialize(self, extra: dict | None = None) -> None:
        """Read and check the site's data, build the datasets, and the models from the common initialisation."""
        settings = self.experiment.data
        if self.data is None:
            self.data = load_site(self.config, settings, task=self.task)
        self.in_channels = self.task.input_channels(self.data.splits["train"][0])
        recipes = {stage: load_recipe(settings.recipe(self.task.key, stage), **self.task.recipe_variables(settings))
                   for stage in ("train", "eval")}
        self.train_transform, self.eval_transform = recipes["train"], recipes["eval"]
        self.datasets = {split: build_dataset(self.data.splits[split], recipes["train" if split == "train" else "eval"],
                                              cache_rate=settings.cache_rate, num_workers=settings.num_workers)
                         for split in ("train", "val", "test")}
        torch.manual_seed(self.experiment.seed)  # the common initialisation: the same at every site
        model = self.experiment.model
        first = build_model(model.name, self.task.key, num_classes=len(self.classes), in_channels=self.in_channels,
                            width=model.width, spatial_dims=self.task.spatial_dims, **model.options)
        first.check_input_size(self.task.network_input_size(settings))
        models = {role: first if role == self.used else copy.deepcopy(first) for role in self.spec.roles}
        for network in models.values():
            network.to(self.device)
        self.class_counts = torch.as_tensor(self.data.class_counts("train"), dtype=torch.float64)
        loss = self.task.supervised_loss(self.spec.loss, self.class_counts, self.experiment.cpa.beta)
        self.trainer = LocalTrainer(models, self.experiment, self.task, loss, self.device)
        self.scores = SiteScores(self.name, self.task, self.classes, models, self.device, self._eval_batches,
                                 self._spacing, lambda split: len(self.datasets[split]),
                                 original_of=lambda case_id: self.task.original_case(self.data, case_id))
        self.record = SiteRecord(schema_version=SCHEMA_VERSION, site=self.name,
                                 site_config_sha256=site_config_sha256(self.config),
                                 data_fingerprint=data_fingerprint(self.data), training_files=self.task.training_files(self.data),
                                 inputs=self.task.site_inputs(self.config),
                                 data_fingerprint_version=DATA_FINGERPRINT_VERSION)

    @property
    def models(self) -> dict[Any, torch.nn.Module]:
        return self.trainer.models

    def open_folder(self) -> None:
        """Start the site's part of the run folder, or check that it still reads the data it started with.
        Called once the run folder exists: a site writes nothing before every check has passed."""
        self.folder.start(self.record)

    def get_data_stats(self, extra: dict | None = None) -> ExchangeObject:
        """Per-class training counts (pixels for segmentation), the number of training samples, and the
        network's description (the server builds the same architecture to know its parameters' roles)."""
        statistics = {"class_counts": self.class_counts.clone(), "num_samples": len(self.datasets["train"]),
                      "network": dict(self.models[self.receiving].config)}
        self._departures.append({"what": "data_statistics", **describe_values(statistics)})
        return ExchangeObject(statistics=statistics)

    def pool_training_data(self, trainer: LocalTrainer) -> None:
        """Pooled training (medfl.federated.pooled): the site's training split goes to `trainer`, whose one model
        learns from every site's, and the site holds that model instead of its own. The training data leave the
        site: its audit log says so."""
        self.trainer = trainer
        self.scores.models = trainer.models
        self._departures.append({"what": "training_data", "to": "pooled training in one process",
                                 "samples": len(self.datasets["train"]), "files": len(self.record.training_files)})

    # ----------------------------------------------------------------- a round
    def train(self, data: ExchangeObject | None, extra: dict | None = None) -> None:
        """One round: load what the server delivered into the receiving model, then E local epochs, each with
        DET's state chosen from both models' scores."""
        round_ = int((extra or {}).get("round", self.round + 1))
        self.begin_round(round_, data)
        for epoch in range(1, self.experiment.local_epochs + 1):
            self._state = self.trainer.next_state(self._state, self._det_phis)
            try:
                losses = self.trainer.epoch(round_, epoch, self._state, self._train_loader(round_, epoch))
            except TrainingDiverged as error:
                raise TrainingDiverged(f"site '{self.name}', round {round_}, epoch {epoch}: {error}") from None
            self.end_epoch(round_, epoch, losses)
        self.end_round(round_)

    def begin_round(self, round_: int, data: ExchangeObject | None) -> None:
        """A round's start: the delivery loaded, fresh optimizers, every model scored right after communication
        (the used one on test too, in the reference protocol's window), the receiving model's retrogress."""
        scores, trainer = self.scores, self.trainer
        self._clock = (time.perf_counter(), scores.eval_seconds, scores.eval_samples)
        trainer.to(self.device)
        try:
            loaded = trainer.receive(Delivery.from_exchange(data))  # the receiving model's cached scores: see _measure
        except MedflError as error:
            raise MedflError(f"site '{self.name}': {error}") from None
        if loaded and self.experiment.det.reestimate_bn_on_receive:
            scores.reestimate_batchnorm(self.receiving)
        trainer.start_round(round_)
        previous = scores.phi(self.receiving, round_ - 1) if round_ > 0 else math.nan
        phis = self._measure(round_, 0)
        if round_ >= reference_window_start(self.experiment.rounds):
            scores.record(round_, 0, self.used, "test", scores.score(self.used, "test"))
        if self.spec.sends_weights and round_ > 0:
            entry = {"round": round_, "site": self.name, "model": self.receiving.value, "before": previous,
                     "after": phis[self.receiving]}
            if self.experiment.diagnostics.bn_reestimation:
                entry["after_bn_reestimated"] = scores.bn_reestimated(self.receiving)
            scores.retrogress_log.append(entry)
        self._det_phis = self._det_phis_of(round_, 0, phis)
        self._state = DetState.START

    def end_epoch(self, round_: int, epoch: int, losses: dict[Any, float]) -> None:
        """After local epoch `epoch` (each model's mean loss): every model scored, the epoch's DET log entry, the
        receiving model's recovery after the round's first epoch."""
        scores = self.scores
        phis = self._measure(round_, epoch)
        self._det_phis = self._det_phis_of(round_, epoch, phis)
        scores.det_log.append({"round": round_, "epoch": epoch, "site": self.name,
                               "state": self._state.value if self.spec.distillation else "",
                               **{f"phi_{role}": value for role, value in self._det_phis.items()},
                               **{f"loss_{role}": value for role, value in losses.items()}})
        if self.on_epoch is not None:
            self.on_epoch(scores.det_log[-1])
        if epoch == 1 and scores.retrogress_log and scores.retrogress_log[-1]["round"] == round_:
            entry = scores.retrogress_log[-1]
            entry.update(retrogress(entry["before"], entry["after"], phis[self.receiving]))
            entry["after_first_epoch"] = phis[self.receiving]
            if "after_bn_reestimated" in entry:
                entry["retrogress_bn_reestimated"] = entry["before"] - entry["after_bn_reestimated"]

    def end_round(self, round_: int, train_seconds: float | None = None) -> None:
        """The round is done: its models saved, the round validation selects, its timing. `train_seconds` is the
        training time charged to this site where it did not train alone (pooled training); by default the
        round's time less its evaluation."""
        scores = self.scores
        self.round = round_
        self.folder.save_round_models(round_, {
            "round": round_, "site": self.name, "network": self.models[self.used].config,
            "used": self.used.value, "receiving": self.receiving.value,
            "models": {role.value: cpu_state(model) for role, model in self.models.items()}})
        scores.select(round_, self.used)
        started, eval_before, samples_before = self._clock
        inner_eval = scores.eval_seconds - eval_before
        self._timing = {"train_s": time.perf_counter() - started - inner_eval if train_seconds is None
                        else train_seconds, "eval_s": inner_eval, "eval_samples": scores.eval_samples - samples_before}

    def _measure(self, round_: int, epoch: int) -> dict[Any, float]:
        """Every model's validation score at (round, epoch). A model's cached scores hold only where it did not
        change: P right after communication, from the second round on."""
        for role in self.models:
            if epoch > 0 or role == self.receiving or round_ == 0:
                self.scores.forget(role)
        return {role: self.scores.measure(role, round_, epoch) for role in self.models}

    def _det_phis_of(self, round_: int, epoch: int, validation: dict[Any, float]) -> dict[Any, float]:
        """The scores DET decides on: validation (the paper) or the training split in eval mode (the reference)."""
        if self.experiment.det.phi_source == "val":
            return validation
        return {role: self.scores.measure(role, round_, epoch, "train") for role in self.models}

    def _train_loader(self, round_: int, epoch: int):
        """Batches of the cached training split, prepared PREFETCH_BATCHES ahead in one thread, the epoch's
        randomness (order, augmentation) seeded from (seed, site, round, epoch).

        The random tail of the recipe runs while the models step (torch releases the GIL in its kernels); one
        thread draws the samples in order, so the augmentation is the same as inline loading, draw for draw.
        """
        from monai.data import ThreadDataLoader

        seed = derive_seed(self.experiment.seed, self.name, round_, epoch)
        set_determinism(seed)
        self.train_transform.set_random_state(seed=seed)
        dataset, batch_size = self.datasets["train"], self.experiment.batch_size
        generator = torch.Generator().manual_seed(derive_seed(self.experiment.seed, self.name, round_, epoch, "order"))
        drop_last = len(dataset) > batch_size and len(dataset) % batch_size == 1  # a batch of one breaks BatchNorm
        return ThreadDataLoader(dataset, buffer_size=PREFETCH_BATCHES, batch_size=batch_size, shuffle=True,
                                generator=generator, drop_last=drop_last, num_workers=0)

    def _eval_batches(self, split: str):
        """Batches of a split with the evaluation preprocessing. Validation and test are collated once and kept
        (scored many times per round) unless larger than EVAL_BATCH_CACHE_BYTES; "train_eval", the training
        split seen that way (DET's phi from training data, BatchNorm re-estimation), is built on first use."""
        from monai.data import DataLoader

        if split in self._collated:
            return self._collated[split]
        if split not in self.datasets:
            settings = self.experiment.data
            self.datasets[split] = build_dataset(self.data.splits["train"], self.eval_transform,
                                                 cache_rate=settings.cache_rate, num_workers=settings.num_workers)
        loader = DataLoader(self.datasets[split], batch_size=self.task.eval_batch_size(self.experiment.batch_size),
                            shuffle=False,
                            num_workers=0)
        if split not in ("val", "test"):
            return loader
        batches, size = [], 0
        for batch in loader:
            batch = {k: v.as_tensor() if isinstance(v, MetaTensor) else v for k, v in batch.items()}
            size += sum(v.numel() * v.element_size() for v in batch.values() if isinstance(v, Tensor))
            if size > EVAL_BATCH_CACHE_BYTES:
                return loader
            batches.append(batch)
        self._collated[split] = batches
        return batches

    def _spacing(self, case_id: str) -> tuple[float, float, float] | None:
        """Voxel spacing (mm) of a scored volume (2-D: reassembled (H, W, slices) at the experiment's input size)."""
        geometry = self.data.geometry.get(case_id)
        return None if geometry is None else self.task.case_spacing(geometry, self.experiment.data)

    # ----------------------------------------------------------------- what leaves the site
    def evaluate(self, data: ExchangeObject | None = None, extra: dict | None = None) -> ExchangeObject:
        """The round's report: the metric rows not yet reported (test scored where it can be reported), DET
        states, retrogress, the selected round and the round's timing."""
        tick, last, samples_before = time.perf_counter(), self.experiment.rounds - 1, self.scores.eval_samples
        for role in self.models:
            if self.scores.test_needed(role, self.used, self.round, last):
                self.scores.record(self.round, self.experiment.local_epochs, role, "test",
                                   self.scores.score(role, "test"))
        report = {**self.scores.report(self.round),
                  "timing": {"train_s": self._timing.get("train_s", 0.0),
                             "eval_s": self._timing.get("eval_s", 0.0) + time.perf_counter() - tick,
                             "eval_samples": self._timing.get("eval_samples", 0) + self.scores.eval_samples
                             - samples_before}}
        self._departures.append({"what": "report", **report})
        self._flush_audit()
        return ExchangeObject(metrics=report)

    def get_weights(self, extra: dict | None = None) -> ExchangeObject:
        """What leaves the site after its epochs (medfl.federated.trainer.LocalTrainer.upload), audit-logged."""
        update = self.trainer.upload(len(self.datasets["train"]), self.class_counts,
                                     self.config.withhold_prototypes_below)
        exchange = upload_to_exchange(update)
        described, weights = describe_values(exchange.statistics), describe_tensors(update.weights)
        described["bytes"] += sum(e["bytes"] for e in weights)
        self._departures.append({"what": "upload", "weights": weights, **described})
        self._flush_audit()
        return exchange

    def _flush_audit(self) -> None:
        """Write what left the site since the last flush under the current round (the data statistics sent at a
        (re)start go with the round that follows)."""
        if self._departures and self.folder.record_file.is_file():
            self.folder.audit([{"round": self.round, **entry} for entry in self._departures])
            self._departures = []

    # ----------------------------------------------------------------- restart state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to restart this site after its last completed round."""
        return {"round": self.round, **self.trainer.state_dict(), **self.scores.state_dict()}

    def save_state(self) -> None:
        """Write the state of the last completed round (the newest two are kept: a restart picks one)."""
        self.folder.save_state(self.round, self.state_dict())

    def restart_after(self, round_: int) -> None:
        """Continue after round `round_`: its saved state, or (-1) a fresh start that forgets a killed round 0."""
        if round_ >= 0:
            self.load_state(round_)
        else:
            self.folder.forget_audit_after(round_)

    def load_state(self, round_: int) -> None:
        """Restore the state saved after `round_`; the audit log's entries of later rounds are dropped, since
        those rounds run again."""
        state = self.folder.load_state(round_)
        self.folder.forget_audit_after(round_)
        self.trainer.load_state_dict(state)
        self.scores.load_state_dict(state)
        self.round = state["round"]

    def offload(self) -> None:
        """Move the models to the CPU while other sites use the GPU."""
        self.trainer.to("cpu")

    def finalize(self, extra: dict | None = None) -> None:
        self.offload()

    def abort(self, extra: dict | None = None) -> None:
        self.offload()
