"""Local training as the reference does it: fresh optimizers every round, prototypes refreshed every epoch,
phi from the training split as an option, BatchNorm re-estimation as a diagnostic, the reference protocol."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from conftest import tiny_experiment, tiny_run

import medfl.federated.trainer as trainer_module
from medfl.experiment import DETSettings, load_experiment_config
from medfl.federated.coordinator import Coordinator
from medfl.metrics import reference_window_start
from medfl.runlog import det_state_changes
from medfl.tasks import task_for

pytestmark = pytest.mark.slow


def _rows(path):
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def _run(tmp_path, federation, task="classification", name="run", **changes):
    config = load_experiment_config(tiny_experiment(tmp_path / f"{name}.yaml", federation, task, **changes))
    coordinator = Coordinator(config, tmp_path / name, torch.device("cpu"), task=task_for(config.task))
    return coordinator, coordinator.run()


def _spy_on_epochs(monkeypatch):
    """Record, at the start of every local epoch, each optimizer's state size and the epoch plan."""
    calls = []
    real = trainer_module.train_epoch

    def spy(models, optimizers, loader, loss_fn, plan, *args, **kwargs):
        calls.append({"state": {name: len(opt.state) for name, opt in optimizers.items()},
                      "momentum": {name: opt.param_groups[0].get("momentum") for name, opt in optimizers.items()},
                      "lr": {name: opt.param_groups[0]["lr"] for name, opt in optimizers.items()},
                      "plan": plan})
        return real(models, optimizers, loader, loss_fn, plan, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "train_epoch", spy)
    return calls


@pytest.mark.parametrize("optimizer", [{"name": "adam", "lr": 1e-3},
                                       {"name": "sgd", "lr": 1e-2, "momentum": 0.9}])
def test_every_round_starts_with_fresh_optimizers(optimizer, tiny_federation, tmp_path, monkeypatch, one_thread):
    calls = _spy_on_epochs(monkeypatch)
    _run(tmp_path, tiny_federation, sites=["derm_a"], rounds=2, local_epochs=2, optimizer=optimizer)
    # one site, 2 rounds x 2 epochs: round starts are calls 0 and 2
    assert len(calls) == 4
    for start in (0, 2):
        assert calls[start]["state"] == {"P": 0, "D": 0}, "D received new weights: no old moments or momentum"
    assert calls[1]["state"]["D"] > 0 and calls[3]["state"]["D"] > 0, "state does build up within a round"


def test_optimizer_state_carries_over_when_reset_is_off(tiny_federation, tmp_path, monkeypatch, one_thread):
    calls = _spy_on_epochs(monkeypatch)
    _run(tmp_path, tiny_federation, sites=["derm_a"], rounds=2, local_epochs=1,
         optimizer={"name": "sgd", "lr": 1e-2, "momentum": 0.9, "reset_every_round": False})
    assert calls[0]["state"] == {"P": 0, "D": 0}
    assert calls[1]["state"]["D"] > 0


def test_sgd_is_plain_by_default_and_the_learning_rate_steps_with_rounds(tiny_federation, tmp_path, monkeypatch,
                                                                           one_thread):
    calls = _spy_on_epochs(monkeypatch)
    _run(tmp_path, tiny_federation, sites=["derm_a"], rounds=3, local_epochs=1,
         optimizer={"name": "sgd", "lr": 0.04, "lr_step_rounds": 2, "lr_gamma": 0.5})
    assert [c["momentum"]["P"] for c in calls] == [0.0, 0.0, 0.0]
    assert [c["lr"]["D"] for c in calls] == [0.04, 0.04, 0.02]


def test_cpa_refreshes_local_prototypes_every_epoch_against_the_rounds_global_ones(tiny_federation, tmp_path,
                                                                                   monkeypatch, one_thread):
    seen = []
    real = trainer_module.refinement_weights

    def spy(local, counts, global_, present, tau, gamma_max):
        seen.append((local.clone(), global_.clone()))
        return real(local, counts, global_, present, tau, gamma_max)

    monkeypatch.setattr(trainer_module, "refinement_weights", spy)
    calls = _spy_on_epochs(monkeypatch)
    coordinator, _ = _run(tmp_path, tiny_federation, rounds=2, local_epochs=3, cpa={"warmup_rounds": 1})
    site_calls = calls[6:9]  # round 1 of the first site (2 sites x 3 epochs per round)
    assert all(c["plan"].accumulator is not None for c in site_calls), "every epoch after warm-up collects"
    assert all(c["plan"].accumulator is None for c in calls[:2]), "warm-up: only the last epoch's are kept"
    assert calls[2]["plan"].accumulator is not None
    first_site = seen[:3]
    assert len(seen) == 6, "one refinement per epoch and site in the refining round"
    assert all(torch.equal(first_site[0][1], g) for _, g in first_site), "global prototypes: once per round"
    assert not torch.equal(first_site[0][0], first_site[1][0]), "local prototypes change from epoch to epoch"
    # The second epoch's local prototypes are those the first epoch's accumulator produced.
    assert torch.allclose(first_site[1][0], site_calls[0]["plan"].accumulator.prototypes()[0])
    site = next(iter(coordinator.sites.values()))
    assert torch.allclose(site.trainer.local_prototypes[0], site_calls[2]["plan"].accumulator.prototypes()[0])


