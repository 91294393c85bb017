"""Ditto: P (v) learns on loss(v) + lambda/2 ||v - w_r||^2 and starts from the first global model; D (w) is FedAvg's
model, the only one that is uploaded. Trainer-level checks on a tiny network; end-to-end checks on the tiny
federation (the run, both protocols, the upload and audit log, export, NVFlare's loopback)."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_experiment
from torch import nn

from medfl.experiment import ExperimentConfig, load_experiment_config
from medfl.federated.det import DetState
from medfl.federated.payloads import Delivery
from medfl.federated.trainer import LocalTrainer
from medfl.methods import ModelRole, method_spec
from medfl.tasks import task_for

P, D = ModelRole.PERSONALIZED, ModelRole.DEPUTY


class TinyBN(nn.Module):
    """(logits, features) with a BatchNorm layer, so that normalisation statistics are part of the state."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(5, 4)
        self.norm = nn.BatchNorm1d(4)
        self.final_classifier = nn.Linear(4, 3)

    def forward(self, x):
        features = torch.relu(self.norm(self.body(x)))
        return self.final_classifier(features), features


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(8, 5, generator=g), "label": torch.arange(8) % 3}


def ditto_trainer(ditto_lambda: float = 0.5, seed: int = 0) -> LocalTrainer:
    """A Ditto site's trainer on plain SGD (no momentum, no weight decay), P and D from one initialisation."""
    config = ExperimentConfig.model_validate({
        "task": "classification", "sites": ["a.yaml"], "data": {"classes": ["nv", "bkl", "mel"]},
        "method": "ditto", "rounds": 3, "local_epochs": 1, "baselines": {"ditto_lambda": ditto_lambda},
        "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0}})
    torch.manual_seed(seed)
    first = TinyBN()
    models = {P: first, D: TinyBN()}
    models[D].load_state_dict(first.state_dict())
    task = task_for(config.task)
    return LocalTrainer(models, config, task, task.supervised_loss("ce", torch.ones(3), 0.8), torch.device("cpu"))


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def shifted(weights: dict[str, torch.Tensor], by: float) -> dict[str, torch.Tensor]:
    return {k: v + by if v.is_floating_point() else v for k, v in weights.items()}


def test_the_method_table_row():
    spec = method_spec("ditto")
    assert spec.two_models and spec.distillation is None and spec.aggregation == "fedavg" and spec.loss == "ce"
    assert spec.personal_proximal and not spec.proximal
    assert (spec.used_role, spec.receiving_role) == (P, D)


def test_v_starts_from_the_first_global_model_the_site_holds():
    counts = torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64)
    # Round 0: the server delivers no weights (every site builds w^0 from the seed): v and w_r are the site's w^0.
    local = ditto_trainer()
    with torch.no_grad():
        local.models[P].body.weight.add_(1.0)  # v made different from w^0, to see where it starts
        local.models[P].norm.running_mean.add_(3.0)
    w0 = state(local.models[D])
    assert not local.receive(Delivery(global_class_counts=counts))
    assert equal(state(local.models[P]), w0), "v is w^0, normalisation statistics included"
    assert equal(local.received, w0), "w_r of round 0 is w^0"
    # A site whose first global model arrives with weights (it held none before): v starts from those.
    other = ditto_trainer(seed=1)
    delivered = shifted(state(other.models[D]), 0.25)
    assert other.receive(Delivery(delivered, global_class_counts=counts))
    assert equal(state(other.models[P]), delivered) and equal(other.received, delivered)
    # Later global models replace w and w_r only: v goes on from where it is.
    v = state(other.models[P])
    later = shifted(delivered, 0.5)
    assert other.receive(Delivery(later))
    assert equal(state(other.models[P]), v) and equal(other.received, later)
    assert equal(state(other.models[D]), later)


def test_one_sgd_step_of_v_and_w_is_the_formula():
    """v <- v - eta (grad F_k(v) + lambda (v - w_r)); w <- w_r - eta grad F_k(w_r) (FedAvg's step, no term)."""
    lam, eta = 0.5, 0.1
    local = ditto_trainer(lam)
    local.receive(Delivery(global_class_counts=torch.ones(3)))
    local.start_round(0)
    local.epoch(0, 1, DetState.START, [batch(1)])  # round 0: v and w move apart (each its own loss)
    w_r = shifted(state(local.models[D]), 0.05)  # round 1's global model, unlike v
    local.receive(Delivery(w_r))
    local.start_round(1)
    v = state(local.models[P])
    assert not equal(v, w_r)

    def by_hand(start: dict[str, torch.Tensor], proximal: bool) -> dict[str, torch.Tensor]:
        model = TinyBN()
        model.load_state_dict(start)
        model.train()
        logits, _ = model(batch(2)["image"])
        loss = F.cross_entropy(logits, batch(2)["label"])
        names = [name for name, _ in model.named_parameters()]
        grads = torch.autograd.grad(loss, [p for _, p in model.named_parameters()])
        stepped = dict(state(model))  # BatchNorm statistics after the forward pass in training mode
        for name, grad in zip(names, grads, strict=True):
            pull = lam * (start[name] - w_r[name]) if proximal else 0.0
            stepped[name] = start[name] - eta * (grad + pull)
        return stepped

    losses = local.epoch(1, 1, DetState.START, [batch(2)])
    expected_v, expected_w = by_hand(v, proximal=True), by_hand(w_r, proximal=False)
    for key, value in state(local.models[P]).items():
        torch.testing.assert_close(value, expected_v[key], rtol=1e-6, atol=1e-7, msg=key)
    for key, value in state(local.models[D]).items():
        torch.testing.assert_close(value, expected_w[key], rtol=1e-6, atol=1e-7, msg=key)
    squared = sum(float((v[n] - w_r[n]).pow(2).sum()) for n, _ in local.models[P].named_parameters())
    with torch.no_grad():
        model = TinyBN()
        model.load_state_dict(v)
        model.train()
        ce = float(F.cross_entropy(model(batch(2)["image"])[0], batch(2)["label"]))
    assert losses[P] == pytest.approx(ce + lam / 2 * squared, rel=1e-5), "P's loss: CE + lambda/2 ||v - w_r||^2"


def test_lambda_zero_trains_v_on_its_own_loss_only():
    local = ditto_trainer(0.0)
    local.receive(Delivery(global_class_counts=torch.ones(3)))
    local.start_round(0)
    local.epoch(0, 1, DetState.START, [batch(1)])
    local.receive(Delivery(shifted(state(local.models[D]), 1.0)))
    local.start_round(1)
    v = state(local.models[P])
    reference = TinyBN()
    reference.load_state_dict(v)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    reference.train()
    F.cross_entropy(reference(batch(2)["image"])[0], batch(2)["label"]).backward()
    optimizer.step()
    local.epoch(1, 1, DetState.START, [batch(2)])
    assert equal(state(local.models[P]), state(reference))


def test_w_r_is_kept_in_the_restart_state():
    local = ditto_trainer()
    local.receive(Delivery(global_class_counts=torch.ones(3)))
    local.start_round(0)
    local.epoch(0, 1, DetState.START, [batch(1)])
    local.receive(Delivery(shifted(state(local.models[D]), 0.1)))
    saved = local.state_dict()
    restarted = ditto_trainer(seed=7)
    restarted.load_state_dict(saved)
    restarted.receive(None)  # a restarted site that receives nothing keeps its w_r and v
    assert equal(restarted.received, local.received)
    for trainer in (local, restarted):
        trainer.start_round(1)
        trainer.epoch(1, 1, DetState.START, [batch(3)])
    for role in (P, D):
        assert equal(state(restarted.models[role]), state(local.models[role]))


# ---------------------------------------------------------------- end to end on the tiny federation
def rows(path):
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


@pytest.fixture(scope="module")
def experiment(tiny_federation, tmp_path_factory):
    return tiny_experiment(tmp_path_factory.mktemp("ditto") / "exp.yaml", tiny_federation, "classification",
                           method="ditto", rounds=2, local_epochs=1, runtime={"threads": 1}, device="cpu")


@pytest.mark.slow
def test_a_tiny_ditto_run_uploads_w_only_and_exports_v(experiment, tmp_path, monkeypatch, one_thread):
    from medfl.deliver import export_run
    from medfl.federated.coordinator import Coordinator
    from medfl.federated.site import Site

    uploads = []
    original = Site.get_weights

    def spy(self, *args, **kwargs):
        exchange = original(self, *args, **kwargs)
        uploads.append((self.name, self.round, exchange.weights, state(self.models[P]), state(self.models[D])))
        return exchange

    monkeypatch.setattr(Site, "get_weights", spy)
    run_dir = tmp_path / "run"
    summary = Coordinator(load_experiment_config(experiment), run_dir, torch.device("cpu"),
                          task=task_for("classification")).run()
    assert summary["finished"] and summary["method"] == "ditto"
    assert len(uploads) == 4
    for site, round_, weights, v, w in uploads:
        assert equal(weights, w), (site, round_, "w is uploaded")
        assert any(not torch.equal(weights[k], v[k]) for k in weights), (site, round_, "v never leaves")
    for site in ("derm_a", "derm_b"):
        audit = [json.loads(line) for line in (run_dir / "sites" / site / "audit.jsonl").read_text().splitlines()]
        assert [(e["round"], e["what"]) for e in audit] == [(0, "data_statistics")] + [
            (r, what) for r in range(2) for what in ("report", "upload")]
        saved = torch.load(run_dir / "sites" / site / "models" / "round_0001.pt", weights_only=True)
        assert saved["used"] == "P" and saved["receiving"] == "D"
        upload = next(e for e in audit if e["what"] == "upload" and e["round"] == 1)
        assert [e["name"] for e in upload["weights"]] == list(saved["models"]["D"])

    metrics = rows(run_dir / "metrics.csv")
    assert {r["model"] for r in metrics} == {"P", "D"}
    assert {r["state"] for r in rows(run_dir / "det_states.csv")} == {""}, "no DET states: P and D do not distil"
    for site, result in summary["sites"].items():  # the fine-tuned protocol: P after local training
        val = {int(r["round"]): float(r["value"]) for r in metrics if r["site"] == site and r["model"] == "P"
               and r["split"] == "val" and r["metric"] == "macro_f1" and r["epoch"] == "1"}
        assert result["selected_round"] == max(val, key=lambda t: (val[t], -t))
    reference = summary["reference_protocol"]  # P right after communication, one round for all sites
    assert reference["selected_round"] is not None and set(reference["sites"]) == {"derm_a", "derm_b"}
    assert len(rows(run_dir / "retrogress.csv")) == 2, "D's retrogress after round 1's communication"

    exports = export_run(run_dir, out=tmp_path / "export", task=task_for("classification"))
    for export in exports:
        selected = summary["sites"][export.site]["selected_round"]
        saved = torch.load(run_dir / "sites" / export.site / "models" / f"round_{selected:04d}.pt",
                           weights_only=True)["models"]
        exported = torch.load(export.folder / "model.pt", weights_only=True)
        assert export.manifest["model"]["name"] == "P" and equal(exported, saved["P"]), "the export is v"


def test_fedprox_pulls_towards_w0_from_round_0_as_towards_every_later_global_model():
    """FedProx (Li et al., 2020) adds mu/2 ||w - w^t||^2 in every round, the first included: in round 0 the server
    delivers no weights, every site builds w^0 from the seed, and that is the reference of the proximal term."""
    mu, eta = 0.5, 0.1
    config = ExperimentConfig.model_validate({
        "task": "classification", "sites": ["a.yaml"], "data": {"classes": ["nv", "bkl", "mel"]},
        "method": "fedprox", "rounds": 3, "local_epochs": 1, "baselines": {"fedprox_mu": mu},
        "optimizer": {"name": "sgd", "lr": eta, "momentum": 0.0, "weight_decay": 0.0}})
    torch.manual_seed(0)
    model = TinyBN()
    task = task_for(config.task)
    trainer = LocalTrainer({ModelRole.SINGLE: model}, config, task, task.supervised_loss("ce", torch.ones(3), 0.8),
                           torch.device("cpu"))
    w0 = state(model)
    assert not trainer.receive(Delivery(global_class_counts=torch.ones(3)))
    assert equal(trainer.received, w0), "round 0's reference is the w^0 the site built"
    trainer.start_round(0)
    trainer.epoch(0, 1, DetState.START, [batch(1)])  # at w^0 the proximal gradient is zero: w moves away
    w = state(model)
    assert not equal(w, w0)

    model_by_hand = TinyBN()
    model_by_hand.load_state_dict(w)
    model_by_hand.train()
    loss = F.cross_entropy(model_by_hand(batch(2)["image"])[0], batch(2)["label"])
    names = [name for name, _ in model_by_hand.named_parameters()]
    grads = torch.autograd.grad(loss, [p for _, p in model_by_hand.named_parameters()])
    trainer.epoch(0, 1, DetState.START, [batch(2)])  # the second step, still round 0: pulled back towards w^0
    for name, grad in zip(names, grads, strict=True):
        torch.testing.assert_close(state(model)[name], w[name] - eta * (grad + mu * (w[name] - w0[name])),
                                   rtol=1e-6, atol=1e-7, msg=name)
    assert equal(trainer.received, w0)
