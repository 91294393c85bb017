"""End-to-end federated runs on tiny synthetic sites: every method, the run folder, selection, faults, privacy."""

from __future__ import annotations

import csv
import json
import math
import shutil

import pytest
import torch
import yaml
from conftest import tiny_experiment, tiny_run

from medfl.errors import MedflError
from medfl.experiment import load_experiment_config
from medfl.federated.coordinator import Coordinator
from medfl.federated.site import Site
from medfl.methods import METHODS
from medfl.runfolder import RunFolder
from medfl.tasks import task_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def derm_experiment(tiny_federation, tmp_path_factory):
    return tiny_experiment(tmp_path_factory.mktemp("coordinator") / "derm.yaml", tiny_federation, "classification")


ALLOWED_STATISTICS = {"num_samples", "class_counts", "prototypes", "prototype_counts"}


def run(config, tmp_path, name="run", **kwargs):
    coordinator = Coordinator(config, tmp_path / name, torch.device("cpu"), task=task_for(config.task), **kwargs)
    return coordinator, coordinator.run()


def rows(path):
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


@pytest.fixture(scope="module")
def method_run(tmp_path_factory):
    """method -> (run folder, the summary its run returned) of the tiny classification run of it (2 rounds x 1
    epoch, derm_experiment's), run once per test process (conftest.tiny_run): tests that only read it share it."""
    return lambda method: tiny_run(tmp_path_factory, "classification", method=method)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_on_classification(method, method_run):
    run_dir, summary = method_run(method)
    assert summary["finished"] and summary["completed_rounds"] == 2
    assert set(summary["sites"]) == {"derm_a", "derm_b"}
    for site in summary["sites"].values():
        assert site["selected_round"] in (0, 1)
        assert 0.0 <= site["test"]["macro_f1"] <= 1.0
        assert 0.0 <= site["test"]["accuracy"] <= 1.0
    metrics = rows(run_dir / "metrics.csv")
    used = "P" if METHODS[method].two_models else "M"
    assert {r["model"] for r in metrics} == ({"P", "D"} if METHODS[method].two_models else {"M"})
    assert {r["split"] for r in metrics} == {"val", "test"}
    assert {r["metric"] for r in metrics} >= {"macro_f1", "auc", "accuracy", "balanced_accuracy", "f1_mel"}
    assert any(r["model"] == used and r["epoch"] == "0" for r in metrics)
    assert json.loads((run_dir / "summary.json").read_text())["method"] == method
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["method"] == method and saved["rounds"] == 2
    timing = rows(run_dir / "timing.csv")
    assert len(timing) == 2 and all(float(t["train_s"]) > 0 for t in timing)
    if METHODS[method].communicates and METHODS[method].aggregation != "prototypes":
        assert float(timing[0]["aggregation_s"]) > 0
    retrogress = rows(run_dir / "retrogress.csv")
    assert len(retrogress) == (2 if METHODS[method].sends_weights else 0)  # round 1 at each site


@pytest.fixture(scope="module")
def spied_prr_run(derm_experiment, tmp_path_factory):
    """A prr run of 3 rounds that records every object the coordinator receives from a site (the spies return
    what they receive, unchanged): (config, summary, run folder, [(Site method, site, what it returned)])."""
    received = []
    with pytest.MonkeyPatch.context() as monkeypatch:
        for method in ("get_weights", "get_data_stats", "evaluate"):
            original = getattr(Site, method)

            def spy(self, *args, _original=original, _method=method, **kwargs):
                exchange = _original(self, *args, **kwargs)
                received.append((_method, self, exchange))
                return exchange

            monkeypatch.setattr(Site, method, spy)
        config = load_experiment_config(derm_experiment, rounds=3)
        folder = tmp_path_factory.mktemp("prr_3_rounds")
        _, summary = run(config, folder)
    return config, summary, folder / "run", received


