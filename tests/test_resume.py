"""A run killed with SIGKILL mid-round and resumed ends with the same metrics as an uninterrupted run.

Each run (the uninterrupted one, the killed one, the resume) is `medfl run` in a process of its own, forked from
a server that imported medfl once (tests/medfl_process.py): the kill is a real SIGKILL of a process, and the
resume knows nothing but what the killed process left in the run folder."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import tiny_experiment
from medfl_process import MedflProcess

pytestmark = pytest.mark.slow


def medfl(*args, **kwargs):
    """`python -m medfl.cli ARGS`: a fresh interpreter, for commands that end before torch loads."""
    return subprocess.Popen([sys.executable, "-m", "medfl.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def medfl_run(experiment, out, method, *extra) -> MedflProcess:
    """`medfl run` of `method` into `out`, in a process of its own; its output goes beside `out`."""
    return MedflProcess(["run", str(experiment), "--out", str(out), "--method", method, "--quiet", *extra],
                        out.with_name(f"{out.name}{''.join(extra)}.log"))


def completed_rounds(run_dir):
    timing = run_dir / "timing.csv"
    if not timing.is_file():
        return 0
    return len(timing.read_text().splitlines()) - 1


def table(path):
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def finished(process: MedflProcess) -> str:
    """The output of a process that must end well."""
    assert process.wait(timeout=900) == 0, process.output()[-3000:]
    return process.output()


def killed_at(process: MedflProcess, ready) -> None:
    """SIGKILL `process` as soon as `ready()` holds."""
    deadline = time.monotonic() + 600
    while not ready() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert process.poll() is None, f"it ended before the kill:\n{process.output()[-3000:]}"
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL


@pytest.fixture(scope="module")
def experiment(tiny_federation, tmp_path_factory):
    """3 rounds: the kill lands in round 1, and the resumed run plays round 2 from what it computed itself. One
    local epoch: a run restarts after its last completed round, so the epochs inside a round are not part of
    what a restart restores."""
    return tiny_experiment(tmp_path_factory.mktemp("resume") / "exp.yaml", tiny_federation, "classification",
                           rounds=3, local_epochs=1, runtime={"threads": 1})


@pytest.mark.parametrize("method", ["prr", "ditto"])  # ditto: P's start and w_r travel in the restart state
def test_sigkill_mid_round_then_resume_equals_uninterrupted(experiment, tmp_path, method):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    finished(medfl_run(experiment, whole, method))
    process = medfl_run(experiment, killed, method)
    # Kill inside round 1, once derm_a has finished it (its state and audit entries written) and derm_b trains.
    first_site_done = killed / "sites" / "derm_a" / "state_round_0001.pt"
    killed_at(process, first_site_done.exists)
    assert completed_rounds(killed) == 1, "the kill must land inside round 1"
    interrupted_at = completed_rounds(killed)
    assert not json.loads((killed / "summary.json").read_text())["finished"]
    audit = killed / "sites" / "derm_a" / "audit.jsonl"
    assert any(json.loads(line)["round"] == 1 for line in audit.read_text().splitlines()), "round 1 had left"

    output = finished(medfl_run(experiment, killed, method, "--resume"))
    assert f"rounds {interrupted_at}..2" in output

    for name in ("metrics.csv", "det_states.csv", "retrogress.csv"):
        assert table(killed / name) == table(whole / name), name
    assert json.loads((killed / "summary.json").read_text())["sites"] == json.loads(
        (whole / "summary.json").read_text())["sites"]
    for site in ("derm_a", "derm_b"):
        entries = [json.loads(line) for line in (killed / "sites" / site / "audit.jsonl").read_text().splitlines()]
        left = [(e["round"], e["what"]) for e in entries]
        # once per round; the data statistics left again when the run restarted in round 1
        assert left == [(0, "data_statistics"), (0, "report"), (0, "upload"), (1, "data_statistics"),
                        (1, "report"), (1, "upload"), (2, "report"), (2, "upload")], site
    assert not list(killed.rglob("*.tmp"))


def test_pooled_training_killed_mid_round_resumes_as_uninterrupted(experiment, tmp_path):
    """Every site holds the one pooled model and its optimizer in its restart state; the kill lands while the
    union trains in round 1 (nothing of round 1 saved yet)."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    finished(medfl_run(experiment, whole, "pooled"))
    killed_at(medfl_run(experiment, killed, "pooled"), lambda: completed_rounds(killed) >= 1)
    assert completed_rounds(killed) == 1, "the kill must land inside round 1"

    assert "rounds 1..2" in finished(medfl_run(experiment, killed, "pooled", "--resume"))
    for name in ("metrics.csv", "det_states.csv", "retrogress.csv"):
        assert table(killed / name) == table(whole / name), name
    assert json.loads((killed / "summary.json").read_text())["sites"] == json.loads(
        (whole / "summary.json").read_text())["sites"]
    for site in ("derm_a", "derm_b"):
        entries = [json.loads(line) for line in (killed / "sites" / site / "audit.jsonl").read_text().splitlines()]
        assert [(e["round"], e["what"]) for e in entries] == [
            (0, "data_statistics"), (0, "training_data"), (0, "report"), (1, "data_statistics"),
            (1, "training_data"), (1, "report"), (2, "report")], site
        for round_ in range(3):
            saved = [torch.load(folder / "sites" / site / "models" / f"round_{round_:04d}.pt", weights_only=True)
                     for folder in (whole, killed)]
            assert all(torch.equal(saved[0]["models"]["M"][k], v) for k, v in saved[1]["models"]["M"].items())


def test_resume_refuses_a_changed_config_and_a_missing_run(experiment, tmp_path):
    """The refusals come from the run folder's record and config: no federation needs to run to check them."""
    from medfl.errors import ConfigError
    from medfl.experiment import load_experiment_config
    from medfl.runfolder import RunFolder

    missing = medfl("run", str(experiment), "--out", str(tmp_path / "none"), "--resume", "--quiet")
    output, _ = missing.communicate(timeout=300)
    assert missing.returncode == 1 and "nothing to resume" in output and "Traceback" not in output

    folder = RunFolder.create(tmp_path / "r", load_experiment_config(experiment))
    with pytest.raises(ConfigError, match="differs from the one it started with in method"):
        folder.resume_from(load_experiment_config(experiment, method="fedavg"))
    # The workers may change (the results are the same whatever they are), the threads may not.
    config = load_experiment_config(experiment)
    for runtime, refused in (({"parallel_sites": 2}, False), ({"parallel_sites": "auto"}, False),
                             ({"threads": 2}, True)):
        changed = config.model_copy(update={"runtime": config.runtime.model_copy(update=runtime)})
        if refused:
            with pytest.raises(ConfigError, match="differs from the one it started with in runtime"):
                folder.resume_from(changed)
        else:
            assert folder.resume_from(changed) == 0
    changed = medfl("run", str(experiment), "--out", str(tmp_path / "r"), "--resume", "--method", "fedavg", "--quiet")
    output, _ = changed.communicate(timeout=300)
    assert changed.returncode == 1 and "method" in output and "Traceback" not in output