def test_phi_from_the_training_split_steers_det(tiny_federation, tmp_path, one_thread):
    _, summary = _run(tmp_path, tiny_federation, rounds=2, local_epochs=2, det={"phi_source": "train"})
    metrics = _rows(tmp_path / "run" / "metrics.csv")
    det = _rows(tmp_path / "run" / "det_states.csv")
    train_f1 = {(r["site"], r["round"], r["epoch"], r["model"]): float(r["value"])
                for r in metrics if r["split"] == "train" and r["metric"] == "macro_f1"}
    assert train_f1, "phi's training-split scores are recorded"
    for row in det:
        assert float(row["phi_P"]) == pytest.approx(train_f1[(row["site"], row["round"], row["epoch"], "P")])
    assert summary["finished"]


def test_phi_from_the_training_split_of_selected_slices_scores_each_case_on_its_slices(tiny_federation, tmp_path,
                                                                                       one_thread):
    """Prostate with `data.slices: foreground` keeps a case's foreground slices and a share of its empty ones for
    training: phi from the training split scores each case on the slices it has (it stopped the run before:
    "slices [...] are missing"); validation and test still score whole volumes."""
    _, summary = _run(tmp_path, tiny_federation, "segmentation", rounds=1, local_epochs=1,
                      det={"phi_source": "train"}, data={"slices": "foreground", "empty_slice_fraction": 0.2})
    metrics = _rows(tmp_path / "run" / "metrics.csv")
    train_dice = {(r["site"], r["round"], r["epoch"], r["model"]): float(r["value"])
                  for r in metrics if r["split"] == "train" and r["metric"] == "dice"}
    det = _rows(tmp_path / "run" / "det_states.csv")
    assert train_dice and det
    for row in det:
        assert float(row["phi_P"]) == pytest.approx(train_dice[(row["site"], row["round"], row["epoch"], "P")])
    assert summary["finished"] and all(not math.isnan(s["test"]["dice"]) for s in summary["sites"].values())


@pytest.fixture(scope="module")
def bn_diagnostic_run(tiny_federation, tmp_path_factory, one_thread):
    """(method, reestimate_bn_on_receive) -> (run folder, summary) of a 2-round run with the BatchNorm
    re-estimation diagnostic, run once per module (the diagnostic's own test reads the fedavg run without the
    option, which is the default)."""
    runs = {}

    def get(method, option):
        if (method, option) not in runs:
            folder = tmp_path_factory.mktemp(f"bn_{method}_{option}")
            _, summary = _run(folder, tiny_federation, method=method, rounds=2, local_epochs=1,
                              diagnostics={"bn_reestimation": True}, det={"reestimate_bn_on_receive": option})
            runs[method, option] = folder / "run", summary
        return runs[method, option]

    return get


def test_batchnorm_reestimation_diagnostic_is_recorded(bn_diagnostic_run):
    run_dir, summary = bn_diagnostic_run("fedavg", False)
    assert DETSettings().reestimate_bn_on_receive is False  # so this is the diagnostic's run with the defaults
    retro = _rows(run_dir / "retrogress.csv")
    assert retro and all(r["after_bn_reestimated"] != "" for r in retro)
    for row in retro:
        assert float(row["retrogress_bn_reestimated"]) == pytest.approx(
            float(row["before"]) - float(row["after_bn_reestimated"]))
    assert not math.isnan(summary["mean"]["retrogress_bn_reestimated"])


