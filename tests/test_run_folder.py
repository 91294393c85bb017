"""The run folder as one trusted object: nothing runs from its files, nothing is lost or half-made, resume rules
hold, and the audit log says once per round everything that left a site."""

from __future__ import annotations

import csv
import errno
import json
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import tiny_experiment, tiny_run
from test_data_fingerprint import flip_one_bit_keeping_it_decodable

import medfl.runfolder as runfolder_module
from medfl.cli import main
from medfl.errors import ConfigError, DataError, MedflError
from medfl.experiment import load_experiment_config
from medfl.federated.coordinator import Coordinator
from medfl.runfolder import RunFinished, RunFolder
from medfl.tasks import task_for

pytestmark = pytest.mark.slow


class Payload:
    """Unpickling this writes a marker file: proof that loading ran code."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def _rows(path):
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def _stop_after(round_):
    def progress(event, info):
        if event == "round" and info["round"] == round_:
            raise KeyboardInterrupt

    return progress


@pytest.fixture(scope="module")
def experiment(tiny_federation, tmp_path_factory):
    return tiny_experiment(tmp_path_factory.mktemp("runfolder") / "exp.yaml", tiny_federation, "classification",
                           method="fedavg", rounds=3, local_epochs=1)


def _run(experiment, run_dir, resume=False, progress=None, **overrides):
    config = load_experiment_config(experiment, **overrides)
    return Coordinator(config, run_dir, torch.device("cpu"), progress=progress, task=task_for(config.task)).run(
        resume=resume)


@pytest.fixture(scope="module")
def unfinished(experiment, tmp_path_factory):
    """A fedavg run of 3 planned rounds stopped after round 0: the template that tests copy."""
    run_dir = tmp_path_factory.mktemp("unfinished") / "run"
    with pytest.raises(KeyboardInterrupt):
        _run(experiment, run_dir, progress=_stop_after(0))
    return run_dir


def _copy(run_dir, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(run_dir, target)
    return target


# ---------------------------------------------------------------- nothing runs from a file
@pytest.mark.parametrize("victim", ["checkpoints/last.pt", "sites/derm_a/state_round_0000.pt"])
def test_a_crafted_pickle_in_the_run_folder_is_refused_without_running(victim, experiment, unfinished, tmp_path,
                                                                        capsys, one_thread):
    run_dir = _copy(unfinished, tmp_path)
    marker = tmp_path / "payload_ran"
    torch.save({"round": 0, "payload": Payload(marker)}, run_dir / victim)
    assert main(["run", str(experiment), "--out", str(run_dir), "--resume", "--quiet"]) == 1
    error = capsys.readouterr().err.strip()
    assert "refused" in error and victim.split("/")[-1] in error and len(error.splitlines()) == 1
    assert "weights_only=False" not in error
    assert not marker.exists()


def test_a_folder_without_the_run_record_is_never_read(experiment, unfinished, tmp_path, capsys):
    run_dir = _copy(unfinished, tmp_path)
    (run_dir / "run.json").unlink()
    marker = tmp_path / "payload_ran"
    torch.save({"round": 0, "payload": Payload(marker)}, run_dir / "checkpoints" / "last.pt")
    assert main(["run", str(experiment), "--out", str(run_dir), "--resume", "--quiet"]) == 1
    assert "not a medfl run folder (no run.json)" in capsys.readouterr().err
    assert main(["run", str(experiment), "--out", str(run_dir), "--quiet"]) == 1
    assert "is not a medfl run folder" in capsys.readouterr().err
    assert not marker.exists()


# ---------------------------------------------------------------- nothing lost, nothing half-made
def test_a_folder_of_other_files_is_left_untouched(experiment, tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.yaml").write_text("my own notes\n")
    assert main(["run", str(experiment), "--out", str(folder), "--quiet"]) == 1
    assert "exists and is not a medfl run folder" in capsys.readouterr().err
    assert [p.name for p in folder.iterdir()] == ["config.yaml"]
    assert (folder / "config.yaml").read_text() == "my own notes\n"


def test_no_run_folder_is_written_when_a_site_has_a_data_error(tiny_federation, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_federation / "dermoscopy", data / "dermoscopy")
    shutil.copytree(tiny_federation / "site_configs", data / "site_configs")
    images = sorted((data / "dermoscopy" / "derm_b").rglob("*.jpg"))
    images[0].unlink()
    experiment = tiny_experiment(tmp_path / "exp.yaml", data, "classification")
    assert main(["run", str(experiment), "--out", str(tmp_path / "run"), "--quiet"]) == 1
    assert "derm_b" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_full_disk_is_one_line_and_the_last_good_round_still_resumes(experiment, unfinished, tmp_path, capsys,
                                                                        monkeypatch, one_thread):
    run_dir = _copy(unfinished, tmp_path)
    real = runfolder_module.atomic_torch_save

    def full(obj, path):
        if path.name == "last.pt":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, path)

    monkeypatch.setattr(runfolder_module, "atomic_torch_save", full)
    assert main(["run", str(experiment), "--out", str(run_dir), "--resume", "--quiet"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "last.pt: cannot write (No space left on device)" in errors[0]
    monkeypatch.setattr(runfolder_module, "atomic_torch_save", real)
    assert RunFolder(run_dir).completed_rounds() == 1, "the last good checkpoint is kept"
    (run_dir / "checkpoints" / ".last.pt.x.tmp").write_bytes(b"half")  # what a killed write leaves
    assert main(["run", str(experiment), "--out", str(run_dir), "--resume", "--quiet"]) == 0
    assert not list(run_dir.rglob("*.tmp")), "stale temporary files are cleaned on resume"
    assert json.loads((run_dir / "summary.json").read_text())["finished"]


def test_a_write_that_fails_inside_torch_is_one_line_and_the_last_good_round_still_resumes(experiment, unfinished,
                                                                                         tmp_path, capsys,
                                                                                         one_thread):
    """A real failing disk for one process: a file-size limit (RLIMIT_FSIZE) lets round 0's files through and
    stops the restart state of round 1, about twice their size, in the middle of its write. torch.save writing
    into the file turned this into `RuntimeError: [enforce fail at inline_container.cc:672] unexpected pos` and
    a traceback; a full disk (ENOSPC) reaches it the same way."""
    run_dir = _copy(unfinished, tmp_path)
    state = run_dir / "sites" / "derm_a" / "state_round_0000.pt"
    limit = state.stat().st_size * 3 // 2
    command = ["run", str(experiment), "--out", str(run_dir), "--resume", "--quiet"]
    code = ("import resource, signal, sys\nfrom medfl.cli import main\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead\n"
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
            f"sys.exit(main({command!r}))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"medfl run: error: {run_dir / 'sites' / 'derm_a' / 'state_round_0001.pt'}: cannot write (File too large); "
        f"round 0 is kept in {run_dir}: continue with --resume")
    assert RunFolder(run_dir).completed_rounds() == 1 and not list(run_dir.rglob("*.tmp"))
    assert main(command) == 0, capsys.readouterr().err
    assert json.loads((run_dir / "summary.json").read_text())["finished"]


def test_a_run_under_a_file_never_starts_and_says_so(experiment, tmp_path, capsys):
    file = tmp_path / "notes.txt"
    file.write_text("mine\n")
    assert main(["run", str(experiment), "--out", str(file / "run"), "--quiet"]) == 1
    error = capsys.readouterr().err.strip()
    assert error == (f"medfl run: error: {file / 'run'}: cannot create the folder (Not a directory); the run did not "
                     "start: no run folder was written")
    assert file.read_text() == "mine\n" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


# ---------------------------------------------------------------- resume rules
def test_resume_refuses_fewer_rounds_and_says_a_finished_run_is_finished(experiment, unfinished, tmp_path, capsys,
                                                                         one_thread):
    run_dir = _copy(unfinished, tmp_path)
    with pytest.raises(ConfigError, match="planned with 3 and a run never shrinks"):
        _run(experiment, run_dir, resume=True, rounds=1)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["rounds"] == 3
    _run(experiment, run_dir, resume=True)
    with pytest.raises(RunFinished, match="finished all 3 rounds"):
        _run(experiment, run_dir, resume=True)
    assert main(["run", str(experiment), "--out", str(run_dir), "--resume", "--quiet"]) == 0
    assert "finished all 3 rounds; nothing to do" in capsys.readouterr().err


def test_resume_refuses_a_config_yaml_changed_after_the_run(experiment, unfinished, tmp_path, capsys):
    """Editing the run's config.yaml to match a changed experiment does not sneak the change into the run."""
    run_dir = _copy(unfinished, tmp_path)
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump({**yaml.safe_load(experiment.read_text()), "optimizer": {"lr": 0.5}}))
    resolved = load_experiment_config(changed).resolved()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    before = sorted(path.name for path in run_dir.rglob("*"))
    assert main(["run", str(changed), "--out", str(run_dir), "--resume", "--quiet"]) == 1
    error = capsys.readouterr().err
    assert f"{run_dir / 'config.yaml'}: changed after the run" in error and len(error.splitlines()) == 1
    assert sorted(path.name for path in run_dir.rglob("*")) == before


