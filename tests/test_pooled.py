"""Pooled training, the centralised reference: one model on the union of the sites' training splits, scored at each
site on its own validation and test splits; in process only (NVFlare refuses it before anything starts)."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import tiny_experiment

from medfl.errors import ConfigError
from medfl.experiment import load_experiment_config
from medfl.methods import method_spec
from medfl.tasks import task_for

SITES = ("derm_a", "derm_b")


def rows(path):
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


@pytest.fixture(scope="module")
def experiment(tiny_federation, tmp_path_factory):
    return tiny_experiment(tmp_path_factory.mktemp("pooled") / "exp.yaml", tiny_federation, "classification",
                           method="pooled", rounds=2, local_epochs=2, runtime={"threads": 1}, device="cpu")


def test_the_method_table_row():
    spec = method_spec("pooled")
    assert spec.pools_data and not spec.communicates and not spec.two_models and spec.loss == "ce"


@pytest.mark.slow
def test_one_model_learns_from_every_sites_training_split_and_each_site_scores_it(experiment, tmp_path,
                                                                                    monkeypatch, one_thread):
    from medfl.deliver import export_run
    from medfl.federated.coordinator import Coordinator
    from medfl.federated.evaluation import evaluate_model
    from medfl.federated.pooled import PooledSites

    drawn: list[set[tuple[str, str]]] = []
    original = PooledSites._union_loader

    def recording(self, sites, round_, epoch):
        seen: set[tuple[str, str]] = set()
        drawn.append(seen)
        for batch in original(self, sites, round_, epoch):
            seen.update(zip(batch["site"], batch["id"], strict=True))
            yield batch

    monkeypatch.setattr(PooledSites, "_union_loader", recording)
    config = load_experiment_config(experiment)
    coordinator = Coordinator(config, tmp_path / "run", torch.device("cpu"), task=task_for(config.task))
    summary = coordinator.run()
    run_dir = tmp_path / "run"
    assert summary["finished"] and set(summary["sites"]) == set(SITES)

    union = {(name, record["id"]) for name, site in coordinator.sites.items()
             for record in site.data.splits["train"]}
    assert len(drawn) == 2 * 2, "one union pass per epoch, E epochs a round"
    dropped = 1 if len(union) > config.batch_size and len(union) % config.batch_size == 1 else 0
    assert all(seen <= union and len(union - seen) == dropped for seen in drawn), "every training sample, once"
    models = {id(site.models["M"]) for site in coordinator.sites.values()}
    assert len(models) == 1, "one model for all sites"

    metrics = rows(run_dir / "metrics.csv")
    assert {(r["site"], r["model"]) for r in metrics} == {(s, "M") for s in SITES}
    assert {r["split"] for r in metrics} == {"val", "test"}
    for site in SITES:  # after every epoch, on its own validation split; selected on it, like local training
        val = [r for r in metrics if r["site"] == site and r["split"] == "val" and r["metric"] == "macro_f1"]
        assert sorted((int(r["round"]), int(r["epoch"])) for r in val) == [(t, e) for t in range(2) for e in range(3)]
        final = {int(r["round"]): float(r["value"]) for r in val if r["epoch"] == "2"}
        assert summary["sites"][site]["selected_round"] == max(final, key=lambda t: (final[t], -t))
        own = coordinator.sites[site]  # the last round's model, scored here on the site's own splits
        for split in ("val", "test"):
            scored = evaluate_model(own.models["M"], own._eval_batches(split), own.task, config.classes,
                                    torch.device("cpu"), own._spacing, distances=False)
            recorded = {r["metric"]: float(r["value"]) for r in metrics if r["site"] == site and r["split"] == split
                        and r["round"] == "1" and r["epoch"] == "2"}
            assert set(recorded) >= {"macro_f1", "auc", "accuracy"}
            assert recorded == pytest.approx({m: scored[m] for m in recorded}, abs=1e-12, nan_ok=True), (site, split)
    for round_ in range(2):  # the same weights at every site, every round
        saved = [torch.load(run_dir / "sites" / s / "models" / f"round_{round_:04d}.pt", weights_only=True)
                 for s in SITES]
        assert all(set(state["models"]) == {"M"} for state in saved)
        first = saved[0]["models"]["M"]
        assert all(torch.equal(first[k], other["models"]["M"][k]) for other in saved[1:] for k in first)
    assert summary["reference_protocol"]["selected_round"] is not None
    assert rows(run_dir / "retrogress.csv") == [] and {r["state"] for r in rows(run_dir / "det_states.csv")} == {""}
    assert all(float(t["train_s"]) > 0 and float(t["aggregation_s"]) == 0 for t in rows(run_dir / "timing.csv"))
    for site in SITES:
        audit = [json.loads(line) for line in (run_dir / "sites" / site / "audit.jsonl").read_text().splitlines()]
        assert [(e["round"], e["what"]) for e in audit] == [
            (0, "data_statistics"), (0, "training_data"), (0, "report"), (1, "report")]
        assert audit[1]["samples"] == len(coordinator.sites[site].datasets["train"]), "its training data left it"

    for export in export_run(run_dir, out=tmp_path / "export", task=task_for("classification")):  # each site: the pooled model, its own selection
        selected = summary["sites"][export.site]["selected_round"]
        assert export.manifest["round"]["selected"] == selected
        assert export.manifest["training_files"]["count"] == len(union), "it learnt from every site's files"
        expected = torch.load(run_dir / "sites" / export.site / "models" / f"round_{selected:04d}.pt",
                              weights_only=True)["models"]["M"]
        state = torch.load(export.folder / "model.pt", weights_only=True)
        assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_the_job_writer_refuses_pooled_training_in_one_line(experiment, tmp_path):
    from medfl.nvflare.job import write_job

    with pytest.raises(ConfigError, match=r"method 'pooled' .* `medfl run` only, never under NVIDIA FLARE") as error:
        write_job(load_experiment_config(experiment), tmp_path / "job")
    assert "\n" not in str(error.value) and str(experiment) in str(error.value)
    assert not (tmp_path / "job").exists()


def test_medfl_nvflare_job_refuses_pooled_training_before_torch_loads(experiment, tmp_path):
    import subprocess
    import sys

    job = tmp_path / "job"
    code = ("import json, sys\nimport medfl.cli\n"
            f"status = medfl.cli.main(['nvflare-job', {str(experiment)!r}, '--out', {str(job)!r}])\n"
            "print(json.dumps({'status': status, 'torch': 'torch' in sys.modules}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert json.loads(result.stdout.splitlines()[-1]) == {"status": 1, "torch": False}
    assert result.stderr.count("\n") == 1 and "never under NVIDIA FLARE" in result.stderr
    assert "Traceback" not in result.stderr and not job.exists()
