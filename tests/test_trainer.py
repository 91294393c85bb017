"""LocalTrainer on its own: plain PyTorch models and batches, no data files, no MONAI FL, no engine."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from medfl.errors import MedflError
from medfl.experiment import ExperimentConfig
from medfl.federated.det import DetState
from medfl.federated.payloads import Delivery
from medfl.federated.trainer import LocalTrainer
from medfl.methods import ModelRole
from medfl.tasks import task_for

P, D, M = ModelRole.PERSONALIZED, ModelRole.DEPUTY, ModelRole.SINGLE


class Tiny(nn.Module):
    """(logits, features), as medfl networks return them."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(5, 4)
        self.final_classifier = nn.Linear(4, 3)

    def forward(self, x):
        features = torch.relu(self.body(x))
        return self.final_classifier(features), features


def batches(n: int = 3, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randn(8, 5, generator=g), "label": torch.arange(8) % 3} for _ in range(n)]


def trainer(method: str = "prr", **changes) -> LocalTrainer:
    config = ExperimentConfig.model_validate({
        "task": "classification", "sites": ["a.yaml"], "data": {"classes": ["nv", "bkl", "mel"]},
        "method": method, "rounds": 4, "local_epochs": 2, "cpa": {"warmup_rounds": 1}, **changes})
    torch.manual_seed(0)
    first = Tiny()
    models = {role: first if role == config.spec.used_role else Tiny() for role in config.spec.roles}
    if config.spec.two_models:
        models[D].load_state_dict(first.state_dict())
    task = task_for(config.task)
    return LocalTrainer(models, config, task, task.supervised_loss(config.spec.loss, torch.ones(3), 0.8),
                        torch.device("cpu"))


def test_receiving_replaces_only_the_deputy_and_keeps_the_federations_statistics():
    local = trainer()
    p_before = {k: v.clone() for k, v in local.models[P].state_dict().items()}
    weights = {k: v + 1.0 for k, v in local.models[D].state_dict().items()}
    counts = torch.tensor([10.0, 5.0, 1.0], dtype=torch.float64)
    assert local.receive(Delivery(weights, global_class_counts=counts))
    assert all(torch.equal(local.models[D].state_dict()[k], weights[k]) for k in weights)
    assert all(torch.equal(local.models[P].state_dict()[k], p_before[k]) for k in p_before), "P is never replaced"
    assert torch.equal(local.global_["counts"], counts) and local.received is not None
    assert not local.receive(Delivery(global_class_counts=counts)), "statistics alone replace no weights"
    assert not local.receive(None)
    with pytest.raises(MedflError, match="unknown entries"):
        local.receive(Delivery({"nope.weight": torch.zeros(1)}))


@pytest.mark.parametrize("optimizer", [{"name": "adam", "lr": 1e-3}, {"name": "sgd", "lr": 0.1, "momentum": 0.9}])
def test_every_round_starts_with_fresh_optimizer_state(optimizer):
    local = trainer(optimizer=optimizer)
    local.start_round(0)
    local.epoch(0, 1, DetState.EXCHANGE, batches())
    assert all(len(opt.state) > 0 for opt in local.optimizers.values())
    local.start_round(1)
    assert all(len(opt.state) == 0 for opt in local.optimizers.values())


def test_learning_rate_follows_the_round_and_state_carries_over_when_asked():
    local = trainer(optimizer={"name": "sgd", "lr": 0.4, "momentum": 0.9, "lr_step_rounds": 2, "lr_gamma": 0.5,
                               "reset_every_round": False})
    local.start_round(0)
    local.epoch(0, 1, DetState.EXCHANGE, batches())
    local.start_round(2)
    assert all(len(opt.state) > 0 for opt in local.optimizers.values())
    assert {opt.param_groups[0]["lr"] for opt in local.optimizers.values()} == {0.2}


def test_det_states_follow_the_validation_scores():
    local = trainer()
    assert local.next_state(DetState.START, {P: 0.9, D: 0.9}) is DetState.RECOVER
    assert local.next_state(DetState.RECOVER, {P: 0.8, D: 0.7}) is DetState.EXCHANGE
    assert local.next_state(DetState.EXCHANGE, {P: 0.8, D: 0.75}) is DetState.SUBLIMATE
    assert trainer("fml").next_state(DetState.START, {P: 0.9, D: 0.1}) is DetState.EXCHANGE
    assert trainer("fedavg").next_state(DetState.START, {M: 0.5}) is DetState.START