@pytest.mark.parametrize("method", ["fedavg_det", "fedavg"])
def test_batchnorm_reestimation_on_receive_trains_from_the_sites_own_statistics(method, bn_diagnostic_run):
    """With the training option, the received model's score right after communication is the one the diagnostic
    measures after re-estimation (the same statistics, computed twice); without it, the averaged statistics."""
    scores = {}
    for option in (False, True):
        run_dir, _ = bn_diagnostic_run(method, option)
        scores[option] = [(float(r["after"]), float(r["after_bn_reestimated"]))
                          for r in _rows(run_dir / "retrogress.csv")]
    assert scores[True] and all(after == reestimated for after, reestimated in scores[True])
    assert any(after != reestimated for after, reestimated in scores[False])


def test_batchnorm_reestimation_changes_statistics_only():
    from medfl.federated.evaluation import reestimate_batchnorm
    from medfl.models import build_model

    torch.manual_seed(0)
    model = build_model("slim_vgg16", "classification", 3, 3, width=0.125)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loader = [{"image": torch.randn(4, 3, 32, 32) * 3 + 1} for _ in range(2)]
    assert reestimate_batchnorm(model, loader, torch.device("cpu"))
    after = model.state_dict()
    stats = [k for k in after if k.endswith(("running_mean", "running_var"))]
    assert any(not torch.equal(before[k], after[k]) for k in stats)
    assert all(torch.equal(before[k], after[k]) for k in after if k not in stats and "num_batches" not in k)
    unet = build_model("unet", "segmentation", 2, 1, width=0.25)  # instance norm: nothing to re-estimate
    assert not reestimate_batchnorm(unet, loader, torch.device("cpu"))


def test_reference_protocol_selects_one_round_by_the_mean_validation_score(tmp_path_factory):
    # test_run_folder's fresh 3-round fedavg run: the same experiment, run once per test process
    run_dir, summary = tiny_run(tmp_path_factory, "classification", method="fedavg", rounds=3, local_epochs=1)
    metrics = _rows(run_dir / "metrics.csv")
    window = list(range(reference_window_start(3), 3))
    assert window == [2]
    protocol = summary["reference_protocol"]
    assert protocol["window"] == window and protocol["selected_round"] == 2

    def value(site, round_, split, metric="macro_f1"):
        (row,) = [r for r in metrics if r["site"] == site and r["round"] == str(round_) and r["epoch"] == "0"
                  and r["split"] == split and r["metric"] == metric]
        return float(row["value"])

    sites = sorted(summary["sites"])
    assert protocol["val_mean"] == pytest.approx(sum(value(s, 2, "val") for s in sites) / len(sites))
    for s in sites:
        assert protocol["sites"][s]["test"]["macro_f1"] == pytest.approx(value(s, 2, "test"))
    tested_at_start = {int(r["round"]) for r in metrics if r["epoch"] == "0" and r["split"] == "test"}
    assert tested_at_start == set(window), "test is scored right after communication only inside the window"


def test_det_state_changes_count_changes_and_fallbacks():
    rows = [{"site": "a", "round": 0, "epoch": e, "state": s}
            for e, s in enumerate(["recover", "exchange", "sublimate", "exchange", "recover"], start=1)]
    rows += [{"site": "a", "round": 1, "epoch": e, "state": s}
             for e, s in enumerate(["recover", "exchange", "exchange", "exchange", "exchange"], start=1)]
    counted = det_state_changes(rows)
    assert counted == {"det_changes_per_round": (4 + 1) / 2, "det_fallbacks_per_round": 2 / 2}
    assert all(math.isnan(v) for v in det_state_changes([{"site": "a", "round": 0, "epoch": 1, "state": ""}]).values())


def test_batchnorm_reestimation_counts_its_samples_with_its_time():
    """The diagnostic's validation pass is scoring like any other: its samples join eval_samples, as its
    seconds join eval_seconds (the cost per evaluated sample divides one by the other)."""
    from medfl.federated.scores import SiteScores
    from medfl.methods import ModelRole
    from medfl.models import build_model

    torch.manual_seed(0)
    model = build_model("slim_vgg16", "classification", 3, 3, width=0.125)
    splits = {split: [{"image": torch.randn(4, 3, 32, 32), "label": torch.tensor([0, 1, 2, 0])}
                      for _ in range(2)] for split in ("train_eval", "val")}
    scores = SiteScores("a", task_for("classification"), ["nv", "bkl", "mel"], {ModelRole.SINGLE: model},
                        torch.device("cpu"), splits.__getitem__, lambda case: None,
                        lambda split: sum(len(batch["label"]) for batch in splits[split]))
    scores.score(ModelRole.SINGLE, "val")
    assert scores.eval_samples == 8
    assert not math.isnan(scores.bn_reestimated(ModelRole.SINGLE))
    assert scores.eval_samples == 16
