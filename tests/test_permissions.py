"""Files and folders medfl creates get the permissions the process's umask gives, atomic writes included:
tempfile's mkstemp and mkdtemp would make them 600 and 700 whatever the umask, so that an imaging team's
service account could not read a bundle."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from conftest import tiny_experiment

from medfl.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    """The test runs under this umask; the process's own comes back afterwards."""
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def wrong_modes(root: Path, umask: int) -> list[str]:
    """Every path under `root` (and `root`) whose mode is not what the umask gives a new file or folder."""
    wrong = []
    for path in [root, *root.rglob("*")]:
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode != expected:
            wrong.append(f"{path.relative_to(root.parent)}: {mode:o}, not {expected:o}")
    return wrong


def test_every_writer_respects_the_umask(umask, tiny_federation, tmp_path, capsys, one_thread):
    out = tmp_path / "out"  # made here, under the test's umask: everything medfl writes goes below it
    out.mkdir()
    experiment = tiny_experiment(tmp_path / "exp.yaml", tiny_federation, "classification", method="fedavg",
                                 rounds=1, runtime={"threads": 1})
    site_config = tiny_federation / "site_configs" / "dermoscopy" / "derm_a.yaml"
    image = sorted((tiny_federation / "dermoscopy" / "derm_a").rglob("*.jpg"))[0]
    commands = {
        "synth": ["synth", "--out", str(out / "synth"), "--scale", "0.01", "--derm-sites", "1",
                  "--prostate-sites", "1"],
        "run": ["run", str(experiment), "--out", str(out / "run"), "--quiet"],
        "export": ["export", str(out / "run"), "--out", str(out / "export")],
        "bundle": ["export", str(out / "run"), "--format", "bundle", "--out", str(out / "bundle"), "--site", "derm_a"],
        "predict": ["predict", str(out / "export" / "derm_a"), str(image), "--out", str(out / "predictions"),
                    "--device", "cpu"],
        "evaluate": ["evaluate", str(out / "export" / "derm_a"), str(site_config),
                     "--out", str(out / "scores" / "derm_a.json"), "--device", "cpu"],
        "report": ["report", str(out / "run"), "--out", str(out / "report"), "--examples", "0", "--device", "cpu"],
    }
    for name, arguments in commands.items():
        assert main(arguments) == 0, (name, capsys.readouterr().err)
    written = {name: out / folder for name, folder in (("synth", "synth"), ("run", "run"), ("export", "export"),
                                                        ("bundle", "bundle"), ("predict", "predictions"),
                                                        ("evaluate", "scores"), ("report", "report"))}
    assert (written["run"] / "checkpoints" / "last.pt").is_file() and (written["predict"] / "predictions.csv").is_file()
    assert (written["report"] / "report.md").is_file() and (written["bundle"] / "derm_a" / "models").is_dir()
    wrong = {name: wrong_modes(root, umask) for name, root in written.items()}
    assert {name: paths for name, paths in wrong.items() if paths} == {}