def test_an_epoch_trains_and_refreshes_prototypes_after_warm_up():
    local = trainer()
    local.start_round(0)
    before = {k: v.clone() for k, v in local.models[P].state_dict().items()}
    losses = local.epoch(0, 1, DetState.EXCHANGE, batches())
    assert set(losses) == {P, D} and all(v > 0 for v in losses.values())
    assert any(not torch.equal(before[k], v) for k, v in local.models[P].state_dict().items())
    assert local.local_prototypes is None, "warm-up: only the round's last epoch gives prototypes"
    local.epoch(0, 2, DetState.EXCHANGE, batches(seed=1))
    first = local.local_prototypes[0].clone()
    local.epoch(1, 1, DetState.EXCHANGE, batches(seed=2))
    assert not torch.equal(first, local.local_prototypes[0]), "after warm-up every epoch refreshes them"
    assert local.local_prototypes[1].tolist() == [9, 9, 6], "per-class sample counts of the epoch"


def test_the_upload_holds_the_deputy_counts_and_prototypes_and_withholds_rare_classes():
    local = trainer()
    local.start_round(0)
    local.epoch(0, 2, DetState.EXCHANGE, batches())
    update = local.upload(24, torch.tensor([8.0, 8.0, 8.0]), withhold_below=7)
    assert set(update.weights) == set(local.models[D].state_dict()) and update.num_samples == 24
    assert update.prototype_counts.tolist() == [9, 9, 0] and float(update.prototypes[2].abs().sum()) == 0.0
    assert float(update.prototypes[:2].abs().sum()) > 0
    assert trainer("fedproto").upload(24, torch.ones(3)).weights == {}


def test_state_dict_round_trip_restores_models_optimizers_and_prototypes():
    local = trainer(optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9, "reset_every_round": False})
    local.start_round(0)
    local.epoch(0, 2, DetState.EXCHANGE, batches())
    buffer = io.BytesIO()
    torch.save(local.state_dict(), buffer)  # as a restart state goes through the site's folder
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert all(isinstance(key, str) for key in state["models"]), "plain keys: weights_only loads them"
    other = trainer(optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9, "reset_every_round": False})
    other.load_state_dict(state)
    for role in (P, D):
        assert all(torch.equal(local.models[role].state_dict()[k], v) for k, v in other.models[role].state_dict().items())
    assert torch.equal(other.local_prototypes[0], local.local_prototypes[0])
    local.epoch(0, 1, DetState.EXCHANGE, batches(seed=3))
    other.epoch(0, 1, DetState.EXCHANGE, batches(seed=3))
    assert all(torch.equal(local.models[D].state_dict()[k], v) for k, v in other.models[D].state_dict().items())


def test_the_trainer_needs_no_federated_learning_engine_and_medfl_none_without_nvflare(tiny_federation, tmp_path):
    """Neither NVFlare nor medfl's engine adapters (the ClientAlgo, the round loop) load with the trainer.

    Then, in the same fresh interpreter (one start of torch and MONAI for both checks), with NVFlare made
    unimportable as where the `[nvflare]` extra is not installed: the core package imports, and `medfl
    nvflare-job` says in one line how to install it and writes nothing."""
    import subprocess
    import sys

    from conftest import tiny_experiment

    experiment, job = tiny_experiment(tmp_path / "exp.yaml", tiny_federation, "classification"), tmp_path / "job"
    engines = ("nvflare", "medfl.federated.site", "medfl.federated.coordinator", "medfl.federated.rounds")
    code = (
        "import sys\nimport medfl.federated.trainer\n"
        f"loaded = sorted(m for m in sys.modules if m.startswith({engines!r}))\n"
        "if loaded:\n    sys.exit(f'loaded with the trainer: {loaded}')\n"
        "sys.modules['nvflare'] = None\n"
        "import medfl.cli, medfl.federated.coordinator, medfl.nvflare\n"
        f"sys.exit(medfl.cli.main(['nvflare-job', {str(experiment)!r}, '--out', {str(job)!r}]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "loaded with the trainer" not in result.stderr, result.stderr
    assert result.returncode == 1, result.stderr
    assert "pip install 'medfl[nvflare]'" in result.stderr and "Traceback" not in result.stderr
    assert not job.exists()
