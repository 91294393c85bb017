"""A federated site as a MONAI ClientAlgo: it owns P and D, runs DET epochs, and decides what leaves it.

Only the deputy's weights (or the single model's, for one-model methods), class prototypes, class
counts, the sample count, the network's description, metrics and timing ever leave a site; every object
that leaves is written to the site's audit log (tensors by name, shape and bytes; numbers and reports as
they are), once per round. The site keeps its own part of the run folder (``<run>/sites/<name>/``, see
medfl.runfolder.SiteFolder) so that it can be restarted from the last completed round, with per-epoch seeds
derived from (seed, site, round, epoch) so that a resumed run repeats exactly what an uninterrupted one does.
"""

from __future__ import annotations

import copy
import hashlib
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.fl.client import ClientAlgo
from monai.fl.utils.constants import WeightType
from monai.fl.utils.exchange_object import ExchangeObject
from torch import Tensor, nn

from medfl.config import SiteConfig
from medfl.data.fingerprint import data_fingerprint, site_config_sha256, training_files
from medfl.errors import MedflError
from medfl.experiment import ExperimentConfig
from medfl.federated.cpa import PrototypeAccumulator, refinement_weights
from medfl.federated.det import DetState, next_state
from medfl.federated.evaluation import evaluate_model, reestimate_batchnorm
from medfl.federated.params import classifier_keys
from medfl.federated.training import EpochPlan, SupervisedLoss, TrainingDiverged, train_epoch
from medfl.metrics import reference_window_start, retrogress, running_best, task_metric_name
from medfl.models import build_model
from medfl.runfolder import SCHEMA_VERSION, RunFolder, SiteRecord

PREFETCH_BATCHES = 2  # batches the training loader prepares ahead of the step that needs them
EVAL_BATCH_CACHE_BYTES = 512 * 2**20  # validation and test batches kept collated per site, at most


def derive_seed(*parts: object) -> int:
    """A 31-bit seed from any parts (experiment seed, site name, round, epoch), stable across runs."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


SMALL_TENSOR = 64  # tensors up to this many values are written to the audit log in full (counts)


def describe_values(statistics: dict[str, Any]) -> dict[str, Any]:
    """The audit log's view of statistics that leave a site: every tensor by name, shape, dtype and bytes (and
    its values when small, as class counts are), every other value as it is."""
    tensors = {k: v for k, v in statistics.items() if isinstance(v, Tensor)}
    described = describe_tensors(tensors)
    for entry in described:
        tensor = tensors[entry["name"]]
        if tensor.numel() <= SMALL_TENSOR:
            entry["value"] = tensor.tolist()
    plain = [{"name": k, "value": v} for k, v in statistics.items() if not isinstance(v, Tensor)]
    return {"statistics": described + plain, "bytes": sum(e["bytes"] for e in described)}


def describe_tensors(tensors: dict[str, Tensor]) -> list[dict[str, Any]]:
    """Names, shapes, dtypes and byte sizes of tensors (the audit log's view of an upload)."""
    return [
        {"name": k, "shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."),
         "bytes": v.numel() * v.element_size()}
        for k, v in tensors.items()
    ]


