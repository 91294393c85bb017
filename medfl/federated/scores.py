"""What a site measures about its models, and when: scores per (round, epoch, model, split), computed once
per model state; the round that validation selects; when a test score is worth computing; the retrogress
and DET logs. The metric rows are what a site reports to the server (and its audit log records)."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from medfl.federated.evaluation import evaluate_model, reestimate_batchnorm
from medfl.methods import ModelRole
from medfl.metrics import running_best

if TYPE_CHECKING:
    from medfl.tasks import Task


class SiteScores:
    """The scores of one site's models, cached per model state, and the rows recorded from them."""

    def __init__(self, site: str, task: Task, classes: Sequence[str], models: Mapping[ModelRole, nn.Module],
                 device: torch.device, batches: Callable[[str], Iterable[Mapping[str, Any]]],
                 spacing_of: Callable[[str], Sequence[float] | None], size_of: Callable[[str], int],
                 original_of: Callable[[str], Any] | None = None):
        self.site, self.task, self.classes, self.models, self.device = site, task, list(classes), models, device
        self.batches, self.spacing_of, self.size_of, self.original_of = batches, spacing_of, size_of, original_of
        self.metric = task.metric
        self.history: list[dict[str, Any]] = []  # metric rows (round, epoch, site, model, split, metric, value)
        self.det_log: list[dict[str, Any]] = []
        self.retrogress_log: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {"round": None, "value": -math.inf}
        self.pending_rows = 0
        self.eval_seconds = 0.0  # time spent scoring (a round's timing splits training from it)
        self.eval_samples = 0  # samples scored (images, or slices), for the cost per evaluated sample
        self._cache: dict[tuple[ModelRole, str], dict[str, float]] = {}

    def forget(self, role: ModelRole) -> None:
        """The model changed: its cached scores no longer hold."""
        self._cache = {key: value for key, value in self._cache.items() if key[0] != role}

    def score(self, role: ModelRole, split: str) -> dict[str, float]:
        """Metrics of model `role` on `split`, computed once per model state. Distance metrics (HD95) and the
        scores on each case's own voxel grid only on test: validation and the training split serve phi and
        selection, which read the task metric only."""
        key = (role, split)
        if key not in self._cache:
            tick = time.perf_counter()
            test = split == "test"
            # the training split may keep a selection of each case's slices (data.slices: foreground)
            self._cache[key] = evaluate_model(self.models[role], self.batches(split), self.task, self.classes,
                                              self.device, self.spacing_of, distances=test,
                                              originals=self.original_of if test else None,
                                              whole_cases=split != "train_eval")
            self.eval_seconds += time.perf_counter() - tick
            self.eval_samples += self.size_of(split)
        return self._cache[key]

    def measure(self, role: ModelRole, round_: int, epoch: int, split: str = "val") -> float:
        """The task metric of model `role` on `split` ("val", or "train" for DET's phi from the training data),
        recorded at (round, epoch); NaN counts as 0."""
        metrics = self.score(role, "train_eval" if split == "train" else split)
        self.record(round_, epoch, role, split, metrics)
        return _phi(metrics.get(self.metric, math.nan))

    def reestimate_batchnorm(self, role: ModelRole) -> None:
        """Model `role`'s BatchNorm statistics replaced by those of the site's training data (a training option:
        DETSettings.reestimate_bn_on_receive); its cached scores are dropped."""
        reestimate_batchnorm(self.models[role], self.batches("train_eval"), self.device)
        self.forget(role)

    def bn_reestimated(self, role: ModelRole) -> float:
        """phi on validation of a copy of model `role` whose BatchNorm statistics were re-estimated on the site's
        training data (evaluation preprocessing, no weight change); NaN for a net without BatchNorm."""
        model = copy.deepcopy(self.models[role])
        if not reestimate_batchnorm(model, self.batches("train_eval"), self.device):
            return math.nan
        tick = time.perf_counter()
        metrics = evaluate_model(model, self.batches("val"), self.task, self.classes, self.device, self.spacing_of,
                                 distances=False)
        self.eval_seconds += time.perf_counter() - tick
        self.eval_samples += self.size_of("val")
        return _phi(metrics.get(self.metric, math.nan))

    def record(self, round_: int, epoch: int, role: ModelRole, split: str, metrics: Mapping[str, float]) -> None:
        for metric, value in metrics.items():
            self.history.append({"round": round_, "epoch": epoch, "site": self.site, "model": role.value,
                                 "split": split, "metric": metric, "value": float(value)})

    def phi(self, role: ModelRole, round_: int) -> float:
        """Model `role`'s last validation score of `round_` (the end of its local epochs); NaN if none."""
        for row in reversed(self.history):
            if (row["model"] == role and row["split"] == "val" and row["round"] == round_
                    and row["metric"] == self.metric):
                return float(row["value"])
        return math.nan

    def select(self, round_: int, used: ModelRole) -> None:
        """Keep the round whose used model scores best on validation (the first of equal scores)."""
        values = self._round_values(used, round_)
        selected = running_best(values)
        self.best = {"round": selected, "value": values[selected]}

    def test_needed(self, role: ModelRole, used: ModelRole, round_: int, last_round: int) -> bool:
        """Whether model `role` is scored on test after `round_`. The used model: where a round selected by
        validation can fall (its validation score beats every earlier round's, the rule of `select`) and in
        the last round; the deputy: in the last round. Nothing a run reports reads another test score
        (`medfl evaluate` scores any exported round on demand)."""
        if round_ == last_round:
            return True
        return role == used and running_best(self._round_values(role, round_)) == round_

    def _round_values(self, role: ModelRole, last: int) -> list[float]:
        return [self.phi(role, r) for r in range(last + 1)]

    def report(self, round_: int) -> dict[str, Any]:
        """The rows not yet reported, this round's DET states and retrogress, and the selected round."""
        rows = self.history[self.pending_rows:]
        self.pending_rows = len(self.history)
        return {"round": round_, "rows": rows, "det": [e for e in self.det_log if e["round"] == round_],
                "retrogress": [e for e in self.retrogress_log if e["round"] == round_], "best": dict(self.best)}

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "det_log": self.det_log, "retrogress_log": self.retrogress_log,
                "best": self.best, "pending_rows": self.pending_rows}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.history, self.det_log = list(state["history"]), list(state["det_log"])
        self.retrogress_log, self.best = list(state["retrogress_log"]), dict(state["best"])
        self.pending_rows = int(state["pending_rows"])
        self._cache = {}


def _phi(value: float | None) -> float:
    return 0.0 if value is None or math.isnan(value) else float(value)