def test_resume_refuses_a_site_whose_data_changed(tiny_federation, tmp_path, one_thread):
    data = tmp_path / "data"
    shutil.copytree(tiny_federation / "dermoscopy", data / "dermoscopy")
    shutil.copytree(tiny_federation / "site_configs", data / "site_configs")
    experiment = tiny_experiment(tmp_path / "exp.yaml", data, "classification", method="fedavg", rounds=2)
    with pytest.raises(KeyboardInterrupt):
        _run(experiment, tmp_path / "run", progress=_stop_after(0))
    table = next((data / "dermoscopy" / "derm_b").glob("*.csv"))
    lines = table.read_text().splitlines(keepends=True)
    table.write_text("".join(lines[:-1]))  # one row fewer: an edited table or filter
    with pytest.raises(ConfigError, match="site 'derm_b': its data .* changed since this run started"):
        _run(experiment, tmp_path / "run", resume=True)


def test_resume_refuses_one_flipped_bit_and_a_site_record_of_the_size_only_fingerprint(tiny_federation, tmp_path,
                                                                                        one_thread, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_federation / "dermoscopy", data / "dermoscopy")
    shutil.copytree(tiny_federation / "site_configs", data / "site_configs")
    experiment = tiny_experiment(tmp_path / "exp.yaml", data, "classification", method="fedavg", rounds=2)
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        _run(experiment, run_dir, progress=_stop_after(0))
    record = run_dir / "sites" / "derm_b" / "site.json"
    saved = json.loads(record.read_text())
    assert saved["data_fingerprint_version"] == 2
    image = data / "dermoscopy" / "derm_b" / saved["training_files"][0]
    original = image.read_bytes()
    flip_one_bit_keeping_it_decodable(image)  # the same size: a size-only fingerprint did not see it
    assert image.stat().st_size == len(original)
    assert main(["run", str(experiment), "--out", str(run_dir), "--resume", "--rounds", "3", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "site 'derm_b': its data (files, their contents" in err
    assert json.loads((run_dir / "run.json").read_text())["rounds"] == 2  # the refused resume changed no plan
    image.write_bytes(original)
    # A site.json of the medfl that compared sizes only (no data_fingerprint_version): refused in one line.
    record.write_text(json.dumps({k: v for k, v in saved.items() if k != "data_fingerprint_version"}))
    assert main(["run", str(experiment), "--out", str(run_dir), "--resume", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and f"site 'derm_b': {record} was written by an earlier medfl" in err
    record.write_text(json.dumps(saved))
    assert main(["run", str(experiment), "--out", str(run_dir), "--resume", "--quiet"]) == 0


def test_more_rounds_equal_a_fresh_longer_run_for_fedavg(experiment, tmp_path, tmp_path_factory, one_thread):
    _run(experiment, tmp_path / "extended", rounds=2)
    _run(experiment, tmp_path / "extended", resume=True, rounds=3)
    # A fresh run of `experiment` (3 rounds), shared with test_local_training's reference protocol test
    fresh, _ = tiny_run(tmp_path_factory, "classification", method="fedavg", rounds=3, local_epochs=1)
    extended = tmp_path / "extended"
    configs = [{k: v for k, v in yaml.safe_load((run / "config.yaml").read_text()).items() if k != "output_dir"}
               for run in (extended, fresh)]
    assert configs[0] == configs[1], "the same experiment"
    for name in ("det_states.csv", "retrogress.csv"):
        assert _rows(extended / name) == _rows(fresh / name), name
    key = ("round", "epoch", "site", "model", "split", "metric")
    extended_rows = {tuple(r[k] for k in key): r["value"] for r in _rows(extended / "metrics.csv")}
    fresh_rows = {tuple(r[k] for k in key): r["value"] for r in _rows(fresh / "metrics.csv")}
    assert all(extended_rows[k] == v for k, v in fresh_rows.items()), "every value of the fresh run, equal"
    extra = set(extended_rows) - set(fresh_rows)
    assert extra and all(k[0] == "1" and k[4] == "test" for k in extra), "only what the 2-round run scored last"
    summaries = [json.loads((folder / "summary.json").read_text()) for folder in (extended, fresh)]
    for part in ("sites", "mean", "reference_protocol", "rounds", "finished"):
        assert summaries[0][part] == summaries[1][part], part
    for site in ("derm_a", "derm_b"):
        weights = [torch.load(folder / "sites" / site / "models" / "round_0002.pt", weights_only=True)["models"]["M"]
                   for folder in (extended, fresh)]
        assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_more_rounds_are_refused_where_the_schedule_is_planned_over_the_rounds(experiment, tmp_path, one_thread):
    _run(experiment, tmp_path / "run", rounds=1, method="prr")
    with pytest.raises(ConfigError, match="from 1 to 2 rounds: PFA's low-frequency ratio grows over the planned "
                                          "rounds, so the result would match no fresh run"):
        _run(experiment, tmp_path / "run", resume=True, rounds=2, method="prr")
    _run(experiment, tmp_path / "det", rounds=1, method="fedavg_det", cpa={"beta": 0.8})
    with pytest.raises(ConfigError, match="CPA's warm-up is 30% of the planned rounds"):
        _run(experiment, tmp_path / "det", resume=True, rounds=2, method="fedavg_det", cpa={"beta": 0.8})


# ---------------------------------------------------------------- what leaves a site
def test_prototypes_of_rare_classes_can_be_withheld(tiny_federation, tmp_path, one_thread):
    from medfl.config import load_site_config

    configs = tmp_path / "configs"
    configs.mkdir()
    sites = []
    for name in ("derm_a", "derm_b"):
        source = tiny_federation / "site_configs" / "dermoscopy" / f"{name}.yaml"
        data = yaml.safe_load(source.read_text())
        data["data_root"] = str(load_site_config(source).data_root)
        data["withhold_prototypes_below"] = 10**6 if name == "derm_b" else 0
        (configs / f"{name}.yaml").write_text(yaml.safe_dump(data))
        sites.append(str(configs / f"{name}.yaml"))
    experiment = tiny_experiment(tmp_path / "exp.yaml", tiny_federation, "classification", rounds=1)
    config = load_experiment_config(experiment).model_copy(update={"sites": [pathlib.Path(s) for s in sites]})
    coordinator = Coordinator(config, tmp_path / "run", torch.device("cpu"), task=task_for(config.task))
    coordinator.run()
    uploads = {name: site.get_weights().statistics for name, site in coordinator.sites.items()}
    assert int(uploads["derm_b"]["prototype_counts"].sum()) == 0 and float(uploads["derm_b"]["prototypes"].abs().sum()) == 0
    assert int(uploads["derm_a"]["prototype_counts"].min()) > 0


def test_errors_name_the_folder_in_one_line(tmp_path):
    with pytest.raises(MedflError, match="nothing to resume"):
        RunFolder.open(tmp_path / "none")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "run.json").write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(MedflError, match="schema version 99; this medfl reads version 1"):
        RunFolder.open(tmp_path / "bad")
    assert not issubclass(DataError, RunFinished)