def test_prr_records_det_states_retrogress_and_selects_on_validation(spied_prr_run):
    config, summary, run_dir, _ = spied_prr_run
    det = rows(run_dir / "det_states.csv")
    assert len(det) == 2 * 3 * config.local_epochs
    for row in det:
        if row["epoch"] == "1":
            assert row["state"] == "recover"  # the first epoch of every round
        assert row["state"] in {"recover", "exchange", "sublimate"}
    retro = rows(run_dir / "retrogress.csv")
    assert {(r["site"], r["round"]) for r in retro} == {(s, str(t)) for s in ("derm_a", "derm_b") for t in (1, 2)}
    for row in retro:
        assert math.isclose(float(row["retrogress"]), float(row["before"]) - float(row["after"]), abs_tol=1e-12)
        assert math.isclose(float(row["recovery"]), float(row["after_first_epoch"]) - float(row["after"]), abs_tol=1e-12)
    metrics = rows(run_dir / "metrics.csv")
    for site, result in summary["sites"].items():
        val = {
            int(r["round"]): float(r["value"]) for r in metrics
            if r["site"] == site and r["model"] == "P" and r["split"] == "val" and r["metric"] == "macro_f1"
            and r["epoch"] == str(config.local_epochs)
        }
        assert result["selected_round"] == max(val, key=lambda t: (val[t], -t))
        test_at_selected = [
            float(r["value"]) for r in metrics if r["site"] == site and r["model"] == "P" and r["split"] == "test"
            and r["metric"] == "macro_f1" and int(r["round"]) == result["selected_round"]
        ]
        assert result["test"]["macro_f1"] == pytest.approx(test_at_selected[0])
        saved = torch.load(run_dir / "sites" / site / "models" / f"round_{result['selected_round']:04d}.pt",
                           weights_only=True)
        assert saved["used"] == "P" and set(saved["models"]) == {"P", "D"}
    assert not math.isnan(summary["mean"]["retrogress"])


def test_personalised_model_is_untouched_by_communication(derm_experiment, method_run):
    config = load_experiment_config(derm_experiment)
    assert config.method == "prr" and config.rounds == 2
    run_dir, _ = method_run("prr")
    metrics = rows(run_dir / "metrics.csv")
    for site in ("derm_a", "derm_b"):
        def value(model, round_, epoch, site=site):
            return next(float(r["value"]) for r in metrics if r["site"] == site and r["model"] == model
                        and r["split"] == "val" and r["metric"] == "macro_f1"
                        and r["round"] == str(round_) and r["epoch"] == str(epoch))
        assert value("P", 1, 0) == value("P", 0, config.local_epochs)


def test_only_allowed_objects_leave_a_site(spied_prr_run):
    """Every object the coordinator receives from a site: weights of D, counts, prototypes and metrics only; no
    site sees another site's data.

    Pooled training (method `pooled`) is exempt, by design: it is the centralised reference, one model trained on
    every site's training split in one process, so the training data themselves leave the sites. It therefore
    runs only in process, NVIDIA FLARE refuses it before anything starts, and each site's audit log records that
    its training data left it (tests/test_pooled.py)."""
    _, _, run_dir, received = spied_prr_run
    assert {method for method, _, _ in received} == {"get_weights", "get_data_stats", "evaluate"}
    for method, site, exchange in received:
        assert exchange.optim is None
        if method == "get_weights":
            deputy = site.models["D"].state_dict()
            assert set(exchange.weights) == set(deputy)
            for key, tensor in exchange.weights.items():
                assert tensor.shape == deputy[key].shape
            assert set(exchange.statistics) <= ALLOWED_STATISTICS
            assert exchange.metrics is None
            assert exchange.statistics["prototypes"].shape[0] == 3  # class prototypes, never samples
        elif method == "get_data_stats":
            assert exchange.weights is None and exchange.metrics is None
            assert set(exchange.statistics) == {"class_counts", "num_samples", "network"}
            assert set(exchange.statistics["network"]) >= {"name", "task", "num_classes", "width"}
        else:
            assert exchange.weights is None and exchange.statistics is None
            assert set(exchange.metrics) == {"round", "rows", "det", "retrogress", "best", "timing"}
            assert set(exchange.metrics["timing"]) == {"train_s", "eval_s", "eval_samples"}
            for row in exchange.metrics["rows"]:
                assert set(row) == {"round", "epoch", "site", "model", "split", "metric", "value"}
                assert isinstance(row["value"], float)
    for site in ("derm_a", "derm_b"):
        audit = [json.loads(line) for line in (run_dir / "sites" / site / "audit.jsonl").read_text().splitlines()]
        assert [(e["round"], e["what"]) for e in audit] == [(0, "data_statistics")] + [
            (r, what) for r in range(3) for what in ("report", "upload")], "everything that left, once per round"
        upload = audit[2]
        assert upload["bytes"] == sum(e["bytes"] for e in upload["weights"]) + sum(
            e.get("bytes", 0) for e in upload["statistics"])
        assert {e["name"] for e in upload["statistics"]} == ALLOWED_STATISTICS
        counts = next(e for e in upload["statistics"] if e["name"] == "class_counts")
        assert counts["value"] == next(s for m, s, _ in received if m == "get_data_stats" and s.name == site
                                       ).class_counts.tolist(), "counts are logged as they left"
        reports = [e for m, s, e in received if m == "evaluate" and s.name == site]
        assert [e["rows"] for e in audit if e["what"] == "report"] == [
            json.loads(json.dumps(r.metrics["rows"])) for r in reports]


