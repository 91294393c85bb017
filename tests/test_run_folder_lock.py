"""One process per run folder: two `medfl run` on one folder, started at the same moment, never both train;
the second says in one line which process holds the folder. The lock goes with the process, and a lock file
left behind neither blocks a later run nor makes a folder look foreign."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import held_by_another_process, tiny_experiment, wait_for_files
from medfl_process import MedflProcess

from medfl.cli import main
from medfl.experiment import load_experiment_config
from medfl.federated.coordinator import Coordinator
from medfl.runfolder import (
    LOCK_FILE,
    SCHEMA_VERSION,
    SITE_LOCK_FILE,
    FolderInUse,
    RunFolder,
    SiteFolder,
    SiteRecord,
)
from medfl.tasks import task_for


@pytest.fixture(scope="module")
def experiment(tiny_federation, tmp_path_factory):
    return tiny_experiment(tmp_path_factory.mktemp("lock") / "exp.yaml", tiny_federation, "classification",
                           method="fedavg", runtime={"threads": 1})


@pytest.fixture(scope="module")
def finished(experiment, tmp_path_factory, one_thread):
    """A finished fedavg run of 1 round: the template that tests copy."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    Coordinator(load_experiment_config(experiment, rounds=1), run_dir, torch.device("cpu"),
                task=task_for("classification")).run()
    return run_dir


def started_together(signals: Path, *argument_lists: list[str]) -> list[tuple[int, int, str]]:
    """Run one `medfl` process per argument list (tests/medfl_process.py), all calling the command at the same
    moment: each loads medfl, writes a file saying it is ready and waits for the test's go file. (pid, exit
    status, stderr) each."""
    signals.mkdir()
    go = signals / "go"
    ready = [signals / f"ready{i}" for i in range(len(argument_lists))]
    processes = [MedflProcess(arguments, signals / f"stdout{i}", signals / f"stderr{i}", ready=flag, go=go)
                 for i, (flag, arguments) in enumerate(zip(ready, argument_lists, strict=True))]
    wait_for_files(ready, processes)
    go.touch()
    return [(process.pid, process.wait(timeout=600), process.errors()) for process in processes]


def audit(run_dir: Path, site: str) -> list[tuple[int, str]]:
    lines = (run_dir / "sites" / site / "audit.jsonl").read_text().splitlines()
    return [(entry["round"], entry["what"]) for entry in map(json.loads, lines)]


def one_trains_the_other_names_it(results: list[tuple[int, int, str]], run_dir: Path) -> None:
    (winner, _, won), (_, _, lost) = sorted(results, key=lambda result: result[1])
    assert sorted(status for _, status, _ in results) == [0, 1], [error[-2000:] for _, _, error in results]
    assert "Traceback" not in won + lost
    assert lost.strip().splitlines() == [
        f"medfl run: error: {run_dir} is in use by process {winner} on {socket.gethostname()}: one process at a "
        "time works in it (wait until that one ends)"]


