"""medfl on NVIDIA FLARE: payloads, the job folder, the site adapter with the controller over a loopback
transport (faults, restart), and an exported job in NVFlare's simulator against the in-process coordinator.

Skipped where the `[nvflare]` extra is not installed.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("nvflare")

from conftest import held_by_another_process, tiny_3d_experiment, tiny_experiment  # noqa: E402
from monai.fl.utils.exchange_object import ExchangeObject  # noqa: E402
from nvflare.app_common.utils.fl_model_utils import FLModelUtils  # noqa: E402
from nvflare.app_opt.pt.decomposers import TensorDecomposer  # noqa: E402
from nvflare.fuel.utils import fobs  # noqa: E402

from medfl.cli import main as medfl_main  # noqa: E402
from medfl.config import load_site_config  # noqa: E402
from medfl.errors import ConfigError  # noqa: E402
from medfl.experiment import load_experiment_config  # noqa: E402
from medfl.federated.coordinator import Coordinator  # noqa: E402
from medfl.federated.payloads import Delivery  # noqa: E402
from medfl.federated.site import Site  # noqa: E402
from medfl.nvflare.controller import MedflController  # noqa: E402
from medfl.nvflare.job import CONTROLLER_CLASS, write_job  # noqa: E402
from medfl.nvflare.layout import CONFIG_FOLDER, SITE_CONFIG_ENV, SITE_SCRIPT  # noqa: E402
from medfl.nvflare.payloads import (  # noqa: E402
    KEY,
    TASK_TRAIN,
    read_reply,
    read_train_task,
    results_task,
    train_reply,
    train_task,
)
from medfl.nvflare.site_runner import SiteRunner, build_runner, load_job_configs  # noqa: E402
from medfl.runfolder import LOCK_FILE, SITE_LOCK_FILE, FolderInUse  # noqa: E402
from medfl.tasks import task_for  # noqa: E402

SITES = ("derm_a", "derm_b")
COMPARED = ("metrics.csv", "det_states.csv", "retrogress.csv")


def wire(model):
    """An FLModel after NVFlare's serialization (FOBS with the PyTorch tensor decomposer) and back."""
    fobs.register(TensorDecomposer)
    return FLModelUtils.from_shareable(fobs.loads(fobs.dumps(FLModelUtils.to_shareable(model))))