class Site(ClientAlgo):
    """One site of a federation: local data, the personalised model P and (two-model methods) the deputy D."""

    def __init__(
        self,
        site_config: SiteConfig,
        experiment: ExperimentConfig,
        run_dir: str | Path,
        device: torch.device | str = "cpu",
    ):
        self.config = site_config
        self.experiment = experiment
        self.name = site_config.name
        self.spec = experiment.spec
        self.task = experiment.task
        self.classes = experiment.classes
        self.device = torch.device(device)
        self.folder = RunFolder(run_dir).site(self.name)
        self.metric = task_metric_name(self.task)
        self.models: dict[str, nn.Module] = {}
        self.round = -1  # last completed round
        self.history: list[dict[str, Any]] = []  # metric rows (round, epoch, model, split, metric, value)
        self.det_log: list[dict[str, Any]] = []
        self.retrogress_log: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {"round": None, "value": -math.inf}
        self._pending_rows = 0
        self._global: dict[str, Tensor | None] = {"counts": None, "prototypes": None, "present": None}
        self._local_prototypes: tuple[Tensor, Tensor] | None = None
        self._received: dict[str, Tensor] | None = None
        self._cache: dict[tuple[str, str], dict[str, float]] = {}
        self._collated: dict[str, list[dict[str, Any]]] = {}
        self.eval_seconds = 0.0  # time spent scoring models (a round's timing splits training from it)
        self._timing: dict[str, float] = {}
        self._departures: list[dict[str, Any]] = []  # what left the site and is not in the audit log yet
        self.on_epoch: Callable[[dict[str, Any]], None] | None = None  # progress display hook

    # ----------------------------------------------------------------- set-up
    @property
    def used_name(self) -> str:
        """The model the site uses and exports: P for two-model methods, M otherwise."""
        return "P" if self.spec.two_models else "M"

    @property
    def receiving_name(self) -> str:
        """The model that is uploaded and overwritten by the server's weights: D, or M."""
        return "D" if self.spec.two_models else "M"

    def initialize(self, extra: dict | None = None) -> None:
        """Read and check the site's data, build the datasets, and P and D from the common initialisation."""
        from medfl.data import build_dataset, load_recipe, load_site

        settings = self.experiment.data
        self.data = load_site(self.config, settings)
        records = self.data.splits
        self.in_channels = _input_channels(records["train"][0], self.task)
        train_recipe = load_recipe(settings.recipe(self.task, "train"), input_size=settings.input_size)
        eval_recipe = load_recipe(settings.recipe(self.task, "eval"), input_size=settings.input_size)
        self.datasets = {
            split: build_dataset(
                records[split],
                train_recipe if split == "train" else eval_recipe,
                cache_rate=settings.cache_rate,
                num_workers=settings.num_workers,
            )
            for split in ("train", "val", "test")
        }
        self.train_transform, self.eval_transform = train_recipe, eval_recipe
        torch.manual_seed(self.experiment.seed)  # the common initialisation: the same at every site
        first = build_model(
            self.experiment.model.name,
            self.task,
            num_classes=len(self.classes),
            in_channels=self.in_channels,
            width=self.experiment.model.width,
            **self.experiment.model.options,
        )
        first.check_input_size((settings.input_size, settings.input_size))
        self.models = {self.used_name: first}
        if self.spec.two_models:
            self.models["D"] = copy.deepcopy(first)
        for model in self.models.values():
            model.to(self.device)
        self.optimizers = {name: self._optimizer(model, self.experiment.optimizer.lr) for name, model in self.models.items()}
        self.class_counts = torch.as_tensor(self.data.class_counts("train"), dtype=torch.float64)
        self.loss_fn = SupervisedLoss(self.task, self.spec.loss, self.class_counts, self.experiment.cpa.beta)
        self.record = SiteRecord(schema_version=SCHEMA_VERSION, site=self.name,
                                 site_config_sha256=site_config_sha256(self.config),
                                 data_fingerprint=data_fingerprint(self.data), training_files=training_files(self.data))

    def open_folder(self) -> None:
        """Start the site's part of the run folder, or check that it still reads the data it started with.

        Called once the run folder exists: a site writes nothing before every check has passed."""
        self.folder.start(self.record)

    def _optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        opt = self.experiment.optimizer
        if opt.name == "adam":
            return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=opt.weight_decay)
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=opt.momentum, weight_decay=opt.weight_decay)

    def _start_round_optimizers(self, round_: int) -> None:
        """Every model's optimizer for round ``round_``, at that round's learning rate.

        By default each model gets a fresh optimizer (the reference's behaviour): D's weights were just
        replaced, so momentum or Adam moments gathered on its old weights no longer describe it. With
        ``optimizer.reset_every_round: false`` the optimizers and their state carry over.
        """
        lr = self.experiment.optimizer.learning_rate(round_)
        if self.experiment.optimizer.reset_every_round:
            self.optimizers = {name: self._optimizer(model, lr) for name, model in self.models.items()}
            return
        for optimizer in self.optimizers.values():
            for group in optimizer.param_groups:
                group["lr"] = lr

    def get_data_stats(self, extra: dict | None = None) -> ExchangeObject:
        """Per-class training counts (pixels for segmentation), the number of training samples, and the
        network's description (the server builds the same architecture to know its parameters' roles)."""
        statistics = {"class_counts": self.class_counts.clone(), "num_samples": len(self.datasets["train"]),
                      "network": dict(self.models[self.receiving_name].config)}
        self._departures.append({"what": "data_statistics", **describe_values(statistics)})
        return ExchangeObject(statistics=statistics)

    # ----------------------------------------------------------------- training
    def train(self, data: ExchangeObject, extra: dict | None = None) -> None:
        """Run one round: load the server's weights into the receiving model, then E local epochs."""
        round_ = int((extra or {}).get("round", self.round + 1))
        started, eval_before = time.perf_counter(), self.eval_seconds
        self._to_device()
        self._receive(data)
        self._start_round_optimizers(round_)
        previous_phi = self._phi(self.receiving_name, round_ - 1) if round_ > 0 else math.nan
        phis = {name: self._validate(name, round_, 0) for name in self.models}
        if round_ >= reference_window_start(self.experiment.rounds):
            self._record(round_, 0, self.used_name, "test", self._score(self.used_name, "test"))
        if self.spec.sends_weights and round_ > 0:
            entry = {"round": round_, "site": self.name, "model": self.receiving_name,
                     "before": previous_phi, "after": phis[self.receiving_name]}
            if self.experiment.diagnostics.bn_reestimation:
                entry["after_bn_reestimated"] = self._bn_reestimated_phi(self.receiving_name)
            self.retrogress_log.append(entry)
        det_phis = phis if self._phi_split == "val" else {name: self._det_phi(name, round_, 0) for name in self.models}
        state = DetState.START
        epochs = self.experiment.local_epochs
        for epoch in range(1, epochs + 1):
            if self.spec.distillation == "det":
                state = next_state(state, det_phis["P"], det_phis["D"], self.experiment.det.lambda1,
                                   self.experiment.det.lambda2)
            elif self.spec.distillation == "mutual":
                state = DetState.EXCHANGE
            self._seed_epoch(round_, epoch)
            accumulator = PrototypeAccumulator(len(self.classes)) if self._collects_prototypes(round_, epoch) else None
            plan = EpochPlan(
                state=state if self.spec.two_models else None,
                gamma=self._gamma(round_),
                temperature=self.experiment.det.temperature,
                proximal_mu=self.experiment.baselines.fedprox_mu if self.spec.proximal else 0.0,
                received=self._received,
                prototype_weight=self.experiment.baselines.fedproto_weight if self.spec.prototype_loss else 0.0,
                global_prototypes=self._global["prototypes"],
                global_present=self._global["present"],
                trainable=self._trainable(epoch, epochs),
                accumulator=accumulator,
            )
            try:
                losses = train_epoch(
                    self.models, self.optimizers, self._train_loader(round_, epoch), self.loss_fn, plan,
                    self.task, self.device, self.experiment.runtime.mixed_precision,
                )
            except TrainingDiverged as error:
                raise TrainingDiverged(f"site '{self.name}', round {round_}, epoch {epoch}: {error}") from None
            if accumulator is not None:
                self._local_prototypes = accumulator.prototypes()
            phis = {name: self._validate(name, round_, epoch) for name in self.models}
            det_phis = phis if self._phi_split == "val" else {
                name: self._det_phi(name, round_, epoch) for name in self.models}
            self.det_log.append({
                "round": round_, "epoch": epoch, "site": self.name,
                "state": state.value if self.spec.two_models else "",
                **{f"phi_{name}": value for name, value in det_phis.items()},
                **{f"loss_{name}": value for name, value in losses.items()},
            })
            if self.on_epoch is not None:
                self.on_epoch(self.det_log[-1])
            if epoch == 1 and self.retrogress_log and self.retrogress_log[-1]["round"] == round_:
                entry = self.retrogress_log[-1]
                entry.update(retrogress(entry["before"], entry["after"], phis[self.receiving_name]))
                entry["after_first_epoch"] = phis[self.receiving_name]
                if "after_bn_reestimated" in entry:
                    entry["retrogress_bn_reestimated"] = entry["before"] - entry["after_bn_reestimated"]
        self.round = round_
        self._select(round_)
        inner_eval = self.eval_seconds - eval_before
        self._timing = {"train_s": time.perf_counter() - started - inner_eval, "eval_s": inner_eval}

    def _collects_prototypes(self, round_: int, epoch: int) -> bool:
        """Whether this epoch's features become the site's local prototypes.

        The last epoch's are uploaded with the deputy; with CPA after warm-up every epoch's are kept, since
        the next epoch's refinement weights compare them with the global prototypes of this round (the
        reference recomputes local prototypes every local epoch).
        """
        refines = self.spec.loss == "cpa" and round_ >= self.experiment.cpa_warmup_rounds
        return refines or epoch == self.experiment.local_epochs

    @property
    def _phi_split(self) -> str:
        """The split DET's phi is measured on: "val" (the paper) or "train" (the reference code)."""
        return self.experiment.det.phi_source

    def _det_phi(self, name: str, round_: int, epoch: int) -> float:
        """phi of model ``name`` on the training split with the evaluation preprocessing (eval mode)."""
        metrics = self._score(name, "train_eval")
        self._record(round_, epoch, name, "train", metrics)
        value = metrics.get(self.metric, math.nan)
        return 0.0 if value is None or math.isnan(value) else float(value)

    def _bn_reestimated_phi(self, name: str) -> float:
        """phi on validation of a copy of model ``name`` whose BatchNorm statistics were re-estimated on the
        site's training data (evaluation preprocessing, no weight change); NaN for a net without BatchNorm."""
        model = copy.deepcopy(self.models[name])
        if not reestimate_batchnorm(model, self._eval_loader("train_eval"), self.device):
            return math.nan
        tick = time.perf_counter()
        metrics = evaluate_model(model, self._eval_loader("val"), self.task, self.classes, self.device, self._spacing)
        self.eval_seconds += time.perf_counter() - tick
        value = metrics.get(self.metric, math.nan)
        return 0.0 if value is None or math.isnan(value) else float(value)

    def _receive(self, data: ExchangeObject | None) -> None:
        """Load the server's weights (if any) into the receiving model and keep the global statistics."""
        if data is None:
            return
        statistics = data.statistics or {}
        for key, name in (("global_class_counts", "counts"), ("global_prototypes", "prototypes"),
                          ("global_prototype_present", "present")):
            if statistics.get(key) is not None:
                self._global[name] = torch.as_tensor(statistics[key])
        if self._global["counts"] is not None and self.spec.aggregation is not None:
            self.loss_fn.set_class_counts(self._global["counts"])
        if data.weights:
            model = self.models[self.receiving_name]
            own = model.state_dict()
            unknown = sorted(set(data.weights) - set(own))
            if unknown:
                raise MedflError(f"site '{self.name}': the server sent unknown entries {unknown[:3]}")
            model.load_state_dict({**own, **{k: v.to(own[k].device, own[k].dtype) for k, v in data.weights.items()}})
            self._received = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self._cache = {key: value for key, value in self._cache.items() if key[0] != self.receiving_name}

    def _gamma(self, round_: int) -> Tensor | None:
        """CPA's refinement weights after warm-up, from this site's and the federation's prototypes."""
        if self.spec.loss != "cpa" or round_ < self.experiment.cpa_warmup_rounds:
            return None
        if self._local_prototypes is None or self._global["prototypes"] is None:
            return None
        local, counts = self._local_prototypes
        return refinement_weights(
            local, counts, self._global["prototypes"], self._global["present"],
            self.experiment.cpa_tau, self.experiment.cpa.gamma_max,
        ).to(self.device)

    def _trainable(self, epoch: int, epochs: int) -> list[str] | None:
        """FedRep: the head learns first with the body frozen, the last epoch trains the body only.

        With a single local epoch there is nothing to alternate: the whole model trains (FedPer).
        """
        if not self.spec.head_first or epochs < 2:
            return None
        model = self.models[self.used_name]
        head = classifier_keys(model)
        names = [n for n, _ in model.named_parameters()]
        return [n for n in names if (n in head) == (epoch < epochs)]

    def _seed_epoch(self, round_: int, epoch: int) -> None:
        """Seed data order, augmentation and any randomness of this epoch from (seed, site, round, epoch)."""
        seed = derive_seed(self.experiment.seed, self.name, round_, epoch)
        seed_everything(seed)
        self.train_transform.set_random_state(seed=seed)

    def _train_loader(self, round_: int, epoch: int):
        """Batches of the cached training split, prepared PREFETCH_BATCHES ahead in one thread.

        The random tail of the recipe runs while the models step (torch releases the GIL in its kernels), so
        training waits for data only when augmenting a batch takes longer than a step. One thread draws the
        samples in order, so the augmentation is the same as inline loading, draw for draw.
        """
        from monai.data import ThreadDataLoader

        dataset = self.datasets["train"]
        batch_size = self.experiment.batch_size
        generator = torch.Generator().manual_seed(derive_seed(self.experiment.seed, self.name, round_, epoch, "order"))
        # A last batch of one sample breaks BatchNorm in training: drop it.
        drop_last = len(dataset) > batch_size and len(dataset) % batch_size == 1
        return ThreadDataLoader(dataset, buffer_size=PREFETCH_BATCHES, batch_size=batch_size, shuffle=True,
                                generator=generator, drop_last=drop_last, num_workers=0)

    def _eval_loader(self, split: str):
        """Batches of a split with the evaluation preprocessing; "train_eval" is the training split seen that
        way (DET's phi from training data, BatchNorm re-estimation), built on first use."""
        from monai.data import DataLoader

        if split not in self.datasets:
            from medfl.data import build_dataset

            settings = self.experiment.data
            self.datasets[split] = build_dataset(self.data.splits["train"], self.eval_transform,
                                                 cache_rate=settings.cache_rate, num_workers=settings.num_workers)
        return DataLoader(self.datasets[split], batch_size=max(self.experiment.batch_size, 32), shuffle=False,
                          num_workers=0)

    # ----------------------------------------------------------------- evaluation
    def _spacing(self, case_id: str) -> tuple[float, float, float] | None:
        """Voxel spacing (mm) of a reassembled (H, W, slices) volume at the experiment's input size."""
        geometry = self.data.geometry.get(case_id)
        if geometry is None:
            return None
        return geometry.slice_volume_spacing(self.experiment.data.input_size)

    def _score(self, name: str, split: str) -> dict[str, float]:
        """Metrics of model ``name`` on ``split``, computed once per model state. Distance metrics (HD95) only
        on test: validation and the training split serve phi and selection, which read the Dice only."""
        key = (name, split)
        if key not in self._cache:
            tick = time.perf_counter()
            self._cache[key] = evaluate_model(
                self.models[name], self._eval_batches(split), self.task, self.classes, self.device, self._spacing,
                distances=split == "test",
            )
            self.eval_seconds += time.perf_counter() - tick
        return self._cache[key]

    def _eval_batches(self, split: str):
        """Validation and test batches, collated once and kept (they are scored many times per round with a
        deterministic preprocessing), unless they would hold more than EVAL_BATCH_CACHE_BYTES."""
        if split in self._collated:
            return self._collated[split]
        loader = self._eval_loader(split)
        if split not in ("val", "test"):
            return loader
        batches, size = [], 0
        for batch in loader:
            # Plain tensors: MetaTensor's bookkeeping made every later operation on the logits ~50x slower.
            batch = {k: v.as_tensor() if isinstance(v, MetaTensor) else v for k, v in batch.items()}
            size += sum(v.numel() * v.element_size() for v in batch.values() if isinstance(v, Tensor))
            if size > EVAL_BATCH_CACHE_BYTES:
                return loader
            batches.append(batch)
        self._collated[split] = batches
        return batches

    def _validate(self, name: str, round_: int, epoch: int) -> float:
        """phi of model ``name`` on the validation split, recorded at (round, epoch)."""
        if epoch > 0 or name == self.receiving_name or round_ == 0:
            self._cache = {key: value for key, value in self._cache.items() if key[0] != name}
        metrics = self._score(name, "val")
        self._record(round_, epoch, name, "val", metrics)
        value = metrics.get(self.metric, math.nan)
        return 0.0 if value is None or math.isnan(value) else float(value)

    def _phi(self, name: str, round_: int) -> float:
        for row in reversed(self.history):
            if row["model"] == name and row["split"] == "val" and row["round"] == round_ and row["metric"] == self.metric:
                return float(row["value"])
        return math.nan

    def _record(self, round_: int, epoch: int, name: str, split: str, metrics: dict[str, float]) -> None:
        for metric, value in metrics.items():
            self.history.append({"round": round_, "epoch": epoch, "site": self.name, "model": name,
                                 "split": split, "metric": metric, "value": float(value)})

    def _select(self, round_: int) -> None:
        """Save this round's models and keep the round whose used model scores best on validation.

        Every round's models are kept (``models/round_XXXX.pt``: network config and a state dict per model),
        so that `medfl export --round` can take the selected, the last or any round.
        """
        self.folder.save_round_models(round_, {
            "round": round_, "site": self.name, "network": self.models[self.used_name].config,
            "used": self.used_name, "receiving": self.receiving_name,
            "models": {name: _cpu_state(model) for name, model in self.models.items()}})
        values = self._round_values(self.used_name, round_)
        selected = running_best(values)
        self.best = {"round": selected, "value": values[selected]}

    def _round_values(self, name: str, last: int) -> list[float]:
        """Model ``name``'s validation score at the end of rounds 0..last."""
        return [self._phi(name, r) for r in range(last + 1)]

    def _test_needed(self, name: str) -> bool:
        """Whether model ``name`` is scored on test after this round. The used model: where a round selected
        by validation can fall (its validation score beats every earlier round's, the rule `_select` follows)
        and in the last round; the deputy: in the last round. Nothing the run reports reads another test
        score (`medfl evaluate` scores any exported round on demand)."""
        if self.round == self.experiment.rounds - 1:
            return True
        return name == self.used_name and running_best(self._round_values(name, self.round)) == self.round

    def evaluate(self, data: ExchangeObject | None = None, extra: dict | None = None) -> ExchangeObject:
        """Metrics of the models after this round (test where it can be reported), the rows not yet reported,
        DET states, retrogress, the selected round and the round's timing."""
        epoch = self.experiment.local_epochs
        tick = time.perf_counter()
        for name in self.models:
            if self._test_needed(name):
                self._record(self.round, epoch, name, "test", self._score(name, "test"))
        timing = {"train_s": self._timing.get("train_s", 0.0),
                  "eval_s": self._timing.get("eval_s", 0.0) + time.perf_counter() - tick}
        rows = self.history[self._pending_rows:]
        self._pending_rows = len(self.history)
        report = {
            "round": self.round,
            "rows": rows,
            "det": [e for e in self.det_log if e["round"] == self.round],
            "retrogress": [e for e in self.retrogress_log if e["round"] == self.round],
            "best": dict(self.best),
            "timing": timing,
        }
        self._departures.append({"what": "report", **report})
        self._flush_audit()
        return ExchangeObject(metrics=report)

    # ----------------------------------------------------------------- upload
    def get_weights(self, extra: dict | None = None) -> ExchangeObject:
        """What leaves the site: the receiving model's weights (none for prototype-only methods),
        the sample count, class counts and local class prototypes. Logged to the audit log.

        Prototypes of classes with fewer training samples than the site config's `withhold_prototypes_below`
        are not sent (zero row, count 0: the server treats the class as absent at this site)."""
        weights: dict[str, Tensor] = {}
        if self.spec.sends_weights:
            weights = _cpu_state(self.models[self.receiving_name])
        statistics: dict[str, Any] = {
            "num_samples": len(self.datasets["train"]),
            "class_counts": self.class_counts.clone(),
        }
        if self._local_prototypes is not None:
            prototypes, counts = (t.detach().cpu().clone() for t in self._local_prototypes)
            withheld = counts < self.config.withhold_prototypes_below
            prototypes[withheld], counts[withheld] = 0.0, 0
            statistics["prototypes"], statistics["prototype_counts"] = prototypes, counts
        described = describe_values(statistics)
        entry_weights = describe_tensors(weights)
        described["bytes"] += sum(e["bytes"] for e in entry_weights)
        self._departures.append({"what": "upload", "weights": entry_weights, **described})
        self._flush_audit()
        return ExchangeObject(weights=weights, weight_type=WeightType.WEIGHTS, statistics=statistics)

    def _flush_audit(self) -> None:
        """Write what left the site since the last flush, under the round it belongs to (the next round for
        what left before this round's training: the data statistics at a (re)start)."""
        if self._departures and self.folder.record_file.is_file():
            self.folder.audit([{"round": self.round, **entry} for entry in self._departures])
            self._departures = []

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to restart this site after its last completed round."""
        return {
            "round": self.round,
            "models": {name: _cpu_state(model) for name, model in self.models.items()},
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
            "history": self.history,
            "det_log": self.det_log,
            "retrogress_log": self.retrogress_log,
            "best": self.best,
            "pending_rows": self._pending_rows,
            "global": self._global,
            "local_prototypes": self._local_prototypes,
            "received": self._received,
        }

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
        """Restore the state saved after ``round_``; what the audit log says of later rounds is dropped, since
        those rounds run again."""
        state = self.folder.load_state(round_)
        self.folder.forget_audit_after(round_)
        for name, model in self.models.items():
            model.load_state_dict(state["models"][name])
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        self.round = state["round"]
        self.history = state["history"]
        self.det_log = state["det_log"]
        self.retrogress_log = state["retrogress_log"]
        self.best = state["best"]
        self._pending_rows = state["pending_rows"]
        self._global = state["global"]
        self._local_prototypes = state["local_prototypes"]
        self._received = state["received"]
        if self._global["counts"] is not None and self.spec.aggregation is not None:
            self.loss_fn.set_class_counts(self._global["counts"])
        self._cache = {}
        self._to_device()

    def _to_device(self) -> None:
        for model in self.models.values():
            model.to(self.device)
        for opt in self.optimizers.values():
            for state in opt.state.values():
                for key, value in state.items():
                    if isinstance(value, Tensor):
                        state[key] = value.to(self.device)

    def offload(self) -> None:
        """Move models to the CPU while other sites use the GPU."""
        for model in self.models.values():
            model.to("cpu")

    def finalize(self, extra: dict | None = None) -> None:
        self.offload()

    def abort(self, extra: dict | None = None) -> None:
        self.offload()


def _cpu_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _input_channels(record: dict[str, Any], task: str) -> int:
    """Input channels: 3 for RGB dermoscopy, 1 + 2 * context slices for MRI (read off a record)."""
    if task == "classification":
        return 3
    return int(np.asarray(record["image"]).shape[0])