@pytest.mark.slow
def test_two_resumes_at_once_one_trains_and_the_other_names_the_holder(experiment, finished, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    resume = ["run", str(experiment), "--out", str(run_dir), "--resume", "--rounds", "2", "--quiet"]
    one_trains_the_other_names_it(started_together(tmp_path / "signals", resume, resume), run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["finished"] and summary["completed_rounds"] == 2
    assert len((run_dir / "timing.csv").read_text().splitlines()) == 1 + 2, "round 1 was played once"
    for site in ("derm_a", "derm_b"):  # once per round; the data statistics left again at the restart
        assert audit(run_dir, site) == [(0, "data_statistics"), (0, "report"), (0, "upload"),
                                        (1, "data_statistics"), (1, "report"), (1, "upload")], site
    # the lock went with the process: a later resume takes the folder (and finds the run finished)
    assert main(resume) == 0
    assert "has finished all 2 rounds" in capsys.readouterr().err


@pytest.mark.slow
def test_two_new_runs_on_one_folder_at_once_one_trains_and_the_other_names_the_holder(experiment, tmp_path):
    run_dir = tmp_path / "runs" / "new"
    new = ["run", str(experiment), "--out", str(run_dir), "--rounds", "1", "--quiet"]
    one_trains_the_other_names_it(started_together(tmp_path / "signals", new, new), run_dir)
    assert json.loads((run_dir / "summary.json").read_text())["finished"]
    for site in ("derm_a", "derm_b"):
        assert audit(run_dir, site) == [(0, "data_statistics"), (0, "report"), (0, "upload")], site


def test_a_folder_held_by_another_process_is_refused_in_one_line_before_anything_is_read(experiment, tmp_path,
                                                                                         capsys):
    run_dir = tmp_path / "run"
    with held_by_another_process(run_dir, LOCK_FILE, tmp_path / "signals") as pid:
        for extra in ([], ["--resume"]):
            assert main(["run", str(experiment), "--out", str(run_dir), "--quiet", *extra]) == 1
            error = capsys.readouterr().err.strip()
            assert error.splitlines() == [f"medfl run: error: {run_dir} is in use by process {pid} on "
                                          f"{socket.gethostname()}: one process at a time works in it (wait until "
                                          "that one ends)"]
    assert sorted(path.name for path in run_dir.iterdir()) == [LOCK_FILE], "nothing was written"


def test_a_lock_file_left_behind_neither_blocks_nor_makes_a_folder_foreign(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK_FILE).write_text("4711 elsewhere\n")  # what a killed run leaves: the OS lock went with it
    with RunFolder(run_dir).lock(create=True) as lock:
        assert lock.held
        RunFolder(run_dir).refuse_to_start()  # an empty folder but for its lock file: a new run may go there
        assert (run_dir / LOCK_FILE).read_text().split()[0] == str(os.getpid())
        site = SiteFolder(run_dir / "sites" / "derm_a", "derm_a")
        with site.lock():
            site.start(SiteRecord(schema_version=SCHEMA_VERSION, site="derm_a", site_config_sha256="c",
                                  data_fingerprint="d", training_files=[]))
        assert site.record.site == "derm_a"
        assert sorted(path.name for path in site.root.iterdir()) == ["site.json", SITE_LOCK_FILE]
    (run_dir / "notes.txt").write_text("mine")
    with RunFolder(run_dir).lock(create=True), pytest.raises(Exception, match="is not a medfl run folder"):
        RunFolder(run_dir).refuse_to_start()  # other files still make it foreign
    assert sorted(path.name for path in run_dir.iterdir()) == ["notes.txt", "sites"], "left as it was found"


def test_a_run_that_never_started_leaves_no_folder_and_no_lock(tmp_path):
    run_dir = tmp_path / "runs" / "deep" / "new"
    with RunFolder(run_dir).lock(create=True), RunFolder(run_dir).lock(create=True):  # re-entrant in a process
        assert (run_dir / LOCK_FILE).is_file()
    assert not (tmp_path / "runs").exists(), "the folders made for the lock are removed again"
    kept = tmp_path / "empty"
    kept.mkdir()
    with RunFolder(kept).lock(create=True):
        pass
    assert kept.is_dir() and not any(kept.iterdir()), "a folder the user made is left as it was found"


def test_the_lock_of_a_site_is_taken_by_another_process_too(tmp_path):
    site = tmp_path / "run" / "sites" / "derm_a"
    with held_by_another_process(site, SITE_LOCK_FILE, tmp_path / "signals") as pid:
        with pytest.raises(FolderInUse, match=f"{site} is in use by process {pid} "):
            SiteFolder(site, "derm_a").lock().acquire()
    with SiteFolder(site, "derm_a").lock() as lock:  # let go when that process ended
        assert lock.held


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this system")
def test_a_forked_worker_keeps_the_folder_held_until_it_ends(tmp_path):
    """The lock belongs to the open lock file, which a forked worker inherits: a folder counts as free only once
    every worker of its holder is gone (POSIX record locks, fcntl.lockf, would be dropped with the parent)."""
    run_dir, worker_may_end, forked = tmp_path / "run", tmp_path / "worker_may_end", tmp_path / "forked"
    code = ("import os, pathlib, time\nfrom medfl.runfolder import RunFolder\n"
            f"RunFolder({str(run_dir)!r}).lock(create=True).acquire()\n"
            "if os.fork() == 0:\n"
            f"    while not pathlib.Path({str(worker_may_end)!r}).exists():\n        time.sleep(0.01)\n"
            "    os._exit(0)\n"
            f"pathlib.Path({str(forked)!r}).touch()\n"
            "os._exit(0)  # the holder ends first, without letting go\n")
    holder = subprocess.run([sys.executable, "-c", code], timeout=120)
    assert holder.returncode == 0 and forked.exists()
    with pytest.raises(FolderInUse, match="is in use by process "):
        RunFolder(run_dir).lock(create=True).acquire()
    worker_may_end.touch()
    deadline = time.monotonic() + 60
    while True:  # the worker ends on its own once it sees the file: then the folder is free
        try:
            with RunFolder(run_dir).lock(create=True):
                break
        except FolderInUse:
            assert time.monotonic() < deadline, "the worker kept the folder"
            time.sleep(0.01)