def table(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def assert_same_results(reference: Path, run: Path, site_folders: dict[str, Path] | None = None,
                        sites: tuple[str, ...] = SITES) -> None:
    """Every site's metrics, DET states, retrogress, selection and saved models are identical (the models where
    each site keeps its part of the run: the run folder, or its own folder)."""
    for name in COMPARED:
        assert table(run / name) == table(reference / name), name
    assert json.loads((run / "summary.json").read_text())["sites"] == json.loads(
        (reference / "summary.json").read_text())["sites"]
    for site in sites:
        kept = (site_folders or {}).get(site, run)
        for saved in sorted((reference / "sites" / site / "models").glob("round_*.pt")):
            expected = torch.load(saved, weights_only=True)["models"]
            actual = torch.load(kept / "sites" / site / "models" / saved.name, weights_only=True)["models"]
            for model, state in expected.items():
                assert all(torch.equal(state[key], actual[model][key]) for key in state), (site, saved.name, model)


@pytest.fixture(scope="module")
def experiment(tiny_federation, tmp_path_factory) -> Path:
    """Two tiny synthetic dermoscopy sites, 2 rounds, one torch thread (as every site process uses)."""
    root = tmp_path_factory.mktemp("nvflare")
    return tiny_experiment(root / "exp.yaml", tiny_federation, "classification", sites=SITES, name="tiny",
                           runtime={"threads": 1}, device="cpu", output_dir=str(root / "runs"))


@pytest.fixture(scope="module")
def in_process(experiment, tmp_path_factory) -> Path:
    """The reference: the in-process coordinator's run of the same experiment and seed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_dir = tmp_path_factory.mktemp("reference") / "run"
        config = load_experiment_config(experiment)
        Coordinator(config, run_dir, torch.device("cpu"), task=task_for(config.task)).run()
    finally:
        torch.set_num_threads(threads)
    return run_dir


class Loopback(MedflController):
    """The controller with NVFlare's transport replaced by in-process SiteRunners (payloads still serialized).

    `lost` holds (round, site) pairs whose train reply never reaches the server (a timeout after the work).
    """

    def __init__(self, config, run_dir: Path, lost=(), crash_after=None):
        super().__init__(sites=[site.name for site in config.load_sites()], run_dir=str(run_dir))
        self.runners = {s.name: SiteRunner(s, config, run_dir, "cpu") for s in config.load_sites()}
        self.lost = set(lost)
        self.crash_after = crash_after  # (round, site): the server dies right after this site's work
        self.sent: list[tuple[str, str, object]] = []

    def exchange(self, task, payloads, timeout):
        replies = {}
        for site, payload in payloads.items():
            payload = wire(payload)
            self.sent.append((task, site, payload))
            reply = wire(self.runners[site].handle(payload))
            if self.crash_after == (payload.current_round, site):
                raise SystemExit("server process killed")
            if (payload.current_round, site) in self.lost:
                continue
            reply.meta["client_name"] = site
            replies[site] = read_reply(reply)
        return replies


# ---------------------------------------------------------------- payloads
def test_payloads_carry_exactly_what_the_in_process_coordinator_passes():
    weights = {"conv.weight": torch.randn(4, 3, 3, 3), "bn.num_batches_tracked": torch.tensor(7)}
    statistics = {"global_class_counts": torch.tensor([5.0, 2.0, 1.0], dtype=torch.float64),
                  "global_prototypes": torch.randn(3, 8), "global_prototype_present": torch.tensor([1, 1, 0])}
    task = read_train_task(wire(train_task(Delivery(weights, **statistics), 3, 5, True)))
    assert (task.round, task.upload) == (3, True)
    assert task.delivery.weights.keys() == weights.keys()
    assert all(torch.equal(task.delivery.weights[k], v) and task.delivery.weights[k].dtype == v.dtype
               for k, v in weights.items())
    assert all(torch.equal(task.delivery.statistics[k], v) for k, v in statistics.items())

    counts_only = read_train_task(wire(train_task(Delivery(global_class_counts=None), 0, 5, True)))
    assert counts_only.delivery == Delivery()
    assert read_train_task(wire(train_task(None, 4, 5, False))).delivery is None

    upload = ExchangeObject(weights=weights, statistics={"num_samples": 9, "class_counts": statistics[
        "global_class_counts"], "prototypes": statistics["global_prototypes"]})
    report = {"round": 3, "rows": [{"value": float("nan")}], "det": [], "retrogress": [], "best": {"round": 2},
              "timing": {"train_s": 1.5, "eval_s": 0.5}}
    sent = wire(train_reply(3, report, upload))
    sent.meta["client_name"] = "derm_a"
    reply = read_reply(sent)
    assert (reply.site, reply.round, reply.failed) == ("derm_a", 3, None)
    assert reply.report["timing"] == {"train_s": 1.5, "eval_s": 0.5}
    assert reply.report["best"] == {"round": 2} and reply.report["rows"][0]["value"] != 0
    assert all(torch.equal(reply.upload.weights[k], v) for k, v in weights.items())
    assert reply.upload.num_samples == 9
    assert torch.equal(reply.upload.prototypes, statistics["global_prototypes"])
    last = wire(train_reply(4, report, None))
    last.meta["client_name"] = "derm_a"
    assert read_reply(last).upload is None


# ---------------------------------------------------------------- the job folder
def test_job_folder_has_one_app_per_named_site_and_no_medfl_code(experiment, tmp_path):
    config = load_experiment_config(experiment)
    job = write_job(config, tmp_path / "job", run_dir=tmp_path / "runs" / "fl", round_timeout=60, min_sites=1)
    meta = json.loads((job / "meta.json").read_text())
    assert meta["deploy_map"] == {"app_server": ["server"], "app_derm_a": ["derm_a"], "app_derm_b": ["derm_b"]}
    assert meta["min_clients"] == 1
    server = json.loads((job / "app_server" / "config" / "config_fed_server.json").read_text())
    (workflow,) = server["workflows"]
    assert workflow["path"] == CONTROLLER_CLASS
    assert workflow["args"]["sites"] == list(SITES) and workflow["args"]["round_timeout"] == 60
    assert workflow["args"]["run_dir"] == str((tmp_path / "runs" / "fl").resolve())
    assert sorted(p.relative_to(job).as_posix() for p in job.rglob("*.py")) == [
        f"app_{site}/custom/{SITE_SCRIPT}" for site in SITES]
    for site in SITES:
        app = job / f"app_{site}"
        client = json.loads((app / "config" / "config_fed_client.json").read_text())
        args = client["executors"][0]["executor"]["args"]
        assert args["task_script_path"] == SITE_SCRIPT
        assert args.get("server_expected_format", "pytorch") == "pytorch"  # NVFlare 2.7 omits its default
        carried = app / "config" / CONFIG_FOLDER
        assert load_experiment_config(carried / "experiment.yaml").resolved() == config.resolved()
        own = load_site_config(carried / "site.yaml")
        assert own.name == site and own.data_root == load_site_config(config.sites[SITES.index(site)]).data_root
        assert yaml.safe_load((carried / "job.yaml").read_text()) == {"run_dir": workflow["args"]["run_dir"]}
    assert not list((job / "app_derm_a").rglob("derm_b*")), "a site's app carries only its own site config"


def test_job_writer_refuses_a_used_folder_and_impossible_settings(experiment, tmp_path):
    config = load_experiment_config(experiment)
    used = tmp_path / "used"
    (used / "old").mkdir(parents=True)
    with pytest.raises(ConfigError, match="not empty"):
        write_job(config, used)
    with pytest.raises(ConfigError, match="min_sites"):
        write_job(config, tmp_path / "a", min_sites=3)
    with pytest.raises(ConfigError, match="round_timeout"):
        write_job(config, tmp_path / "b", round_timeout=-1)


def test_cli_writes_a_job_and_reports_mistakes_in_one_line(experiment, tmp_path, capsys):
    assert medfl_main(["nvflare-job", str(experiment), "--out", str(tmp_path / "job"), "--method", "fedavg"]) == 0
    assert "derm_a, derm_b" in capsys.readouterr().out
    assert json.loads((tmp_path / "job" / "meta.json").read_text())["name"] == "medfl-tiny-fedavg"
    assert medfl_main(["nvflare-job", str(experiment), "--out", str(tmp_path / "job")]) == 1
    assert "not empty" in capsys.readouterr().err


def test_a_site_checks_its_config_against_its_nvflare_name_and_may_use_its_own(experiment, tmp_path, monkeypatch):
    job = write_job(load_experiment_config(experiment), tmp_path / "job")
    carried = job / "app_derm_a" / "config" / CONFIG_FOLDER
    _, site_config = load_job_configs(carried, "derm_a")
    assert site_config.name == "derm_a"
    with pytest.raises(ConfigError, match="for site 'derm_a', but this NVFlare client is 'derm_b'"):
        load_job_configs(carried, "derm_b")
    own = Path(load_experiment_config(experiment).sites[1])
    monkeypatch.setenv(SITE_CONFIG_ENV, str(own))
    _, site_config = load_job_configs(carried, "derm_b")
    assert site_config.source_path == own.resolve()


# The core package without NVFlare (it imports, and `medfl nvflare-job` says how to install it): checked in
# tests/test_trainer.py, in the fresh interpreter that checks what the trainer loads.


def test_the_controller_and_each_site_hold_their_folders(experiment, tmp_path):
    """The server's workflow holds the run folder and each site's process its own part, as `medfl run` does: a
    folder another process holds is refused before anything in it is read."""
    config = load_experiment_config(experiment)
    run_dir = tmp_path / "fl"
    site = run_dir / "sites" / "derm_a"
    with held_by_another_process(site, SITE_LOCK_FILE, tmp_path / "signals"):
        runner = SiteRunner(config.load_sites()[0], config, run_dir, "cpu")
        for task in (train_task(None, 0, 2, True), results_task({})):
            reply = runner.handle(task)
            assert reply.meta[KEY]["failed"] == "FolderInUse", reply.meta
        assert sorted(path.name for path in run_dir.rglob("*")) == ["derm_a", SITE_LOCK_FILE, "sites"]
    with held_by_another_process(run_dir, LOCK_FILE, tmp_path / "signals") as pid:
        with pytest.raises(FolderInUse, match=f"{run_dir} is in use by process {pid} "):
            MedflController(sites=list(SITES), run_dir=str(run_dir)).run_experiment(config)
    assert not (run_dir / "run.json").exists()


# ---------------------------------------------------------------- controller and site adapter (loopback)
@pytest.mark.slow
def test_controller_and_site_runners_reproduce_the_in_process_run(experiment, in_process, tmp_path, one_thread):
    config = load_experiment_config(experiment)
    Loopback(config, tmp_path / "fl").run_experiment(config)
    assert_same_results(in_process, tmp_path / "fl")
    assert {(r["round"], r["status"]) for r in table(tmp_path / "fl" / "participation.csv")} == {
        ("0", "answered"), ("1", "answered")}


@pytest.mark.slow
def test_a_3d_job_is_written_and_its_sites_reproduce_the_in_process_run(tiny_federation, tmp_path, one_thread, capsys):
    """data.dims 3: `medfl nvflare-job` writes the job, each site builds the 3-D task from the carried experiment,
    and one round through the controller and site runners equals the in-process coordinator's."""
    experiment = tiny_3d_experiment(tmp_path / "exp.yaml", tiny_federation, "prr")
    assert medfl_main(["nvflare-job", str(experiment), "--out", str(tmp_path / "job")]) == 0
    assert "prost_a, prost_b" in capsys.readouterr().out
    carried = tmp_path / "job" / "app_prost_a" / "config" / CONFIG_FOLDER
    runner = build_runner(carried, "prost_a")
    assert runner.experiment.data.dims == 3 and runner.experiment.data.patch_size == (16, 16, 8)
    config = load_experiment_config(experiment)
    Coordinator(config, tmp_path / "in_process", torch.device("cpu"), task=task_for(config.task, config)).run()
    Loopback(config, tmp_path / "fl").run_experiment(config)
    assert_same_results(tmp_path / "in_process", tmp_path / "fl", sites=("prost_a", "prost_b"))
    saved = torch.load(next((tmp_path / "fl" / "sites" / "prost_a" / "models").glob("round_*.pt")), weights_only=True)
    assert saved["network"]["spatial_dims"] == 3


@pytest.mark.slow
def test_ditto_through_the_controller_and_site_runners_equals_in_process(experiment, tmp_path, one_thread):
    """Ditto's P, its start and its w_r live at the site: the NVFlare path computes what the in-process one does."""
    config = load_experiment_config(experiment, method="ditto")
    Coordinator(config, tmp_path / "in_process", torch.device("cpu"), task=task_for(config.task)).run()
    Loopback(config, tmp_path / "fl").run_experiment(config)
    assert_same_results(tmp_path / "in_process", tmp_path / "fl")
    assert json.loads((tmp_path / "fl" / "summary.json").read_text())["method"] == "ditto"


def test_controller_and_site_refuse_pooled_training_before_anything_starts(experiment, tmp_path):
    """A pooled job (not written by `medfl nvflare-job`, which refuses it too): no task is sent, nothing written."""
    config = load_experiment_config(experiment, method="pooled")
    server = Loopback(config, tmp_path / "fl")
    with pytest.raises(ConfigError, match="never under NVIDIA FLARE"):
        server.run_experiment(config)
    assert server.sent == [] and not (tmp_path / "fl").exists()
    carried = write_job(load_experiment_config(experiment), tmp_path / "job") / "app_derm_a" / "config" / CONFIG_FOLDER
    (carried / "experiment.yaml").write_text(yaml.safe_dump({**config.resolved(), "method": "pooled"}))
    with pytest.raises(ConfigError, match="never under NVIDIA FLARE"):
        build_runner(carried, "derm_a")


@pytest.mark.slow
def test_failed_and_silent_sites_keep_their_model_and_rejoin(experiment, tmp_path, monkeypatch, one_thread):
    config = load_experiment_config(experiment, rounds=3)
    train = Site.train

    def failing(self, data, extra=None):
        if self.name == "derm_a" and extra["round"] == 1:
            raise RuntimeError("cannot read /secret/hospital/path")
        return train(self, data, extra)

    monkeypatch.setattr(Site, "train", failing)
    server = Loopback(config, tmp_path / "fl", lost={(0, "derm_b")})
    server.run_experiment(config)
    run_dir = tmp_path / "fl"
    statuses = {(int(r["round"]), r["site"]): r["status"] for r in table(run_dir / "participation.csv")}
    assert statuses == {(0, "derm_a"): "answered", (0, "derm_b"): "no answer", (1, "derm_a"): "failed (RuntimeError)",
                        (1, "derm_b"): "answered", (2, "derm_a"): "answered", (2, "derm_b"): "answered"}
    tasks = {(site, model.current_round): read_train_task(model) for task, site, model in server.sent
             if task == TASK_TRAIN}
    assert tasks[("derm_b", 1)].delivery.weights is None, "a silent site keeps its model"
    assert tasks[("derm_b", 1)].delivery.statistics["global_class_counts"] is not None
    assert tasks[("derm_a", 1)].delivery.weights is not None
    assert tasks[("derm_a", 2)].delivery.weights is None, "a failed site keeps its model"
    assert tasks[("derm_b", 2)].delivery.weights is not None
    reported = {(r["site"], int(r["round"])) for r in table(run_dir / "metrics.csv")}
    assert reported == {("derm_a", 0), ("derm_b", 1), ("derm_a", 2), ("derm_b", 2)}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["finished"] and set(summary["sites"]) == set(SITES)
    assert server.runners["derm_a"].site.round == 2
    failure = server.runners["derm_a"].handle(train_task(None, 1, 3, True))  # round 1 fails again
    assert failure.meta[KEY] == {"round": 1, "failed": "RuntimeError"}, "only the error's type leaves the site"


@pytest.mark.slow
def test_a_restarted_job_resumes_after_the_last_completed_round(experiment, in_process, tmp_path, one_thread):
    config = load_experiment_config(experiment)
    run_dir = tmp_path / "fl"
    with pytest.raises(SystemExit):  # derm_a has trained round 1 when the server dies
        Loopback(config, run_dir, crash_after=(1, "derm_a")).run_experiment(config)
    assert json.loads((run_dir / "summary.json").read_text())["completed_rounds"] == 1

    restarted = Loopback(config, run_dir)  # new site processes too: they resume from their saved state
    restarted.run_experiment(config)
    assert {task for task, _, _ in restarted.sent} == {"data_stats", TASK_TRAIN, "results"}
    assert {model.current_round for task, _, model in restarted.sent if task == TASK_TRAIN} == {1}
    assert_same_results(in_process, run_dir)

    finished = Loopback(config, run_dir)
    finished.run_experiment(config)
    assert finished.sent == [], "a finished run is left alone"


# ---------------------------------------------------------------- the exported job in NVFlare's simulator
@pytest.mark.slow
def test_exported_job_in_the_simulator_matches_in_process_and_each_hospital_exports_with_its_own_files(
        tiny_federation, in_process, tmp_path, capsys):
    """One job in NVFlare's simulator (each a fresh process, so the two checks share it):

    It equals the in-process coordinator. Each hospital keeps its data and its part of the run in a folder of
    its own (the models stay there); the job ends by sending each its own results, so that it exports its model
    from its local folder alone.

    After the job, the job writer's site configs (named in every run folder's config.yaml) and the other
    hospital's files are gone: the hospital still exports, and reports, from its own run folder, whose
    config.yaml is the one the job sent."""
    from medfl.deliver.export import export_run

    writer = tmp_path / "writer"
    hospitals = {site: tmp_path / "hospital" / site for site in SITES}
    for site, folder in hospitals.items():
        shutil.copytree(tiny_federation / "dermoscopy" / site, folder / "data")
        config = yaml.safe_load((tiny_federation / "site_configs" / "dermoscopy" / f"{site}.yaml").read_text())
        path = writer / "site_configs" / "dermoscopy" / f"{site}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump({**config, "data_root": str(folder / "data")}))
    # the `experiment` fixture's settings (the in-process reference's), on the hospitals' copies of the data
    experiment = tiny_experiment(writer / "exp.yaml", writer, "classification", sites=SITES, name="tiny",
                                 runtime={"threads": 1}, device="cpu", output_dir=str(writer / "runs"))
    job = write_job(load_experiment_config(experiment), tmp_path / "job", run_dir=tmp_path / "fl")
    for site, folder in hospitals.items():
        (job / f"app_{site}" / "config" / CONFIG_FOLDER / "job.yaml").write_text(
            yaml.safe_dump({"run_dir": str(folder / "run")}))
    nvflare = Path(sys.executable).with_name("nvflare")
    result = subprocess.run([str(nvflare), "simulator", str(job), "-w", str(tmp_path / "workspace"), "-t", "2"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "fl" / "summary.json").read_text())
    assert summary["finished"], result.stdout[-3000:]
    assert not (tmp_path / "fl" / "sites").exists(), "the models stay at the hospitals"
    assert_same_results(in_process, tmp_path / "fl", {site: folder / "run" for site, folder in hospitals.items()})
    for site, folder in hospitals.items():
        kept = json.loads((folder / "run" / "summary.json").read_text())
        assert list(kept["sites"]) == [site], "a hospital receives its own results only"
        assert {row["site"] for row in table(folder / "run" / "metrics.csv")} == {site}
    (exported,) = export_run(hospitals["derm_b"] / "run", task=task_for("classification"))
    assert exported.site == "derm_b"
    assert exported.manifest["round"]["selected"] == summary["sites"]["derm_b"]["selected_round"]
    sent = (tmp_path / "fl" / "config.yaml").read_bytes()
    assert all((folder / "run" / "config.yaml").read_bytes() == sent for folder in hospitals.values())

    for gone in (writer, job, tmp_path / "workspace", tmp_path / "fl", hospitals["derm_b"]):
        shutil.rmtree(gone)
    run = hospitals["derm_a"] / "run"
    assert medfl_main(["export", str(run)]) == 0, capsys.readouterr().err
    manifest = json.loads((run / "export" / "derm_a" / "manifest.json").read_text())
    selected = json.loads((run / "summary.json").read_text())["sites"]["derm_a"]["selected_round"]
    assert manifest["site"] == "derm_a" and manifest["round"]["selected"] == selected
    assert selected == summary["sites"]["derm_a"]["selected_round"]
    weights = torch.load(run / "export" / "derm_a" / "model.pt", weights_only=True)
    saved = torch.load(run / "sites" / "derm_a" / "models" / f"round_{selected:04d}.pt", weights_only=True)
    assert all(torch.equal(weights[k], v) for k, v in saved["models"]["P"].items())
    capsys.readouterr()
    assert medfl_main(["report", str(run), "--device", "cpu"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and notes[0].startswith("note: confusion matrix of site 'derm_a' skipped:")
    assert (run / "report" / "report.md").is_file()
