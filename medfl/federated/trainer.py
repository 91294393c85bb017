"""How one site's models learn, in plain PyTorch: no data files, no engine, no evaluation.

`LocalTrainer` holds the site's models (P and D, or M), gives them fresh optimizers every round, loads what
the server delivers into the receiving model, picks DET's state for every local epoch from the validation
scores it is given, computes CPA's refinement weights from this site's and the federation's prototypes, and
runs one epoch over the batches it is given (medfl.federated.training). The Site feeds it data and scores;
MONAI FL or NVFlare drive the Site.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from medfl.errors import MedflError
from medfl.experiment import ExperimentConfig
from medfl.federated.cpa import PrototypeAccumulator, refinement_weights
from medfl.federated.det import DetState, next_state
from medfl.federated.ditto import start_from_global_model
from medfl.federated.params import classifier_keys
from medfl.federated.payloads import Delivery
from medfl.federated.server import SiteUpdate
from medfl.federated.training import EpochPlan, train_epoch
from medfl.methods import ModelRole

if TYPE_CHECKING:
    from medfl.tasks import Task


class LocalTrainer:
    """The models of one site and how they learn from one round to the next."""

    def __init__(self, models: dict[ModelRole, nn.Module], experiment: ExperimentConfig, task: Task,
                 loss: nn.Module, device: torch.device):
        self.models = models
        self.experiment = experiment
        self.spec = experiment.spec
        self.task = task
        self.loss = loss
        self.device = device
        self.optimizers = {role: self._optimizer(model, experiment.optimizer.lr) for role, model in models.items()}
        self.global_: dict[str, Tensor | None] = {"counts": None, "prototypes": None, "present": None}
        self.local_prototypes: tuple[Tensor, Tensor] | None = None  # (C, F) means and (C,) counts, from P
        self.received: dict[str, Tensor] | None = None  # the receiving model's state right after communication

    # ------------------------------------------------------------------ a round
    def receive(self, delivery: Delivery | None) -> bool:
        """Keep the federation's statistics and load the delivered weights into the receiving model; whether
        weights were loaded. Ditto: the first global model the site holds is also where P starts, and the
        reference of P's proximal term from round 0 on (medfl.federated.ditto); FedProx: the model the site
        built from the seed is round 0's global model, the proximal term's reference."""
        first = self.received is None
        loaded = self._load(delivery)
        if first and self.spec.personal_proximal:
            self.received = start_from_global_model(self.models[ModelRole.PERSONALIZED],
                                                    self.models[ModelRole.DEPUTY], self.received)
        elif first and not loaded and self.spec.proximal:
            # FedProx's round 0: no weights are delivered because every site builds the global model w^0 from the
            # experiment seed; its own model is w^0, the reference of the proximal term from the first step on.
            model = self.models[self.spec.receiving_role]
            self.received = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return loaded

    def _load(self, delivery: Delivery | None) -> bool:
        if delivery is None:
            return False
        for name, value in (("counts", delivery.global_class_counts), ("prototypes", delivery.global_prototypes),
                            ("present", delivery.global_prototype_present)):
            if value is not None:
                self.global_[name] = value
        if self.global_["counts"] is not None and self.spec.communicates:
            self.loss.set_class_counts(self.global_["counts"])
        if not delivery.weights:
            return False
        model = self.models[self.spec.receiving_role]
        own = model.state_dict()
        unknown = sorted(set(delivery.weights) - set(own))
        if unknown:
            raise MedflError(f"the server sent unknown entries {unknown[:3]}")
        model.load_state_dict({**own, **{k: v.to(own[k].device, own[k].dtype) for k, v in delivery.weights.items()}})
        self.received = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return True

    def start_round(self, round_: int) -> None:
        """Every model's optimizer for `round_`, at that round's learning rate.

        By default each model gets a fresh optimizer (the reference's behaviour): D's weights were just
        replaced, so momentum or Adam moments gathered on its old weights no longer describe it. With
        `optimizer.reset_every_round: false` the optimizers and their state carry over.
        """
        lr = self.experiment.optimizer.learning_rate(round_)
        if self.experiment.optimizer.reset_every_round:
            self.optimizers = {role: self._optimizer(model, lr) for role, model in self.models.items()}
            return
        for optimizer in self.optimizers.values():
            for group in optimizer.param_groups:
                group["lr"] = lr

    def next_state(self, state: DetState, phis: Mapping[ModelRole, float]) -> DetState | None:
        """DET's state for the next epoch from both models' phi (FML: always Exchange; one model: none)."""
        if self.spec.distillation == "det":
            det = self.experiment.det
            return next_state(state, phis[ModelRole.PERSONALIZED], phis[ModelRole.DEPUTY], det.lambda1, det.lambda2)
        if self.spec.distillation == "mutual":
            return DetState.EXCHANGE
        return state

    def epoch(self, round_: int, epoch: int, state: DetState, batches: Iterable[Mapping[str, Any]]) -> dict[str, float]:
        """One local epoch over `batches`: each model's mean loss. With CPA after warm-up (and in a round's last
        epoch) P's features become the site's local prototypes, which the next epoch's refinement weights
        compare with the global prototypes of the round (the reference recomputes them every local epoch)."""
        refines = self.spec.loss == "cpa" and round_ >= self.experiment.cpa_warmup_rounds
        accumulator = PrototypeAccumulator(len(self.experiment.classes)) if (
            refines or epoch == self.experiment.local_epochs) else None
        baselines = self.experiment.baselines
        plan = EpochPlan(
            state=state if self.spec.distillation else None,
            gamma=self._gamma() if refines else None,
            temperature=self.experiment.det.temperature,
            proximal_mu=self._proximal_weight(),
            received=self.received,
            prototype_weight=baselines.fedproto_weight if self.spec.prototype_loss else 0.0,
            global_prototypes=self.global_["prototypes"],
            global_present=self.global_["present"],
            trainable=self._trainable(epoch),
            accumulator=accumulator,
        )
        losses = train_epoch(self.models, self.optimizers, batches, self.loss, plan, self.task, self.device,
                             self.experiment.runtime.mixed_precision)
        if accumulator is not None:
            self.local_prototypes = accumulator.prototypes()
        return losses

    def _proximal_weight(self) -> float:
        """The weight of the used model's proximal term: FedProx's mu (on M), Ditto's lambda (on P), else 0."""
        if self.spec.proximal:
            return self.experiment.baselines.fedprox_mu
        if self.spec.personal_proximal:
            return self.experiment.baselines.ditto_lambda
        return 0.0

    def _gamma(self) -> Tensor | None:
        """CPA's refinement weights from the latest local prototypes and the round's global ones."""
        if self.local_prototypes is None or self.global_["prototypes"] is None:
            return None
        local, counts = self.local_prototypes
        return refinement_weights(local, counts, self.global_["prototypes"], self.global_["present"],
                                  self.experiment.cpa_tau, self.experiment.cpa.gamma_max).to(self.device)

    def _trainable(self, epoch: int) -> list[str] | None:
        """FedRep: the head learns first with the body frozen, the last epoch trains the body only (with one
        local epoch there is nothing to alternate: the whole model trains, as FedPer)."""
        epochs = self.experiment.local_epochs
        if not self.spec.head_first or epochs < 2:
            return None
        model = self.models[self.spec.used_role]
        head = classifier_keys(model)
        return [n for n, _ in model.named_parameters() if (n in head) == (epoch < epochs)]

    def upload(self, num_samples: int, class_counts: Tensor, withhold_below: int = 0) -> SiteUpdate:
        """What leaves the site: the receiving model's weights (none for prototype-only methods), the sample
        count, class counts and local prototypes, those of classes with fewer than `withhold_below` samples
        withheld (zero row, count 0: the server treats the class as absent here)."""
        weights = cpu_state(self.models[self.spec.receiving_role]) if self.spec.sends_weights else {}
        update = SiteUpdate(weights=weights, num_samples=num_samples, class_counts=class_counts.clone())
        if self.local_prototypes is not None:
            prototypes, counts = (t.detach().cpu().clone() for t in self.local_prototypes)
            withheld = counts < withhold_below
            prototypes[withheld], counts[withheld] = 0.0, 0
            update.prototypes, update.prototype_counts = prototypes, counts
        return update

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "models": {role.value: cpu_state(model) for role, model in self.models.items()},
            "optimizers": {role.value: opt.state_dict() for role, opt in self.optimizers.items()},
            "global": self.global_,
            "local_prototypes": self.local_prototypes,
            "received": self.received,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for role, model in self.models.items():
            model.load_state_dict(state["models"][role.value])
        for role, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][role.value])
        self.global_ = dict(state["global"])
        self.local_prototypes = state["local_prototypes"]
        self.received = state["received"]
        if self.global_["counts"] is not None and self.spec.communicates:
            self.loss.set_class_counts(self.global_["counts"])
        self.to(self.device)

    def to(self, device: torch.device | str) -> None:
        """Models and optimizer state on `device` (the CPU while other sites use the GPU)."""
        for model in self.models.values():
            model.to(device)
        for opt in self.optimizers.values():
            for entry in opt.state.values():
                for key, value in entry.items():
                    if isinstance(value, Tensor):
                        entry[key] = value.to(device)

    def _optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        opt = self.experiment.optimizer
        if opt.name == "adam":
            return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=opt.weight_decay)
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=opt.momentum, weight_decay=opt.weight_decay)


def cpu_state(model: nn.Module) -> dict[str, Tensor]:
    """A detached CPU copy of a model's state dict."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