def test_an_earlier_run_is_never_overwritten(derm_experiment, method_run, tmp_path):
    """A finished run (a copy of the shared one, which this test must not risk) is refused as a new run's folder."""
    config = load_experiment_config(derm_experiment)
    shutil.copytree(method_run("prr")[0], tmp_path / "run")
    before = (tmp_path / "run" / "summary.json").read_bytes()
    with pytest.raises(MedflError, match="already holds a run"):
        run(config, tmp_path)
    assert (tmp_path / "run" / "summary.json").read_bytes() == before


def test_diverging_loss_names_site_round_and_epoch_and_keeps_checkpoint(derm_experiment, tmp_path, monkeypatch):
    config = load_experiment_config(derm_experiment, rounds=2)
    coordinator = Coordinator(config, tmp_path / "run", torch.device("cpu"), task=task_for(config.task))
    original = Site.train

    def poisoned(self, data, extra=None):
        if extra and extra.get("round") == 1 and self.name == "derm_b":
            self.trainer.loss.forward = lambda *a, **k: torch.tensor(float("nan"), requires_grad=True)
        return original(self, data, extra)

    monkeypatch.setattr(Site, "train", poisoned)
    with pytest.raises(MedflError, match=r"site 'derm_b', round 1, epoch 1: .*nan"):
        coordinator.run()
    assert RunFolder(tmp_path / "run").completed_rounds() == 1


@pytest.mark.parametrize("method", ["prr", "fedavg"])
def test_segmentation_runs(method, tmp_path_factory):
    _, summary = tiny_run(tmp_path_factory, "segmentation", method=method)  # the tiny segmentation experiment
    assert summary["metric"] == "dice"
    for site in summary["sites"].values():
        assert 0.0 <= site["test"]["dice"] <= 1.0
        assert site["test"]["num_cases"] >= 1
        assert "hd95_missing" in site["test"]
        # the same cases on their own voxel grids (the original in-plane size and spacing)
        assert 0.0 <= site["test"]["dice_original"] <= 1.0
        assert {"hd95_original", "hd95_original_missing"} <= set(site["test"])


def test_prefetching_trains_exactly_as_loading_inline(derm_experiment, tmp_path, monkeypatch):
    """The site's thread-prefetching loader draws the same batches and augmentations as a plain DataLoader."""
    import monai.data

    config = load_experiment_config(derm_experiment, rounds=2, local_epochs=2)
    run(config, tmp_path, name="prefetched")

    def inline(dataset, buffer_size, **options):
        return monai.data.DataLoader(dataset, **options)

    monkeypatch.setattr(monai.data, "ThreadDataLoader", inline)
    run(config, tmp_path, name="inline")
    for site in ("derm_a", "derm_b"):
        saved = {name: torch.load(tmp_path / name / "sites" / site / "models" / "round_0001.pt", weights_only=True)
                 for name in ("prefetched", "inline")}
        for model in ("P", "D"):
            for key, value in saved["inline"]["models"][model].items():
                assert torch.equal(saved["prefetched"]["models"][model][key], value), (site, model, key)
