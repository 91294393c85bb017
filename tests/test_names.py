"""Names that become file and folder names are capped at validation (`check` and `run`), in UTF-8 bytes.

A 300-character site name passed `check`; `run` then created run.json and sites/ and failed, and `--resume`
ended in `OSError: File name too long`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from medfl.cli import main
from medfl.config import MAX_NAME_BYTES, load_site_config
from medfl.errors import ConfigError
from medfl.experiment import load_experiment_config

LONG = "s" * 300


def _site(folder: Path, name: str) -> Path:
    path = folder / "site.yaml"
    path.write_text(yaml.safe_dump({"name": name, "task": "classification", "data_root": ".", "layout": "csv",
                                    "label_map": {"nv": "nv", "mel": "mel"}}), encoding="utf-8")
    return path


def _experiment(folder: Path, site: Path, **changes: object) -> Path:
    path = folder / "experiment.yaml"
    path.write_text(yaml.safe_dump({"name": "names", "task": "classification", "sites": [str(site)],
                                    "data": {"classes": ["nv", "mel"]}, **changes}), encoding="utf-8")
    return path


def test_check_refuses_a_site_name_too_long_for_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = _site(tmp_path, LONG)
    assert main(["check", str(site)]) == 1
    out = capsys.readouterr()
    errors = [line for line in (out.out + out.err).splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in out.out + out.err
    assert f"{site}: key 'name': is 300 bytes long" in errors[0] and f"at most {MAX_NAME_BYTES} bytes" in errors[0]
    assert LONG not in errors[0]  # the line names the file and the key; it does not repeat the name


@pytest.mark.parametrize("where", ["site name", "experiment name"])
def test_run_refuses_a_long_name_before_writing_anything(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         where: str) -> None:
    site = _site(tmp_path, LONG if where == "site name" else "site_a")
    experiment = _experiment(tmp_path, site, **({"name": LONG} if where == "experiment name" else {}))
    run_dir = tmp_path / "run"
    assert main(["run", str(experiment), "--out", str(run_dir)]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "is 300 bytes long" in err and "key 'name'" in err
    assert str(site if where == "site name" else experiment) in err
    assert not run_dir.exists()


def test_the_cap_counts_bytes_and_admits_names_up_to_it(tmp_path: Path) -> None:
    assert load_site_config(_site(tmp_path, "s" * MAX_NAME_BYTES)).name == "s" * MAX_NAME_BYTES
    with pytest.raises(ConfigError, match=f"is {MAX_NAME_BYTES + 1} bytes long"):
        load_site_config(_site(tmp_path, "s" * (MAX_NAME_BYTES + 1)))
    site = _site(tmp_path, "site_a")
    assert load_experiment_config(_experiment(tmp_path, site, name="e" * MAX_NAME_BYTES)).name == "e" * MAX_NAME_BYTES


def test_a_seed_stays_within_torchs_range_and_so_within_twenty_digits(tmp_path: Path) -> None:
    """The seed is part of the run folder's name (`<name>-<method>-seed<seed>`)."""
    site = _site(tmp_path, "site_a")
    assert load_experiment_config(_experiment(tmp_path, site, seed=2**64 - 1)).seed == 2**64 - 1
    with pytest.raises(ConfigError, match="key 'seed'"):
        load_experiment_config(_experiment(tmp_path, site, seed=int("9" * 300)))
